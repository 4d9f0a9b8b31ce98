/**
 * The status page: `GET /` serves one HTML page with its script and style (static/status/, read
 * once at start), which polls `GET /_pullcache/v1/status` (the JSON of status/status.ts) and the
 * admin API's images. Nothing comes from another host: the Content-Security-Policy says so, and
 * an air-gapped site sees the page whole.
 *
 *   GET /                              the page
 *   GET /_pullcache/ui/<file>          its script and style
 *   GET /_pullcache/v1/status          Status (docs/admin-api.md)
 *
 * With client authentication on and anonymous callers refused, all of it needs a user (the
 * browser asks for one). The page offers pin, unpin and remove to a viewer with the `admin`
 * action; the admin API checks that action again on every change. The status shows a viewer
 * the fetches and upstream failures of repositories it may pull, and refused requests (with
 * other clients' addresses) only to an admin.
 */
import { readFileSync } from 'node:fs';
import express, { type Response, type Router } from 'express';
import type { AccessControl, Identity } from '../access/types.js';
import { AuthenticationRequiredError } from '../access/errors.js';
import type { StatusReporter } from '../status/status.js';
import { ADMIN_PREFIX } from './admin.js';

export const UI_PREFIX = '/_pullcache/ui';

const STATIC = new URL('../../static/status/', import.meta.url);

const CONTENT_TYPES: Record<string, string> = {
  'index.html': 'text/html; charset=utf-8',
  'app.js': 'text/javascript; charset=utf-8',
  'app.css': 'text/css; charset=utf-8',
};

/** Everything the page loads is its own: no other host, no inline script. */
const CSP =
  "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

export function statusRouter(reporter: StatusReporter, access: AccessControl): Router {
  const files = new Map(
    Object.keys(CONTENT_TYPES).map((name) => [name, readFileSync(new URL(name, STATIC))]),
  );
  const router = express.Router();
  const identity = (res: Response) => res.locals.identity as Identity;
  const served = (res: Response) => {
    if (!access.served(identity(res)))
      throw new AuthenticationRequiredError('authentication required');
  };
  const send = (res: Response, name: string) => {
    res.setHeader('Content-Type', CONTENT_TYPES[name]!);
    res.setHeader('Cache-Control', 'no-cache');
    res.setHeader('Content-Security-Policy', CSP);
    res.setHeader('X-Content-Type-Options', 'nosniff');
    res.send(files.get(name));
  };

  router.get('/', (_req, res) => {
    served(res);
    send(res, 'index.html');
  });
  router.get(`${UI_PREFIX}/:file`, (req, res, next) => {
    const name = req.params.file;
    if (name === 'index.html' || !files.has(name)) {
      next();
      return;
    }
    send(res, name);
  });
  router.get(`${ADMIN_PREFIX}/status`, async (_req, res) => {
    served(res);
    res.setHeader('Cache-Control', 'no-store');
    const caller = identity(res);
    // Narrowed to what the caller may see: fetches and failures of what it may pull, refused
    // requests (other clients' addresses) for admins only (status/status.ts, visibleTo).
    res.json(
      await reporter.status({
        admin: access.allows(caller, 'admin'),
        mayPull: (target) => access.allows(caller, 'pull', target),
      }),
    );
  });
  return router;
}
