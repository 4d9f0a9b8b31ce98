/**
 * Puts the layers together into a Runtime: storage, metadata cache, one upstream client and one
 * set of proxy services per upstream, the lifecycle, the fleet's channels. The server
 * (server.ts) and the CLI commands share it. Nothing here waits for an upstream.
 */
import { ConfigError } from './config/load.js';
import type { Config } from './config/schema.js';
import type { UpstreamServices } from './http/types.js';
import { Passthrough } from './http/passthrough.js';
import type { Logger } from './log/logger.js';
import { KeyvMetadataCache, type Reachability } from './metadata/keyv-cache.js';
import type { MetadataCache } from './metadata/types.js';
import { Metrics } from './metrics.js';
import { ProxyBlobStore } from './proxy/proxy-blob-store.js';
import { ProxyManifestStore } from './proxy/proxy-manifest-store.js';
import { ProxyReferrersService } from './proxy/proxy-referrers.js';
import { ProxyTagService } from './proxy/proxy-tag-service.js';
import { DriverBlobStore } from './storage/blob-store.js';
import { imageRefs } from './routing.js';
import { Lifecycle } from './lifecycle/lifecycle.js';
import { TrackedBlobStore, TrackedRepositoryStore } from './lifecycle/tracking.js';
import type { ImageRef } from './lifecycle/types.js';
import { closeDriver, createDriver } from './storage/create-driver.js';
import {
  LocalBlobService,
  LocalManifestService,
  LocalTagService,
} from './storage/local-services.js';
import { DriverReferrersStore } from './storage/referrers-store.js';
import { DriverRepositoryStore } from './storage/repository-store.js';
import type { BlobStore, RepositoryStore, StorageDriver } from './storage/types.js';
import type { BlobService } from './storage/services.js';
import { probeStorage } from './storage-probe.js';
import { RegistryClient } from './upstream/client.js';
import { openFleetChannels } from './fleet/channels.js';
import { PeeredBlobSource } from './fleet/peers.js';
import { PeerBlobService } from './fleet/peer-blobs.js';
import type { UpstreamFetch } from './proxy/types.js';
import type { UpstreamClient } from './upstream/types.js';
import { InflightFetches } from './proxy/inflight.js';
import { RecentEvents } from './status/events.js';
import { StatusReporter } from './status/status.js';
import { UpstreamMonitor } from './status/upstream-monitor.js';

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
  /** In a serving process with `server.advertise`: what other replicas are served (fleet/peers.ts). */
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
   * counted in this one's graph; storage is counted afresh when some of that may have been lost
   * (fleet/forget.ts).
   */
  followOthers(): void;
  close(): Promise<void>;
}

export async function createRuntime(
  config: Config,
  log: Logger,
  options: { defaultMetrics?: boolean; serving?: boolean } = {},
): Promise<Runtime> {
  // Only a serving process is a replica others follow (at server.advertise) and follows them: a
  // command fetches for itself, and needs no peer secret.
  const serving = options.serving ?? false;
  // Before anything is opened: a missing secret stops start-up with nothing to close.
  const peerSecret = config.server.peerSecretEnv
    ? (process.env[config.server.peerSecretEnv] ?? '')
    : config.server.peerSecret;
  if (serving && config.server.advertise !== '' && peerSecret === '')
    throw new ConfigError([
      `server.peerSecretEnv: the environment variable ${config.server.peerSecretEnv} is not set`,
    ]);
  const clients = new Map<string, UpstreamClient>();
  /** Set once `close` began: no recount is started then. */
  let closing = false;
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
  const fleet = openFleetChannels(config, log, driver, serving);
  const { forgetting, workerLeases: leases, peerLeases } = fleet;
  const cache = new KeyvMetadataCache({
    store: config.cache.store,
    redisUrl: config.cache.redis.url,
    memoryEntries: config.cache.memoryEntries,
    log,
    onDelete: (key) => forgetting.announce(key),
    onClear: () => forgetting.announceAll(),
  });
  const inflight = new InflightFetches<UpstreamFetch>();
  metrics.setFetchesInFlight(() => inflight.running());
  const { pins, ...retention } = config.retention;
  const lifecycle = new Lifecycle({
    retention,
    configPins: configPins(config, pins),
    driver,
    blobs: storedBlobs,
    repositories: storedRepositories,
    cache,
    manifestMemory: {
      forget: (repo, digest) => localManifests.forget(repo, digest),
      forgetAll: () => localManifests.forgetAll(),
    },
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
    onFull: (bytes) => forgetting.announceChange({ full: bytes }),
    ...(fleet.lifecycleReplicas ? { replicas: fleet.lifecycleReplicas } : {}),
  });
  // Everything above the stores tells the lifecycle what comes and goes.
  const blobs = new TrackedBlobStore(storedBlobs, lifecycle.keeper);
  const repositories = new TrackedRepositoryStore(storedRepositories, lifecycle.keeper);
  const localBlobs = new LocalBlobService(blobs, repositories, cache);
  const localManifests = new LocalManifestService(blobs, repositories, cache, log);
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
        manifestHolds: (repo, digest) => lifecycle.graph.manifestHolds(repo, digest),
        ...(leases ? { leases, idleTimeout: followIdle(upstream.timeouts.bodyIdle) } : {}),
        ...(peerLeases
          ? {
              source: peerSource(
                new PeeredBlobSource(client, {
                  leases: peerLeases,
                  secret: peerSecret,
                  idleTimeout: followIdle(upstream.timeouts.bodyIdle),
                  log,
                  cells: metrics.peerCells(name),
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
        holds: async (repo, subject) =>
          (await storedRepositories.getManifest(repo, subject)) !== undefined,
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
      // A disk that filled up (something else wrote to it, or a link write met it) is made room
      // on as a fetch that met it would: with no fetch under way, nothing else would, and a
      // probe that keeps failing takes this replica out of its load balancer for good.
      if (storage.full) lifecycle.diskFull(FULL_DISK_ROOM);
      return { storage, cache: reachable };
    },
    followOthers() {
      const counted = (work: Promise<unknown>, outcome: string) =>
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
        changed(changes) {
          for (const change of changes)
            if ('full' in change) lifecycle.diskFullElsewhere(change.full);
            else
              counted(
                lifecycle.keeper.changedElsewhere(
                  'stored' in change ? change.stored : change.removed,
                ),
                'not counted',
              );
        },
        missed() {
          if (!closing) counted(lifecycle.recount(), 'not counted again');
        },
      });
    },
    async close() {
      closing = true;
      for (const p of passthrough.values()) p.close();
      for (const source of peerSources) source.close();
      await Promise.all([...clients.values()].map((c) => c.close()));
      await lifecycle.close(); // releases the lifecycle's lease first
      await forgetting.close(); // what it still has to tell goes out on the lease connection
      await fleet.redis?.close();
      await cache.close();
      await closeDriver(driver);
    },
  };
}

/** Bytes asked of an eviction when the readiness probe finds the disk full. */
const FULL_DISK_ROOM = 64 * 1024 * 1024;

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
