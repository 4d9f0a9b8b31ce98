/**
 * The admin API, JSON under `/_pullcache/v1/`: what is cached and how much room it takes, pins,
 * removal and garbage collection, for `pullcache ls|du|pin|unpin|rm|gc` (which use it when a
 * server runs on their storage, so that its caches see every removal) and for the status page.
 *
 *   GET    /_pullcache/v1/images[?upstream=NAME]     ImageInfo[]
 *   GET    /_pullcache/v1/usage                      Usage
 *   GET    /_pullcache/v1/pins                       {pins: string[]}
 *   POST   /_pullcache/v1/pins    {references}       pin
 *   DELETE /_pullcache/v1/pins    {references}       unpin -> {notPinned: string[]}
 *   POST   /_pullcache/v1/remove  {references, dryRun?}   RemovalReport
 *   POST   /_pullcache/v1/gc      {dryRun?}          RemovalReport
 *   POST   /_pullcache/v1/recount                    Usage, after counting storage afresh
 *
 * What changes the cache needs the `admin` action (access/): with client authentication, as the
 * rules give it, for every reference named (gc and recount: over the whole cache); without, to
 * requests from this host (loopback) only. With authentication, what is read needs a caller that
 * is served at all, and lists only what the caller may pull.
 */
import express, { type Request, type Response, type Router } from 'express';
import { z } from 'zod';
import type { Config } from '../config/schema.js';
import type { Lifecycle } from '../lifecycle/lifecycle.js';
import { RegistryError } from '../oci/errors.js';
import { imageRefs } from '../routing.js';
import type { AccessControl, Identity } from '../access/types.js';
import { AuthenticationRequiredError } from '../access/errors.js';
import type { ImageRef } from '../lifecycle/types.js';

export const ADMIN_PREFIX = '/_pullcache/v1';

const referencesBody = z.strictObject({
  references: z.array(z.string().max(1024)).min(1).max(10_000),
  dryRun: z.boolean().optional(),
});
const gcBody = z.strictObject({ dryRun: z.boolean().optional() });

function body<T>(schema: z.ZodType<T>, req: Request): T {
  const parsed = schema.safeParse(req.body ?? {});
  if (!parsed.success) {
    const issue = parsed.error.issues[0];
    throw new RegistryError(
      'INVALID_REQUEST',
      `${issue?.path.join('.') || 'body'}: ${issue?.message ?? 'invalid'}`,
    );
  }
  return parsed.data;
}

export function adminRouter(config: Config, lifecycle: Lifecycle, access: AccessControl): Router {
  const router = express.Router();
  const identity = (res: Response) => res.locals.identity as Identity;
  /** The `admin` action over the whole cache, or over each image named. */
  const requireAdmin = (res: Response, refs?: ImageRef[]) => {
    if (refs === undefined) access.authorize(identity(res), 'admin');
    else for (const ref of refs) access.authorize(identity(res), 'admin', ref);
  };
  const mayPull = (res: Response, ref: { upstream: string; repository: string }) =>
    access.allows(identity(res), 'pull', ref);
  // What is read: for any caller that is served at all (it lists only what the caller may pull).
  router.use((req, res, next) => {
    if (!access.served(identity(res)))
      throw new AuthenticationRequiredError('authentication required');
    next();
  });
  router.use(express.json({ limit: '1mb' }));

  router.get('/images', async (req, res) => {
    const upstream = typeof req.query.upstream === 'string' ? req.query.upstream : undefined;
    const images = (await lifecycle.images()).filter((i) => mayPull(res, i));
    res.json(upstream ? images.filter((i) => i.upstream === upstream) : images);
  });
  router.get('/usage', async (_req, res) => {
    res.json(await lifecycle.usage());
  });
  const pins = async (res: Response) =>
    (await lifecycle.pinned()).filter((pin) => {
      try {
        return imageRefs(config, [pin]).every((ref) => mayPull(res, ref));
      } catch {
        return false;
      }
    });
  router.get('/pins', async (_req, res) => {
    res.json({ pins: await pins(res) });
  });
  router.post('/pins', async (req, res) => {
    const refs = imageRefs(config, body(referencesBody, req).references);
    requireAdmin(res, refs);
    await lifecycle.pin(refs);
    res.json({ pins: await pins(res) });
  });
  router.delete('/pins', async (req, res) => {
    const refs = imageRefs(config, body(referencesBody, req).references);
    requireAdmin(res, refs);
    const notPinned = await lifecycle.unpin(refs);
    res.json({ pins: await pins(res), notPinned });
  });
  router.post('/remove', async (req, res) => {
    const { references, dryRun } = body(referencesBody, req);
    const refs = imageRefs(config, references);
    requireAdmin(res, refs);
    res.json(await lifecycle.remove(refs, dryRun ?? false));
  });
  router.post('/recount', async (_req, res) => {
    requireAdmin(res);
    await lifecycle.recount();
    res.json(await lifecycle.usage());
  });
  router.post('/gc', async (req, res) => {
    requireAdmin(res);
    res.json(await lifecycle.gc(body(gcBody, req).dryRun ?? false));
  });
  return router;
}
