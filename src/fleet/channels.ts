/**
 * What one process opens to work with the other processes on its storage: the workers of its
 * host (`server.workers`, through the primary), and the replicas sharing its Redis
 * (`cache.store: redis`, and `server.advertise` for following their fetches). A process alone
 * on its storage opens nothing but an empty `Forgetting`.
 */
import cluster from 'node:cluster';
import { resolve } from 'node:path';
import type { Config } from '../config/schema.js';
import { LeaseRedis, RedisLease, type Lease } from '../lifecycle/lease.js';
import type { Logger } from '../log/logger.js';
import { paths } from '../storage/paths.js';
import type { StorageDriver } from '../storage/types.js';
import { Forgetting } from './forget.js';
import { IpcForgetTransport, RedisForgetTransport } from './forget-transports.js';
import { PeerLeases } from './peer-leases.js';
import { processChannel, WorkerLeases } from './worker-leases.js';

export interface FleetChannels {
  /** With `cache.store: redis`: one connection for this process's leases and its messages. */
  redis?: LeaseRedis;
  /** What this process stores and removes, every other process on the storage hears of. */
  forgetting: Forgetting;
  /** `server.workers`: a cold blob is fetched by one worker of the host, kept by the primary. */
  workerLeases?: WorkerLeases;
  /** `server.advertise`: a lease on each cold digest in Redis, among the replicas. */
  peerLeases?: PeerLeases;
  /**
   * When other processes share the storage, how the lifecycle decides which one owns the budget
   * and the sweep: a lease in Redis, or (workers without Redis) the owner record in storage.
   */
  lifecycleReplicas?: { lease?: Lease };
}

export function openFleetChannels(
  config: Config,
  log: Logger,
  driver: StorageDriver,
  /** A serving process: it follows other replicas' fetches, and they follow its. */
  serving: boolean,
): FleetChannels {
  const id = storageId(config);
  const redis =
    config.cache.store === 'redis' ? new LeaseRedis(config.cache.redis.url, log) : undefined;
  const forgetting = new Forgetting(
    [
      ...(cluster.isWorker ? [new IpcForgetTransport(processChannel)] : []),
      ...(redis
        ? [new RedisForgetTransport(redis, config.cache.redis.url, `pullcache:forget:${id}`, log)]
        : []),
    ],
    log,
  );
  const workerLeases = cluster.isWorker
    ? new WorkerLeases({
        channel: processChannel,
        // The others follow a fetch through its upload file.
        readUpload: (upload, offset, length) =>
          driver.reader(paths.uploadData(upload), offset, length),
      })
    : undefined;
  // The others stream the blob from the replica fetching it (peers.ts). The configuration's
  // schema requires cache.store: redis with server.advertise.
  const peerLeases =
    serving && config.server.advertise !== '' && redis
      ? new PeerLeases({
          redis,
          advertise: config.server.advertise,
          prefix: `pullcache:fetch-lease:${id}:`,
          log,
        })
      : undefined;
  const lifecycleReplicas = redis
    ? { lease: new RedisLease(redis, `pullcache:lifecycle-lease:${id}`) }
    : cluster.isWorker
      ? {}
      : undefined;
  return { redis, forgetting, workerLeases, peerLeases, lifecycleReplicas };
}

/** The storage in Redis keys: replicas of one storage share them, other caches do not. */
function storageId(config: Config): string {
  const s = config.storage;
  return s.driver === 's3'
    ? `s3:${s.s3.endpoint || 'aws'}/${s.s3.bucket}/${s.s3.prefix}`
    : `fs:${resolve(s.filesystem.root)}`;
}
