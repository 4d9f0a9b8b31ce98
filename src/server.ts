/**
 * Puts the layers together: storage, metadata cache, one upstream client and one set of proxy
 * services per upstream, the HTTP app. Start-up does not wait for an upstream: once listening,
 * it says hello to each (`warm`) in the background.
 */
import type { Server } from 'node:http';
import { createServer } from 'node:http';
import type { Config } from './config/schema.js';
import { createHandler, type UpstreamServices } from './http/app.js';
import { Passthrough } from './http/passthrough.js';
import type { Logger } from './log/logger.js';
import { KeyvMetadataCache } from './metadata/keyv-cache.js';
import type { MetadataCache } from './metadata/types.js';
import { Metrics } from './metrics.js';
import { keepHeapInBudget } from './memory.js';
import type { Digest } from './oci/digest.js';
import type { BlobFetch } from './proxy/blob-fetch.js';
import { ProxyBlobStore } from './proxy/proxy-blob-store.js';
import { ProxyManifestStore } from './proxy/proxy-manifest-store.js';
import { ProxyTagService } from './proxy/proxy-tag-service.js';
import { DriverBlobStore } from './storage/blob-store.js';
import { FilesystemDriver } from './storage/filesystem-driver.js';
import {
  LocalBlobService,
  LocalManifestService,
  LocalTagService,
} from './storage/local-services.js';
import { DriverRepositoryStore } from './storage/repository-store.js';
import type { BlobStore, RepositoryStore, StorageDriver } from './storage/types.js';
import { RegistryClient } from './upstream/client.js';
import type { UpstreamClient } from './upstream/types.js';

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
  close(): Promise<void>;
}

export function createRuntime(
  config: Config,
  log: Logger,
  options: { defaultMetrics?: boolean } = {},
): Runtime {
  const clients = new Map<string, UpstreamClient>();
  const metrics = new Metrics({
    defaults: options.defaultMetrics ?? false,
    status: () =>
      [...clients].map(([upstream, c]) => ({
        upstream,
        down: c.isDown,
        rateLimitRemaining: c.rateLimit?.remaining,
      })),
  });
  const driver = new FilesystemDriver(config.storage.filesystem.root);
  const blobs = new DriverBlobStore(driver, { deleteEnabled: config.storage.delete.enabled });
  const repositories = new DriverRepositoryStore(driver);
  const cache = new KeyvMetadataCache({
    store: config.cache.store,
    redisUrl: config.cache.redis.url,
    log,
  });
  const localBlobs = new LocalBlobService(blobs, cache);
  const localManifests = new LocalManifestService(blobs, repositories, cache);
  const localTags = new LocalTagService(repositories, cache);
  const inflight = new Map<Digest, BlobFetch>();
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
    const client = new RegistryClient({ name, config: upstream, log, password });
    clients.set(name, client);
    const manifests = new ProxyManifestStore(localManifests, client, log, metrics);
    services.set(name, {
      blobs: new ProxyBlobStore({
        local: localBlobs,
        blobs,
        repositories,
        cache,
        client,
        log,
        metrics,
        orphanTimeout: config.server.cacheWriteTimeout,
        inflight,
      }),
      manifests,
      tags: new ProxyTagService(localTags, manifests, client, upstream, log, metrics),
    });
  }

  return {
    config,
    log,
    metrics,
    driver,
    blobs,
    repositories,
    cache,
    clients,
    services,
    local: { blobs: localBlobs, manifests: localManifests, tags: localTags },
    passthrough,
    async close() {
      for (const p of passthrough.values()) p.close();
      await Promise.all([...clients.values()].map((c) => c.close()));
      await cache.close();
    },
  };
}

export interface RunningServer {
  runtime: Runtime;
  server: Server;
  /** The address it listens on, as host:port. */
  address: string;
  url: string;
  close(): Promise<void>;
}

export async function startServer(config: Config, log: Logger): Promise<RunningServer> {
  const runtime = createRuntime(config, log, { defaultMetrics: true });
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
    services: runtime.services,
    passthrough: runtime.passthrough,
    repositories: runtime.repositories,
    ready: async () => {
      await runtime.driver.putContent('.readyz', String(Date.now()));
      return true;
    },
  });
  const server = createServer(handler);
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
  const url = `http://${shownHost}:${bound.port}`;
  log.info(
    {
      listen: `${shownHost}:${bound.port}`,
      storage: runtime.driver.name,
      cache: config.cache.store,
      upstreams: Object.keys(config.upstreams),
    },
    'pullcache listening',
  );
  // In the background: the first pull should not wait for a connection or an auth challenge.
  for (const client of runtime.clients.values()) void client.warm?.();
  return {
    runtime,
    server,
    address: `${shownHost}:${bound.port}`,
    url,
    async close() {
      clearInterval(purgeTimer);
      stopHeapBudget();
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
      await runtime.close();
    },
  };
}

function splitHostPort(listen: string): [string, number] {
  const i = listen.lastIndexOf(':');
  return [listen.slice(0, i).replace(/^\[|\]$/g, ''), Number(listen.slice(i + 1))];
}
