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
 * What changes the cache needs the `admin` action; until client authentication exists, that is
 * granted to requests from this host (loopback) only.
 */
import express, { type Request, type Router } from 'express';
import { z } from 'zod';
import type { Config } from '../config/schema.js';
import type { Lifecycle } from '../lifecycle/lifecycle.js';
import { RegistryError } from '../oci/errors.js';
import { imageRefs } from '../routing.js';

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

/** The `admin` action, as far as it can be told without client authentication. */
function requireAdmin(req: Request): void {
  const address = req.socket.remoteAddress ?? '';
  const loopback =
    address === '::1' || address.startsWith('127.') || address.startsWith('::ffff:127.');
  if (!loopback)
    throw new RegistryError(
      'DENIED',
      'changing the cache needs the admin action; without authentication, only from this host',
    );
}

export function adminRouter(config: Config, lifecycle: Lifecycle): Router {
  const router = express.Router();
  router.use(express.json({ limit: '1mb' }));

  router.get('/images', async (req, res) => {
    const upstream = typeof req.query.upstream === 'string' ? req.query.upstream : undefined;
    const images = await lifecycle.images();
    res.json(upstream ? images.filter((i) => i.upstream === upstream) : images);
  });
  router.get('/usage', async (_req, res) => {
    res.json(await lifecycle.usage());
  });
  router.get('/pins', (_req, res) => {
    res.json({ pins: lifecycle.pinned() });
  });
  router.post('/pins', async (req, res) => {
    requireAdmin(req);
    await lifecycle.pin(imageRefs(config, body(referencesBody, req).references));
    res.json({ pins: lifecycle.pinned() });
  });
  router.delete('/pins', async (req, res) => {
    requireAdmin(req);
    const notPinned = await lifecycle.unpin(
      imageRefs(config, body(referencesBody, req).references),
    );
    res.json({ pins: lifecycle.pinned(), notPinned });
  });
  router.post('/remove', async (req, res) => {
    requireAdmin(req);
    const { references, dryRun } = body(referencesBody, req);
    res.json(await lifecycle.remove(imageRefs(config, references), dryRun ?? false));
  });
  router.post('/recount', async (req, res) => {
    requireAdmin(req);
    await lifecycle.recount();
    res.json(await lifecycle.usage());
  });
  router.post('/gc', async (req, res) => {
    requireAdmin(req);
    res.json(await lifecycle.gc(body(gcBody, req).dryRun ?? false));
  });
  return router;
}
