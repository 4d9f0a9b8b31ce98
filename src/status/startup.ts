/**
 * The start-up report: one log line for storage (writable, free space), one for the metadata
 * cache, one for each upstream that is not greeted (offline, passthrough; the greeted ones say
 * whether they answer, and their auth scheme, from the upstream client), each a warning when it
 * is degraded. Storage that takes no write never gets here: start-up stops on it.
 */
import { resolve } from 'node:path';
import type { Config } from '../config/schema.js';
import { redactUserinfo } from '../config/redact.js';
import { formatBytes } from '../config/units.js';
import type { Logger } from '../log/logger.js';
import type { StorageDriver } from '../storage/types.js';

/** Below this much free space (without a retention.minFree of its own) storage is warned of. */
const LOW_FREE = 1024 ** 3;

export async function logStartup(
  config: Config,
  driver: StorageDriver,
  cacheReachable: boolean,
  log: Logger,
): Promise<void> {
  const where =
    config.storage.driver === 'filesystem'
      ? { root: resolve(config.storage.filesystem.root) }
      : { bucket: config.storage.s3.bucket, endpoint: config.storage.s3.endpoint };
  const space = await driver.space().catch(() => undefined);
  const storage = {
    storage: driver.name,
    ...where,
    writable: true,
    free: space?.free ?? null,
    total: space?.total ?? null,
  };
  const { minFree } = config.retention;
  if (space && minFree > 0 && space.free < minFree)
    log.warn(
      { ...storage, minFree },
      `storage has ${formatBytes(space.free)} free, less than retention.minFree: evicting to make room`,
    );
  else if (space && minFree === 0 && space.free < LOW_FREE)
    log.warn(storage, `storage has only ${formatBytes(space.free)} free`);
  else log.info(storage, 'storage writable');

  // An unreachable Redis is warned of where it is probed (server.ts), with its reason.
  if (cacheReachable)
    log.info(
      {
        cache: config.cache.store,
        ...(config.cache.store === 'redis' ? { url: redactUserinfo(config.cache.redis.url) } : {}),
        reachable: true,
      },
      config.cache.store === 'redis' ? 'metadata cache reachable' : 'metadata cache in memory',
    );

  for (const [name, upstream] of Object.entries(config.upstreams)) {
    if (upstream.mode === 'passthrough')
      log.info(
        { upstream: name, url: upstream.url, mode: 'passthrough' },
        'upstream forwarded unchanged (nothing cached)',
      );
    else if (upstream.offline)
      log.warn(
        { upstream: name, url: upstream.url, offline: true },
        'upstream offline: only what is cached is served',
      );
  }
}
