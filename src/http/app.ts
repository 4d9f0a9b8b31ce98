/**
 * The express app: the OCI pull API (distribution spec "pull" and "content discovery"
 * endpoints, served by manifests.ts, blobs.ts, listing.ts and referrers.ts, or forwarded to a
 * passthrough upstream as passthrough-request.ts makes the request), health, metrics, request
 * logs (request-log.ts), and the one error middleware.
 */
import type { RequestListener } from 'node:http';
import express, {
  type ErrorRequestHandler,
  type NextFunction,
  type Request,
  type Response,
} from 'express';
import type { Config } from '../config/schema.js';
import type { Logger } from '../log/logger.js';
import type { Metrics } from '../metrics.js';
import {
  DeniedError,
  MethodNotAllowedError,
  NotFoundError,
  UnsupportedError,
} from '../oci/errors.js';
import type { RepositoryKey, RepositoryStore } from '../storage/types.js';
import type { BlobService } from '../storage/services.js';
import type { UpstreamServices } from './types.js';
import type { Lifecycle } from '../lifecycle/lifecycle.js';
import { ADMIN_PREFIX, adminRouter } from './admin.js';
import { errorMiddleware, methodNotAllowed } from './errors.js';
import type { Passthrough } from './passthrough.js';
import {
  passthroughAction,
  passthroughQuery,
  upstreamUnauthorized,
} from './passthrough-request.js';
import {
  createManifestFastPath,
  decodeSegment,
  API_VERSION,
  API_VERSION_HEADER,
  serveManifest,
  setNamespaceHeader,
  setSecurityHeaders,
  undecodableDigest,
} from './manifests.js';
import { requestLog } from './request-log.js';
import { RequestMetrics } from './request-metrics.js';
import { statusRouter } from './status-page.js';
import type { StatusReporter } from '../status/status.js';
import { serveReferrers } from './referrers.js';
import { serveBlob } from './blobs.js';
import { listTags, paginate, pagination } from './listing.js';
import { clientName, routeRequest } from '../routing.js';
import { repositoryLists } from '../access/repositories.js';
import { createAccess, TOKEN_PATH } from '../access/access.js';
import { AuthenticationRequiredError } from '../access/errors.js';
import { PEER_HEADER, PEER_PATH, verifyPeerSignature } from '../fleet/peers.js';
import type { AccessControl, Identity } from '../access/types.js';

export interface AppDeps {
  config: Config;
  log: Logger;
  metrics: Metrics;
  services: Map<string, UpstreamServices>;
  passthrough: Map<string, Passthrough>;
  repositories: RepositoryStore;
  /** Who may do what; without it, that of the config (no htpasswd file: everyone may pull). */
  access?: AccessControl;
  /** The cache's lifecycle, for the admin API; without it there is none (tests of the OCI API). */
  lifecycle?: Lifecycle;
  /** The status page and its JSON; without it there is none. */
  status?: StatusReporter;
  /** The state of each component /readyz reports (storage, cache), by name. */
  ready: () => Promise<Record<string, ReadinessCheck>>;
  /** The text of `/metrics` when it is not this process's registry alone (the host's workers). */
  metricsText?: () => Promise<string>;
  /** The peer endpoint other replicas follow this one's fetches through (fleet/peers.ts). */
  peer?: { secret: string; blobs: BlobService };
}

/** One component's state for /readyz. */
export interface ReadinessCheck {
  ok: boolean;
  /** A required component that fails makes the server not ready; any other only degraded. */
  required: boolean;
  /** Why it fails, in a few words fit for an unauthenticated endpoint (no paths, no URLs). */
  detail?: string;
}

/** The peer endpoint's blobs belong to no repository: the replica asking checked the client's. */
const PEER_REPOSITORY = { upstream: '', repository: '' } as unknown as RepositoryKey;

// The name is greedy, so `/v2/a/blobs/b/blobs/sha256:...` names repository `a/blobs/b`.
const API_PATH =
  /^\/(.+)\/(manifests\/[^/]+|blobs\/uploads(?:\/[^/]*)?|blobs\/[^/]+|tags\/list|referrers\/[^/]+)$/;
/** What a pull-only cache serves on each endpoint it knows. */
const READ_METHODS = ['GET', 'HEAD'];
const WRITE_METHODS = ['POST', 'PUT', 'PATCH', 'DELETE'];

/**
 * The server's request listener: the manifest fast path first (see manifests.ts), express for
 * everything else.
 */
export function createHandler(deps: AppDeps): RequestListener {
  const access = deps.access ?? createAccess(deps.config, deps.log);
  const app = createApp({ ...deps, access });
  const fast = createManifestFastPath({ ...deps, access });
  return (req, res) => {
    if (!fast(req, res)) app(req, res);
  };
}

export function createApp(deps: AppDeps): express.Express {
  const { config, log } = deps;
  const lists = repositoryLists(config);
  const access = deps.access ?? createAccess(config, log);
  const app = express();
  app.disable('x-powered-by');
  app.set('etag', false);
  app.use(
    new RequestMetrics(deps.metrics, deps.status?.events, (r) =>
      access.clientAddress(r),
    ).middleware(),
  );

  const httpLog = log.child({ module: 'http' });
  app.use(requestLog(httpLog, access));

  app.use((_req, res, next) => {
    res.setHeader(API_VERSION_HEADER, API_VERSION);
    next();
  });
  // The registry API serves what upstreams sent: never a page a browser runs (manifests.ts).
  app.use('/v2', (_req, res, next) => {
    setSecurityHeaders(res);
    next();
  });

  app.get('/healthz', (_req, res) => {
    res.json({ status: 'ok' });
  });
  // 200 while every required component works, 503 otherwise. `failed` and `degraded` list the
  // failing required and optional components ("cache: redis unreachable"); `checks` has each
  // one's status: ok, failed (required) or degraded (optional).
  app.get('/readyz', async (_req, res) => {
    const checks = await deps.ready().catch((): Record<string, ReadinessCheck> => ({
      readiness: { ok: false, required: true, detail: 'check failed' },
    }));
    const failing = (required: boolean) =>
      Object.entries(checks)
        .filter(([, c]) => !c.ok && c.required === required)
        .map(([name, c]) => `${name}: ${c.detail ?? 'failing'}`);
    const failed = failing(true);
    res.status(failed.length === 0 ? 200 : 503).json({
      status: failed.length === 0 ? 'ready' : 'not ready',
      failed,
      degraded: failing(false),
      checks: Object.fromEntries(
        Object.entries(checks).map(([name, c]) => [
          name,
          {
            status: c.ok ? 'ok' : c.required ? 'failed' : 'degraded',
            ...(c.ok || c.detail === undefined ? {} : { detail: c.detail }),
          },
        ]),
      ),
    });
  });
  app.get('/metrics', async (_req, res) => {
    res.setHeader('Content-Type', deps.metrics.registry.contentType);
    res.send(await (deps.metricsText ?? (() => deps.metrics.registry.metrics()))());
  });
  app.all(['/healthz', '/readyz', '/metrics'], methodNotAllowed(READ_METHODS));

  // Replicas follow each other's fetches here; nobody else is answered (see fleet/peers.ts).
  if (deps.peer) {
    const peer = deps.peer;
    app.get(`${PEER_PATH}:digest`, async (req, res) => {
      const digest = req.params.digest ?? '';
      const signature = req.headers[PEER_HEADER];
      if (!verifyPeerSignature(peer.secret, digest, Array.isArray(signature) ? '' : signature))
        throw new DeniedError('not a peer of this replica');
      await serveBlob(req, res, peer.blobs, PEER_REPOSITORY, digest);
    });
    app.all(`${PEER_PATH}:digest`, methodNotAllowed(['GET']));
  }

  // Everything below knows its caller (res.locals.identity): wrong or malformed credentials are
  // answered here, whatever the path; no credentials is the anonymous caller.
  app.use(async (req, res, next) => {
    const identity = await access.identify(req);
    res.locals.identity = identity;
    res.locals.user = identity.user;
    next();
  });
  // pullcache's token realm (access/tokens.ts): Basic credentials or none in, a token out.
  if (access.enabled) {
    app.get(TOKEN_PATH, (_req, res) => {
      const token = access.issueToken(identityOf(res));
      if (!token) throw new AuthenticationRequiredError('authentication required');
      res.setHeader('Cache-Control', 'no-store');
      res.json({
        token: token.token,
        access_token: token.token,
        expires_in: token.expiresIn,
        issued_at: token.issuedAt,
      });
    });
    app.all(TOKEN_PATH, methodNotAllowed(READ_METHODS));
  }

  // Clients learn how to authenticate from this ping: when the default upstream is passthrough,
  // its answer (and auth challenge) is the one that counts, unless client authentication is on:
  // then the client's credentials are pullcache's, and so is the challenge.
  const defaultPassthrough =
    config.routing.default !== undefined ? deps.passthrough.get(config.routing.default) : undefined;
  app.get(['/v2', '/v2/'], (req, res, next) => {
    // `docker login` checks its credentials here, and every client learns the challenge from
    // it: without credentials this is 401 whenever authentication is on, even for a cache that
    // serves anonymous callers (they come back with an anonymous token, as on Docker Hub).
    const answer = () => {
      res.setHeader('Content-Type', 'application/json');
      res.send('{}');
    };
    if (access.enabled) {
      const identity = identityOf(res);
      if (!identity.credentialed || !access.served(identity))
        throw new AuthenticationRequiredError('authentication required');
    } else if (defaultPassthrough) {
      defaultPassthrough.ping(req, res, answer, next);
      return;
    }
    answer();
  });
  app.all(['/v2', '/v2/'], methodNotAllowed(READ_METHODS));

  app.get('/v2/_catalog', async (req, res) => {
    const { n, last } = pagination(req);
    const identity = identityOf(res);
    if (!access.served(identity)) throw new AuthenticationRequiredError('authentication required');
    const names: string[] = [];
    for (const upstream of deps.services.keys()) {
      for (const repository of await deps.repositories.listRepositories(upstream))
        if (
          lists.allows(upstream, repository) &&
          access.allows(identity, 'pull', { upstream, repository })
        )
          names.push(clientName(config, upstream, repository));
    }
    names.sort();
    const page = paginate(names, n, last);
    if (page.next !== undefined)
      res.setHeader(
        'Link',
        `</v2/_catalog?last=${encodeURIComponent(page.next)}&n=${n}>; rel="next"`,
      );
    res.json({ repositories: page.items });
  });
  app.all('/v2/_catalog', methodNotAllowed(READ_METHODS));

  app.use('/v2', async (req: Request, res: Response, next: NextFunction) => {
    const m = API_PATH.exec(req.path);
    if (!m) {
      next(); // no such endpoint: the last route answers
      return;
    }
    const name = m[1]!;
    const action = m[2]!;
    const route = routeRequest(config, name, req.query.ns);
    setNamespaceHeader(res, route);
    res.locals.upstream = route.upstream;
    res.locals.repository = route.repository;
    // Outside the upstream's allow/deny lists: refused before anything is asked of anyone.
    lists.check(route.upstream, route.repository);

    const passthrough = deps.passthrough.get(route.upstream);
    // Pulls need `pull` there; what a passthrough upstream takes besides (pushes) needs `admin`.
    access.authorize(
      identityOf(res),
      !passthrough || READ_METHODS.includes(req.method) ? 'pull' : 'admin',
      route,
    );
    if (passthrough) {
      const path = `/v2/${route.repository}/${passthroughAction(route, action)}`;
      const identity = identityOf(res);
      const query = passthroughQuery(req, route, action, { config, lists, access, identity });
      // Its answer's URLs point back here as the client addressed this request.
      const addressed = { prefix: route.prefix, ns: route.ns };
      if (!access.enabled) {
        passthrough.forward(req, res, `${path}${query}`, addressed, next);
        return;
      }
      // The client's credentials are pullcache's own then: never the upstream's to see, and the
      // upstream's challenge never the client's to answer (with pullcache's credentials).
      delete req.headers.authorization;
      passthrough.forward(
        req,
        res,
        `${path}${query}`,
        { ...addressed, unauthorized: () => upstreamUnauthorized(identity, route) },
        next,
      );
      return;
    }
    const services = deps.services.get(route.upstream);
    if (!services) throw new UnsupportedError(`upstream ${route.upstream} serves nothing`);
    const repo: RepositoryKey = { upstream: route.upstream, repository: route.repository };
    // Uploads serve no method at all here (distribution's proxy answers pushes the same way).
    const allowed = action.startsWith('blobs/uploads') ? [] : READ_METHODS;
    if (!allowed.includes(req.method)) {
      throw new MethodNotAllowedError(
        allowed,
        WRITE_METHODS.includes(req.method)
          ? 'pullcache is a pull-through cache: pushes and deletes are not supported'
          : undefined,
      );
    }
    if (action === 'tags/list') {
      await listTags(req, res, services.tags, repo, name);
      return;
    }
    const [kind, reference] = [
      action.slice(0, action.indexOf('/')),
      action.slice(action.indexOf('/') + 1),
    ];
    if (kind === 'manifests') {
      await serveManifest(req, res, services, repo, reference, res.locals);
    } else if (kind === 'referrers') {
      if (!services.referrers) throw new NotFoundError(req.method, req.originalUrl);
      await serveReferrers(req, res, services.referrers, repo, reference);
    } else {
      await serveBlob(req, res, services.blobs, repo, decodeSegment(reference, undecodableDigest));
    }
  });

  // Last: no route above took the request. (A status page or an admin API goes above this.)
  if (deps.status) {
    app.use(statusRouter(deps.status, access));
    app.all(`${ADMIN_PREFIX}/status`, methodNotAllowed(READ_METHODS));
  }
  if (deps.lifecycle) app.use(ADMIN_PREFIX, adminRouter(config, deps.lifecycle, access));

  app.use((req, _res, next) => next(new NotFoundError(req.method, req.path)));
  // A 401's challenge depends on the request (the token realm is on the host the client dialled).
  app.use(((err, req, res, next) => {
    if (err instanceof AuthenticationRequiredError && !res.headersSent)
      res.setHeader('WWW-Authenticate', access.challenge(req));
    next(err);
  }) as ErrorRequestHandler);
  app.use(errorMiddleware(httpLog));
  return app;
}

/** The caller, as the identity middleware found it. */
function identityOf(res: Response): Identity {
  return res.locals.identity as Identity;
}
