/**
 * Puts the layers together: storage, metadata cache, one upstream client and one set of proxy
 * services per upstream, the HTTP app. Start-up does not wait for an upstream: once listening,
 * it says hello to each (`warm`) in the background. It does check what every pull needs:
 * storage that takes a write (else it stops with a ConfigError naming the root), and the cache
 * (a Redis that does not answer is a warning: storage is the truth).
 */
import { createServer, type Server } from 'node:http';
import { createServer as createHttpsServer, type Server as HttpsServer } from 'node:https';
import { mkdir } from 'node:fs/promises';
import { dirname, resolve } from 'node:path';
import { ConfigError } from './config/load.js';
import { redactUserinfo } from './config/redact.js';
import type { Config } from './config/schema.js';
import { createHandler } from './http/app.js';
import type { UpstreamServices } from './http/types.js';
import { Passthrough } from './http/passthrough.js';
import type { Logger } from './log/logger.js';
import { KeyvMetadataCache, type Reachability } from './metadata/keyv-cache.js';
import type { MetadataCache } from './metadata/types.js';
import { Metrics } from './metrics.js';
import { keepHeapInBudget } from './memory.js';
import { ProxyBlobStore } from './proxy/proxy-blob-store.js';
import { ProxyManifestStore } from './proxy/proxy-manifest-store.js';
import { ProxyReferrersService } from './proxy/proxy-referrers.js';
import { ProxyTagService } from './proxy/proxy-tag-service.js';
import { DriverBlobStore } from './storage/blob-store.js';
import { imageRefs } from './routing.js';
import { Lifecycle } from './lifecycle/lifecycle.js';
import {
  TrackedBlobService,
  TrackedBlobStore,
  TrackedManifestService,
  TrackedRepositoryStore,
  TrackedTagService,
} from './lifecycle/tracking.js';
import type { ImageRef } from './lifecycle/types.js';
import { closeDriver, createDriver, storageKey } from './storage/create-driver.js';
import {
  LocalBlobService,
  LocalManifestService,
  LocalTagService,
} from './storage/local-services.js';
import { DriverReferrersStore } from './storage/referrers-store.js';
import { DriverRepositoryStore } from './storage/repository-store.js';
import { RedirectingBlobService } from './storage/redirect.js';
import { LeaseRedis, RedisLease } from './lifecycle/lease.js';
import {
  StorageUnavailableError,
  type BlobService,
  type BlobStore,
  type RepositoryStore,
  type StorageDriver,
} from './storage/types.js';
import { RegistryClient } from './upstream/client.js';
import cluster from 'node:cluster';
import { processChannel, WorkerLeases } from './fleet/worker-leases.js';
import { Forgetting, IpcForgetTransport, RedisForgetTransport } from './fleet/forget.js';
import { PeeredBlobSource, PeerLeases } from './fleet/peers.js';
import { PeerBlobService } from './fleet/peer-blobs.js';
import { workerMetrics } from './fleet/cluster-metrics.js';
import { workerStatus } from './fleet/cluster-status.js';
import { paths } from './storage/paths.js';
import type { UpstreamFetch } from './proxy/types.js';
import {
  describeCertificate,
  isValidNow,
  readTlsCredentials,
  secureContextOptions,
  TlsFilesError,
  type TlsCredentials,
} from './tls/credentials.js';
import { CertificateReloader } from './tls/reload.js';
import { createAccess } from './access/access.js';
import type { UpstreamClient } from './upstream/types.js';
import { InflightFetches } from './proxy/inflight.js';
import { RecentEvents } from './status/events.js';
import { StatusReporter } from './status/status.js';
import { UpstreamMonitor } from './status/upstream-monitor.js';
import { logStartup } from './status/startup.js';

/** Everything a pullcache process holds; the server and the CLI commands share it. */
export interface Runtime {
  config: Config;
  log: Logger;
  metrics: Metrics;
  driver: StorageDriver;
  blobs: BlobStore;
  repositories: RepositoryStore;
  cache: MetadataCache;
  clients: Map<string, UpstreamClient>;
  services: Map<
    string,
    UpstreamServices & { manifests: ProxyManifestStore; tags: ProxyTagService }
  >;
  /** Storage only, never an upstream: what export and import work on. */
  local: UpstreamServices;
  passthrough: Map<string, Passthrough>;
  /** The budget, last-pulled times, pins, eviction and collection. */
  lifecycle: Lifecycle;
  /** What the status page and `pullcache status` show; its history runs once started. */
  status: StatusReporter;
  /** With `server.advertise`: what other replicas are served (fleet/peers.ts). */
  peer?: { secret: string; blobs: BlobService };
  /**
   * Whether storage takes a write and the cache answers, now; never throws. `cacheTimeout` bounds
   * the wait for a cache that does not answer (by default, its connection timeout and a bit).
   */
  probe(options?: {
    cacheTimeout?: number;
  }): Promise<{ storage: Reachability; cache: Reachability }>;
  /**
   * For a serving process: from now on, what another process on the storage removes (an
   * eviction, `rm`) is dropped from this one's memory and graph too, and what it stores is
   * counted in this one's graph (fleet/forget.ts).
   */
  followOthers(): void;
  close(): Promise<void>;
}

export async function createRuntime(
  config: Config,
  log: Logger,
  options: { defaultMetrics?: boolean } = {},
): Promise<Runtime> {
  // Before anything is opened: a missing secret stops start-up with nothing to close.
  const peerSecret = config.server.peerSecretEnv
    ? (process.env[config.server.peerSecretEnv] ?? '')
    : config.server.peerSecret;
  if (config.server.advertise !== '' && peerSecret === '')
    throw new ConfigError([
      `server.peerSecretEnv: the environment variable ${config.server.peerSecretEnv} is not set`,
    ]);
  const clients = new Map<string, UpstreamClient>();
  /** The blob sources that follow other replicas' fetches: their kept connections close with the runtime. */
  const peerSources: PeeredBlobSource[] = [];
  const peerSource = (source: PeeredBlobSource) => {
    peerSources.push(source);
    return source;
  };
  const monitors = new Map<string, UpstreamMonitor>();
  const events = new RecentEvents();
  const metrics = new Metrics({
    defaults: options.defaultMetrics ?? false,
    status: () =>
      [...clients].map(([upstream, c]) => ({
        upstream,
        down: c.isDown || monitors.get(upstream)?.unreachable === true,
        rateLimitRemaining: c.rateLimit?.remaining,
        rateLimitLimit: c.rateLimit?.limit,
      })),
  });
  const driver = await createDriver(config.storage);
  const storedBlobs = new DriverBlobStore(driver, {
    deleteEnabled: config.storage.delete.enabled,
  });
  const storedRepositories = new DriverRepositoryStore(driver);
  // One Redis connection for the leases of this process (the lifecycle's, the fetches') and for
  // telling the others what left storage.
  const leaseRedis =
    config.cache.store === 'redis' ? new LeaseRedis(config.cache.redis.url, log) : undefined;
  // What this process removes, every other process on the storage drops from memory too.
  const forgetting = new Forgetting(
    [
      ...(cluster.isWorker ? [new IpcForgetTransport(processChannel)] : []),
      ...(leaseRedis
        ? [
            new RedisForgetTransport(
              leaseRedis,
              config.cache.redis.url,
              `pullcache:forget:${storageId(config)}`,
              log,
            ),
          ]
        : []),
    ],
    log,
  );
  const cache = new KeyvMetadataCache({
    store: config.cache.store,
    redisUrl: config.cache.redis.url,
    log,
    onDelete: (key) => forgetting.announce(key),
  });
  const inflight = new InflightFetches<UpstreamFetch>();
  metrics.setFetchesInFlight(() => inflight.running());
  // `server.workers`: a cold blob is fetched by one worker of the host, followed by the others
  // through its upload file (fleet/).
  const leases = cluster.isWorker
    ? new WorkerLeases({
        channel: processChannel,
        readUpload: (id, offset, length) => driver.reader(paths.uploadData(id), offset, length),
      })
    : undefined;
  // `server.advertise`: replicas sharing a Redis take a lease on each cold digest there, and the
  // others stream the blob from the one fetching it (fleet/peers.ts).
  // (The configuration's schema requires cache.store: redis with server.advertise.)
  const peerLeases =
    config.server.advertise !== '' && leaseRedis
      ? new PeerLeases({
          redis: leaseRedis,
          advertise: config.server.advertise,
          prefix: `pullcache:fetch-lease:${storageId(config)}:`,
          log,
        })
      : undefined;
  const { pins, ...retention } = config.retention;
  const lifecycle = new Lifecycle({
    retention,
    configPins: configPins(config, pins),
    driver,
    blobs: storedBlobs,
    repositories: storedRepositories,
    cache,
    manifestMemory: { forget: (repo, digest) => localManifests.forget(repo, digest) },
    upstreams: Object.entries(config.upstreams)
      .filter(([, u]) => u.mode === 'cache')
      .map(([name]) => name),
    log,
    metrics,
    fetching: (digest) => inflight.has(digest),
    uploadsPurgeAge: config.storage.uploads.purgeAge,
    // The other processes on the storage count what this one stores and removes at once
    // (fleet/forget.ts).
    onStored: (stored) => forgetting.announceChange({ stored }),
    onRemoved: (removed) => forgetting.announceChange({ removed }),
    ...(leaseRedis
      ? {
          replicas: {
            lease: new RedisLease(leaseRedis, `pullcache:lifecycle-lease:${storageId(config)}`),
          },
        }
      : // `server.workers` without Redis: the owner record decides, the pulls in storage count.
        cluster.isWorker
        ? { replicas: {} }
        : {}),
  });
  // Everything above the stores tells the lifecycle what comes and goes.
  const blobs = new TrackedBlobStore(storedBlobs, lifecycle.keeper);
  const repositories = new TrackedRepositoryStore(storedRepositories, lifecycle.keeper);
  const localBlobs = new LocalBlobService(blobs, repositories, cache);
  const localManifests = new LocalManifestService(blobs, repositories, cache);
  const localTags = new LocalTagService(repositories, cache);
  const services: Runtime['services'] = new Map();
  const passthrough = new Map<string, Passthrough>();

  for (const [name, upstream] of Object.entries(config.upstreams)) {
    if (upstream.mode === 'passthrough') {
      passthrough.set(name, new Passthrough(name, upstream, log));
      continue;
    }
    const password =
      upstream.passwordEnv !== undefined ? process.env[upstream.passwordEnv] : upstream.password;
    if (upstream.passwordEnv !== undefined && password === undefined) {
      log.warn(
        { upstream: name, passwordEnv: upstream.passwordEnv },
        'passwordEnv names an unset variable; pulling anonymously',
      );
    }
    const monitor = new UpstreamMonitor(name, metrics, events);
    monitors.set(name, monitor);
    const client = new RegistryClient({ name, config: upstream, log, password, observer: monitor });
    clients.set(name, client);
    const manifests = new ProxyManifestStore(localManifests, client, log, metrics, lifecycle);
    services.set(name, {
      blobs: new ProxyBlobStore({
        local: localBlobs,
        blobs,
        cache,
        client,
        log,
        metrics,
        orphanTimeout: config.server.cacheWriteTimeout,
        inflight,
        budget: lifecycle,
        ...(leases ? { leases, idleTimeout: followIdle(upstream.timeouts.bodyIdle) } : {}),
        ...(peerLeases
          ? {
              source: peerSource(
                new PeeredBlobSource(client, {
                  leases: peerLeases,
                  secret: peerSecret,
                  idleTimeout: followIdle(upstream.timeouts.bodyIdle),
                  log,
                }),
              ),
            }
          : {}),
      }),
      manifests,
      tags: new ProxyTagService(localTags, manifests, client, upstream, log, metrics),
      referrers: new ProxyReferrersService({
        local: new DriverReferrersStore(driver),
        client,
        config: upstream,
        log,
        metrics,
      }),
    });
  }

  return {
    config,
    log,
    metrics,
    driver,
    ...(peerLeases
      ? {
          peer: {
            secret: peerSecret,
            blobs: new PeerBlobService(
              inflight,
              blobs,
              leases ? { leases, idleTimeout: peerIdleTimeout(config) } : undefined,
            ),
          },
        }
      : {}),
    blobs,
    repositories,
    cache,
    clients,
    services,
    local: { blobs: localBlobs, manifests: localManifests, tags: localTags },
    passthrough,
    lifecycle,
    status: new StatusReporter({
      config,
      metrics,
      lifecycle,
      clients,
      monitors,
      inflight,
      events,
    }),
    async probe(options = {}) {
      const [storage, reachable] = await Promise.all([
        probeStorage(driver, config.storage.filesystem.root),
        cache.reachable(options.cacheTimeout),
      ]);
      return { storage, cache: reachable };
    },
    followOthers() {
      const counted = (work: Promise<void>, outcome: string) =>
        work.catch((err: unknown) =>
          log.warn({ err: (err as Error).message }, `changed elsewhere, ${outcome} here`),
        );
      forgetting.listen({
        forget(keys) {
          cache.forgetInMemory(keys);
          localManifests.forgetKeys(keys);
        },
        forgetAll() {
          cache.forgetAllInMemory();
          localManifests.forgetAll();
        },
        stored(events) {
          for (const event of events)
            counted(lifecycle.keeper.storedElsewhere(event), 'not counted');
        },
        removed(events) {
          for (const event of events)
            counted(lifecycle.keeper.removedElsewhere(event), 'still counted');
        },
      });
    },
    async close() {
      for (const p of passthrough.values()) p.close();
      for (const source of peerSources) source.close();
      await Promise.all([...clients.values()].map((c) => c.close()));
      await lifecycle.close(); // releases the lifecycle's lease first
      await forgetting.close(); // what it still has to tell goes out on the lease connection
      await leaseRedis?.close();
      await cache.close();
      await closeDriver(driver);
    },
  };
}

export interface RunningServer {
  runtime: Runtime;
  /** node:https's server when `server.tls` is set. */
  server: Server | HttpsServer;
  /** The address it listens on, as host:port. */
  address: string;
  url: string;
  close(): Promise<void>;
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
  const runtime = await createRuntime(config, log, { defaultMetrics: true });
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
  const served = cluster.isWorker ? withWorkerHeader(handler) : handler;
  const httpsServer = tls ? createHttpsServer(secureContextOptions(tls), served) : undefined;
  const server = httpsServer ?? createServer(served);
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
    async close() {
      clearInterval(purgeTimer);
      runtime.status.stop();
      reloader?.stop();
      access.close();
      stopHeapBudget();
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
      await runtime.close();
    },
  };
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

const FS_REASONS: Record<string, string> = {
  EACCES: 'permission denied',
  EPERM: 'operation not permitted',
  EROFS: 'read-only file system',
  ENOTDIR: 'part of the path is a file, not a directory',
  ENOSPC: 'no space left on device',
  EDQUOT: 'disk quota exceeded',
};

/**
 * Whether storage takes a write, as every pull needs: its root is a directory (made if missing)
 * and a file can be written in it, through the driver. The reason names no path, so that
 * /readyz can show it.
 */
async function probeStorage(driver: StorageDriver, root: string): Promise<Reachability> {
  try {
    const info = await driver.stat('');
    if (info && !info.isDirectory) return { ok: false, reason: 'it is a file, not a directory' };
    if (!info) await makeDirectory(root);
    await driver.putContent('.readyz', String(Date.now()));
    return { ok: true };
  } catch (err) {
    if (err instanceof StorageUnavailableError) return { ok: false, reason: err.message };
    const code = (err as NodeJS.ErrnoException).code;
    const known = code === undefined ? undefined : FS_REASONS[code];
    return {
      ok: false,
      reason: known ? `${known} (${code})` : (code ?? 'unexpected error'),
    };
  }
}

/**
 * mkdir -p that fails with the real reason: Node's recursive mkdir reports ENOENT where a parent
 * cannot be made (a read-only file system, no permission), so each missing directory is made
 * in turn.
 */
async function makeDirectory(dir: string): Promise<void> {
  try {
    await mkdir(dir);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'EEXIST') return;
    if (code !== 'ENOENT' || dirname(dir) === dir) throw err;
    await makeDirectory(dirname(dir));
    await mkdir(dir).catch((again: NodeJS.ErrnoException) => {
      if (again.code !== 'EEXIST') throw again;
    });
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

/** How long a peer waits on a silent fetch before giving up on it: the longest bodyIdle. */
function peerIdleTimeout(config: Config): number {
  return Math.max(...Object.values(config.upstreams).map((u) => followIdle(u.timeouts.bodyIdle)));
}

/**
 * How long a process following another's fetch waits for bytes before it fetches for itself:
 * the upstream's bodyIdle, and its default (30 s) when that is 0 (off). With no limit, one stalled
 * holder would stall its followers for good; with 0 taken as is, none would follow at all.
 */
function followIdle(bodyIdle: number): number {
  return bodyIdle > 0 ? bodyIdle : 30_000;
}

/** The storage in Redis keys: replicas of one storage share them, other caches do not. */
function storageId(config: Config): string {
  const s = config.storage;
  return s.driver === 's3'
    ? `s3:${s.s3.endpoint || 'aws'}/${s.s3.bucket}/${s.s3.prefix}`
    : `fs:${resolve(s.filesystem.root)}`;
}

/** With `storage.s3.redirect`, stored blobs are answered with a presigned URL of their object. */
function redirecting(runtime: Runtime, blobs: BlobService): BlobService {
  const { storage } = runtime.config;
  if (storage.driver !== 's3' || !storage.s3.redirect) return blobs;
  const ttl = Math.max(1, Math.round(storage.s3.redirectTTL / 1000));
  return new RedirectingBlobService(blobs, runtime.local.blobs, runtime.driver, ttl);
}

/** `retention.pins` as image references; a bad one stops start-up naming its key. */
function configPins(config: Config, pins: string[]): ImageRef[] {
  return pins.flatMap((pin, i) => {
    try {
      return imageRefs(config, [pin]);
    } catch (err) {
      throw new ConfigError([`retention.pins.${i}: ${(err as Error).message}`]);
    }
  });
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
