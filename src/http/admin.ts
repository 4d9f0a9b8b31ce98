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
 *                                                     (and forgetting what the caches in front
 *                                                     of it hold, in every process on it)
 *
 * What changes the cache needs the `admin` action (access/): with client authentication, as the
 * rules give it, for every reference named (gc and recount: over the whole cache); without, to
 * requests from this host (loopback, not through a proxy) only. With authentication, what is read
 * needs a caller that is served at all. `images` and `pins` list only what the caller may pull,
 * in repositories the allow/deny lists serve, unless it administers the whole cache.
 *
 * A change must also come as a page of another site cannot send it (see `changeGuard`): with
 * `Content-Type: application/json`, an `Origin` (if any) on the host asked, and without client
 * authentication to a loopback name. Another method than an endpoint serves is 405 with `Allow`.
 */
import express, { type Request, type RequestHandler, type Response, type Router } from 'express';
import { z } from 'zod';
import type { Config } from '../config/schema.js';
import type { Lifecycle } from '../lifecycle/lifecycle.js';
import {
  DeniedError,
  InvalidRequestError,
  RegistryError,
  UpstreamUnknownError,
} from '../oci/errors.js';
import { imageRefs } from '../routing.js';
import { repositoryLists } from '../access/repositories.js';
import type { AccessControl, Identity } from '../access/types.js';
import { AuthenticationRequiredError } from '../access/errors.js';
import type { ImageRef } from '../lifecycle/types.js';
import { methodNotAllowed } from './errors.js';

export const ADMIN_PREFIX = '/_pullcache/v1';

const referencesBody = z.strictObject({
  references: z.array(z.string().max(1024)).min(1).max(10_000),
  dryRun: z.boolean().optional(),
});
const gcBody = z.strictObject({ dryRun: z.boolean().optional() });
const emptyBody = z.strictObject({});

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
  const lists = repositoryLists(config);
  /**
   * What the caller is shown of images and pins: what it may pull, of repositories the lists
   * (upstreams.X.repositories) serve, as `_catalog` shows. An admin of the whole cache (the
   * commands, `pullcache ls`) sees all that storage holds: images cached before their repository
   * was denied take room, and it is who removes them.
   */
  const shown = (res: Response) => {
    if (access.allows(identity(res), 'admin')) return () => true;
    return (ref: { upstream: string; repository: string }) =>
      lists.allows(ref.upstream, ref.repository) && access.allows(identity(res), 'pull', ref);
  };
  // What is read: for any caller that is served at all (it lists only what the caller may pull).
  router.use((req, res, next) => {
    if (!access.served(identity(res)))
      throw new AuthenticationRequiredError('authentication required');
    next();
  });
  // Only the changes have a body: a GET's is never read.
  const change = [changeGuard(access), express.json({ limit: '1mb' })];

  router.get('/images', async (req, res) => {
    const upstream = upstreamFilter(config, req.query.upstream);
    const visible = shown(res);
    const images = (await lifecycle.images()).filter((i) => visible(i));
    res.json(upstream === undefined ? images : images.filter((i) => i.upstream === upstream));
  });
  router.get('/usage', async (_req, res) => {
    res.json(await lifecycle.usage());
  });
  // Judged by what each pin was stored with, not by its reference read again with today's config
  // (which may no longer parse it, or read it as another upstream's).
  const pins = async (res: Response) =>
    (await lifecycle.pinnedRefs()).filter(shown(res)).map((pin) => pin.reference);
  router.get('/pins', async (_req, res) => {
    res.json({ pins: await pins(res) });
  });
  router.post('/pins', change, async (req: Request, res: Response) => {
    const refs = imageRefs(config, body(referencesBody, req).references);
    requireAdmin(res, refs);
    await lifecycle.pin(refs);
    res.json({ pins: await pins(res) });
  });
  router.delete('/pins', change, async (req: Request, res: Response) => {
    const refs = imageRefs(config, body(referencesBody, req).references);
    requireAdmin(res, refs);
    const notPinned = await lifecycle.unpin(refs);
    res.json({ pins: await pins(res), notPinned });
  });
  router.post('/remove', change, async (req: Request, res: Response) => {
    const { references, dryRun } = body(referencesBody, req);
    const refs = imageRefs(config, references);
    requireAdmin(res, refs);
    res.json(await lifecycle.remove(refs, dryRun ?? false));
  });
  router.post('/recount', change, async (req: Request, res: Response) => {
    body(emptyBody, req);
    requireAdmin(res);
    // Asked after content was added beside the server (an import may have moved a tag).
    await lifecycle.changedBeside();
    res.json(await lifecycle.usage());
  });
  router.post('/gc', change, async (req: Request, res: Response) => {
    const { dryRun } = body(gcBody, req);
    requireAdmin(res);
    res.json(await lifecycle.gc(dryRun ?? false));
  });
  // The endpoints above, asked with another method: 405 with what they serve.
  router.all(['/images', '/usage'], methodNotAllowed(['GET', 'HEAD']));
  router.all('/pins', methodNotAllowed(['GET', 'HEAD', 'POST', 'DELETE']));
  router.all(['/remove', '/recount', '/gc'], methodNotAllowed(['POST']));
  return router;
}

/** `?upstream=NAME` of the images: absent, or the name of one configured upstream. */
function upstreamFilter(config: Config, value: unknown): string | undefined {
  if (value === undefined) return undefined;
  if (typeof value !== 'string')
    throw new InvalidRequestError('the upstream parameter must be given once, as one name');
  if (!Object.hasOwn(config.upstreams, value)) throw new UpstreamUnknownError(value);
  return value;
}

/**
 * Refuses a change a web page could have made in a browser's name: a browser sends a POST or
 * DELETE of another site without asking only with a form's or text's content type, so a change
 * must say `Content-Type: application/json` (415 otherwise; pullcache grants no CORS preflight);
 * an `Origin` naming another host than the one asked is a page of another site (403). Without
 * client authentication, changes are allowed from this host's own address, which any page the
 * host's browser opens also has: they must name the server by a loopback name (localhost,
 * 127.0.0.1, [::1]) too, since a site whose name was made to resolve to 127.0.0.1 (DNS
 * rebinding) sends its own name as Host and its own origin as Origin (403 otherwise).
 */
function changeGuard(access: AccessControl): RequestHandler {
  return (req, _res, next) => {
    const host = req.headers.host;
    if (!access.enabled && !isLoopbackName(host))
      throw new DeniedError(
        `without client authentication the cache is changed only through a loopback name (localhost, 127.0.0.1, [::1]), not ${JSON.stringify(host ?? '')}`,
      );
    const origin = req.headers.origin;
    if (origin !== undefined && !sameHost(origin, host))
      throw new DeniedError(
        `a page of ${JSON.stringify(origin.slice(0, 200))} may not change the cache`,
      );
    const type = (req.headers['content-type'] ?? '').split(';')[0]!.trim().toLowerCase();
    if (type !== 'application/json')
      throw new InvalidRequestError(
        `a change of the cache needs Content-Type: application/json${type === '' ? '' : `, not ${type.slice(0, 100)}`}`,
        415,
      );
    next();
  };
}

/** A Host header naming this host's loopback interface, with any port. */
const LOOPBACK_NAME =
  /^(?:localhost|127(?:\.\d{1,3}){3}|\[::1\]|\[::ffff:127(?:\.\d{1,3}){3}\])(?::\d{1,5})?$/i;

function isLoopbackName(host: string | undefined): boolean {
  return host !== undefined && LOOPBACK_NAME.test(host);
}

const HOST = /^(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?$/;

/** Whether `origin` (an Origin header) is on `host` (the Host header), ports normalised. */
function sameHost(origin: string, host: string | undefined): boolean {
  if (host === undefined || !HOST.test(host)) return false;
  try {
    const from = new URL(origin);
    return from.host === new URL(`${from.protocol}//${host}`).host;
  } catch {
    return false; // `null` (a sandboxed or privacy-sensitive context), or not a URL
  }
}
