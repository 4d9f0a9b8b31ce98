/**
 * Serves a Runtime (runtime.ts) over HTTP(S): the HTTP app, the listening socket, TLS and its
 * reloading. Start-up does not wait for an upstream: once listening, it says hello to each
 * (`warm`) in the background. It does check what every pull needs: storage that takes a write
 * (else it stops with a ConfigError naming the root), and the cache (a Redis that does not
 * answer is a warning: storage is the truth).
 */
import { createServer, type Server } from 'node:http';
import type { Socket } from 'node:net';
import { createServer as createHttpsServer, type Server as HttpsServer } from 'node:https';
import { ConfigError } from './config/load.js';
import { redactUserinfo } from './config/redact.js';
import type { Config } from './config/schema.js';
import { createHandler } from './http/app.js';
import type { UpstreamServices } from './http/types.js';
import type { Logger } from './log/logger.js';
import { keepHeapInBudget } from './memory.js';
import {
  TrackedBlobService,
  TrackedManifestService,
  TrackedTagService,
} from './lifecycle/tracking.js';
import { storageKey } from './storage/create-driver.js';
import { RedirectingBlobService } from './storage/redirect.js';
import type { BlobService } from './storage/services.js';
import cluster from 'node:cluster';
import { workerMetrics } from './fleet/cluster-metrics.js';
import { workerStatus } from './fleet/cluster-status.js';
import {
  describeCertificate,
  isValidNow,
  readTlsCredentials,
  secureContextOptions,
  TlsFilesError,
  type TlsCredentials,
} from './tls/credentials.js';
import { CertificateReloader } from './tls/reload.js';
import { within } from './abort.js';
import { createAccess } from './access/access.js';
import { BodyIdleWatch } from './http/body-idle.js';
import { cutAtStop } from './http/request-log.js';
import {
  answerMalformed,
  MAX_HEADER_BYTES,
  refuseConnect,
  refuseExpectation,
} from './http/malformed.js';
import { logStartup } from './status/startup.js';
import { createRuntime, type Runtime } from './runtime.js';

export interface RunningServer {
  runtime: Runtime;
  /** node:https's server when `server.tls` is set. */
  server: Server | HttpsServer;
  /** The address it listens on, as host:port. */
  address: string;
  url: string;
  /**
   * Stops serving, then closes the runtime. `drain`: for up to this long (ms), new connections
   * are refused while the requests in flight finish (`server.drainTimeout`, for a signal); 0,
   * the default, cuts them at once.
   */
  close(options?: { drain?: number }): Promise<void>;
}

/**
 * Starts serving. Rejects with a ConfigError, naming storage.filesystem.root, when storage does
 * not take a write, or server.tls.cert or .key when those files cannot be served with; a cache
 * that does not answer is logged as a warning and served without. With server.tls: HTTPS only,
 * the certificate reloaded in place when it is renewed (src/tls/).
 */
export async function startServer(config: Config, log: Logger): Promise<RunningServer> {
  const tls = await serverCredentials(config);
  // A missing htpasswd file stops start-up (ConfigError naming auth.htpasswd) before anything runs.
  const access = createAccess(config, log);
  const runtime = await createRuntime(config, log, { defaultMetrics: true, serving: true });
  const probe = await runtime.probe();
  if (!probe.storage.ok) {
    access.close();
    await runtime.close();
    throw new ConfigError([`${storageKey(config.storage)}: ${probe.storage.reason}`]);
  }
  if (!probe.cache.ok) {
    log.warn(
      {
        cache: config.cache.store,
        url: redactUserinfo(config.cache.redis.url),
        reason: probe.cache.reason,
      },
      'metadata cache unreachable; serving from storage until it answers',
    );
  }
  const purge = async () => {
    const purged = await runtime.blobs.purgeUploads(
      new Date(Date.now() - config.storage.uploads.purgeAge),
    );
    if (purged > 0) log.info({ purged }, 'stale upload sessions purged');
  };
  await purge();
  const purgeTimer = setInterval(
    () => void purge().catch((err: unknown) => log.warn({ err }, 'upload purge failed')),
    config.storage.uploads.purgeInterval,
  );
  purgeTimer.unref();
  const stopHeapBudget = keepHeapInBudget();

  const handler = createHandler({
    config,
    log,
    metrics: runtime.metrics,
    services: servedServices(runtime),
    passthrough: runtime.passthrough,
    repositories: runtime.repositories,
    lifecycle: runtime.lifecycle,
    status: runtime.status,
    access,
    ...(runtime.peer ? { peer: runtime.peer } : {}),
    // With `server.workers`, a scrape shows every worker of the host (fleet/cluster-metrics.ts).
    ...(cluster.isWorker ? { metricsText: workerMetrics(runtime.metrics.registry) } : {}),
    ready: async () => {
      // Within the default timeout of a Kubernetes probe (1 s).
      const { storage, cache } = await runtime.probe({ cacheTimeout: 500 });
      return {
        storage: {
          ok: storage.ok,
          required: true,
          ...(storage.ok ? {} : { detail: storage.reason }),
        },
        cache: {
          ok: cache.ok,
          required: false,
          ...(cache.ok ? {} : { detail: `${config.cache.store} unreachable` }),
        },
      };
    },
  });
  let draining = false;
  const answered = cluster.isWorker ? withWorkerHeader(handler) : handler;
  const bodies = new BodyIdleWatch(config.server.bodyIdleTimeout, log);
  const served: typeof handler = (req, res) => {
    // While draining, a kept-alive client is told to open its next connection elsewhere.
    if (draining) res.setHeader('Connection', 'close');
    bodies.watch(req, res);
    answered(req, res);
  };
  const limits = { maxHeaderSize: MAX_HEADER_BYTES };
  const httpsServer = tls
    ? createHttpsServer({ ...secureContextOptions(tls), ...limits }, served)
    : undefined;
  const server = httpsServer ?? createServer(limits, served);
  if (httpsServer) {
    // A client that cannot speak TLS 1.2+ or sends plain HTTP: no answer is possible, only this.
    httpsServer.on('tlsClientError', (err: NodeJS.ErrnoException, socket) =>
      log.debug(
        { module: 'tls', reason: err.code ?? err.message, client: socket.remoteAddress },
        'TLS handshake failed',
      ),
    );
  }
  server.keepAliveTimeout = 65_000;
  // No limit on a whole request (Node's is 300 s, body included: a push of a big layer outlasts
  // it); a body that stalls is cut by `bodies` instead.
  server.requestTimeout = 0;
  // What Node's parser refuses, a CONNECT and an unknown Expect: OCI errors, not bare statuses.
  server.on('clientError', answerMalformed(log));
  server.on('connect', refuseConnect);
  server.on('checkExpectation', refuseExpectation(log));
  // Every socket, from its connection on: one still in its TLS handshake is no HTTP connection
  // yet, and closeAllConnections() would leave it to its handshake timeout (2 min) at a stop.
  const sockets = new Set<Socket>();
  const track = (socket: Socket) => {
    sockets.add(socket);
    socket.once('close', () => sockets.delete(socket));
  };
  server.on('connection', track);
  // Over HTTPS a request's socket is the TLS one around the connection's: marked at a stop too,
  // so the request lines it cuts say that the server cut them (request-log.ts).
  httpsServer?.on('secureConnection', track);
  const [host, port] = splitHostPort(config.server.listen);
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host || undefined, () => {
      server.off('error', reject);
      resolve();
    });
  });
  const address = server.address();
  const bound = typeof address === 'object' && address ? address : { address: host, port };
  const shownHost = bound.address.includes(':') ? `[${bound.address}]` : bound.address;
  const scheme = tls ? 'https' : 'http';
  const url = `${scheme}://${shownHost}:${bound.port}`;
  log.info(
    {
      listen: `${shownHost}:${bound.port}`,
      url,
      ...(tls ? { certificate: describeCertificate(tls.leaf) } : {}),
      storage: runtime.driver.name,
      cache: config.cache.store,
      upstreams: Object.keys(config.upstreams),
    },
    'pullcache listening',
  );
  await logStartup(config, runtime.driver, probe.cache.ok, log);
  // With `server.workers`, the status page shows the host, whichever worker a poll reaches.
  if (cluster.isWorker) runtime.status.showHost(workerStatus);
  runtime.status.start();
  runtime.followOthers();
  // In the background: the first pull should not wait for a connection or an auth challenge.
  for (const client of runtime.clients.values()) void client.warm?.();
  // The commands find this server (and its admin API) through the owner record.
  runtime.lifecycle.start({ url: `${scheme}://${loopbackFor(shownHost)}:${bound.port}` });
  const reloader =
    tls && httpsServer
      ? new CertificateReloader({
          files: config.server.tls,
          current: tls,
          apply: (next) => httpsServer.setSecureContext(secureContextOptions(next)),
          interval: config.server.tls.reloadInterval,
          log,
        })
      : undefined;
  reloader?.start();
  if (tls && !isValidNow(tls.leaf))
    log.warn({ module: 'tls', ...describeCertificate(tls.leaf) }, 'TLS certificate not valid now');
  return {
    runtime,
    server,
    address: `${shownHost}:${bound.port}`,
    url,
    async close({ drain = 0 } = {}) {
      clearInterval(purgeTimer);
      reloader?.stop();
      bodies.stop();
      draining = true;
      const closed = new Promise<void>((resolve) => server.close(() => resolve()));
      if (drain > 0) await drained(server, closed, drain, log);
      for (const socket of sockets) cutAtStop(socket);
      server.closeAllConnections();
      for (const socket of sockets) socket.destroy();
      await closed;
      runtime.status.stop();
      access.close();
      stopHeapBudget();
      await runtime.close();
    },
  };
}

/**
 * Waits, for at most `ms`, until the connections of a closing server (`closed`: its close
 * callback) have ended: each idle one is closed as soon as it is, so a kept-alive client that
 * is between requests goes at once and one with a response in flight goes after it.
 */
async function drained(
  server: Server | HttpsServer,
  closed: Promise<void>,
  ms: number,
  log: Logger,
): Promise<void> {
  const connections = () =>
    new Promise<number>((resolve) =>
      server.getConnections((err, count) => resolve(err ? 0 : count)),
    );
  const open = await connections();
  if (open > 0) log.info({ connections: open, drainTimeoutMs: ms }, 'draining connections');
  const idle = setInterval(() => server.closeIdleConnections(), 200);
  try {
    await within(closed, ms, 'drain timeout');
  } catch {
    log.warn(
      { connections: await connections() },
      'drain timeout: cutting the transfers still in flight',
    );
  } finally {
    clearInterval(idle);
  }
}

/**
 * The certificate and key to serve HTTPS with, checked as a pair, when `server.tls` is set;
 * a file that cannot be used stops start-up with a ConfigError naming its key.
 */
async function serverCredentials(config: Config): Promise<TlsCredentials | undefined> {
  if (config.server.tls.cert === '') return undefined;
  try {
    return await readTlsCredentials(config.server.tls);
  } catch (err) {
    if (err instanceof TlsFilesError) throw new ConfigError([`${err.key}: ${err.message}`]);
    throw err;
  }
}

/** What the services answer to clients counts as a pull, and holds a blob while it streams. */
function servedServices(runtime: Runtime): Map<string, UpstreamServices> {
  const { lifecycle } = runtime;
  const served = new Map<string, UpstreamServices>();
  for (const [name, s] of runtime.services)
    served.set(name, {
      ...s,
      blobs: new TrackedBlobService(redirecting(runtime, s.blobs), lifecycle),
      manifests: new TrackedManifestService(s.manifests, lifecycle),
      tags: new TrackedTagService(s.tags, lifecycle),
    });
  return served;
}

/** With `storage.s3.redirect`, stored blobs are answered with a presigned URL of their object. */
function redirecting(runtime: Runtime, blobs: BlobService): BlobService {
  const { storage } = runtime.config;
  if (storage.driver !== 's3' || !storage.s3.redirect) return blobs;
  const ttl = Math.max(1, Math.round(storage.s3.redirectTTL / 1000));
  return new RedirectingBlobService(blobs, runtime.local.blobs, runtime.driver, ttl);
}

/** Which worker of the host answered (`server.workers`): its pid, for operators and the tests. */
function withWorkerHeader<Req, Res extends { setHeader(name: string, value: string): unknown }>(
  handler: (req: Req, res: Res) => void,
): (req: Req, res: Res) => void {
  const id = String(process.pid);
  return (req, res) => {
    res.setHeader('Pullcache-Worker', id);
    handler(req, res);
  };
}

/** The address a process on this host reaches a server listening on `host` at. */
function loopbackFor(host: string): string {
  if (host === '0.0.0.0' || host === '') return '127.0.0.1';
  if (host === '[::]') return '[::1]';
  return host;
}

function splitHostPort(listen: string): [string, number] {
  const i = listen.lastIndexOf(':');
  return [listen.slice(0, i).replace(/^\[|\]$/g, ''), Number(listen.slice(i + 1))];
}
