/**
 * The StorageDriver the config names (`storage.driver`), and where start-up errors about it point.
 */
import { resolve } from 'node:path';
import { ConfigError } from '../config/load.js';
import type { Config } from '../config/schema.js';
import { FilesystemDriver } from './filesystem-driver.js';
import type { StorageDriver } from './types.js';

/**
 * Rejects with a ConfigError naming the key when a named credential variable is unset. The S3
 * driver (and the AWS SDK, about 20 MB of every process) is loaded only when it is configured.
 */
export async function createDriver(storage: Config['storage']): Promise<StorageDriver> {
  if (storage.driver === 'filesystem') return new FilesystemDriver(storage.filesystem.root);
  const s3 = storage.s3;
  let credentials: { accessKeyId: string; secretAccessKey: string } | undefined;
  if (s3.accessKeyEnv || s3.secretKeyEnv) {
    const problems: string[] = [];
    const read = (key: 'accessKeyEnv' | 'secretKeyEnv') => {
      const name = s3[key];
      const value = name ? process.env[name] : undefined;
      if (!value)
        problems.push(
          `storage.s3.${key}: ${name ? `environment variable ${name} is not set` : 'must be set with the other'}`,
        );
      return value ?? '';
    };
    credentials = { accessKeyId: read('accessKeyEnv'), secretAccessKey: read('secretKeyEnv') };
    if (problems.length > 0) throw new ConfigError(problems);
  }
  const { S3Driver } = await import('./s3-driver.js');
  return new S3Driver({
    bucket: s3.bucket,
    region: s3.region,
    endpoint: s3.endpoint,
    forcePathStyle: s3.forcePathStyle,
    prefix: s3.prefix,
    partSize: s3.partSize,
    ...(s3.spoolDir ? { spoolDir: resolve(s3.spoolDir) } : {}),
    ...(credentials ? { credentials } : {}),
  });
}

/** The key a start-up error about unusable storage names, with what it names. */
export function storageKey(storage: Config['storage']): string {
  return storage.driver === 's3'
    ? `storage.s3.bucket: cannot use ${JSON.stringify(storage.s3.bucket)}${storage.s3.endpoint ? ` at ${storage.s3.endpoint}` : ''}`
    : `storage.filesystem.root: cannot use ${JSON.stringify(resolve(storage.filesystem.root))}`;
}

/** Lets go of what a driver holds (an S3 client's sockets, its spool files). */
export async function closeDriver(driver: StorageDriver): Promise<void> {
  await (driver as Partial<{ close(): Promise<void> }>).close?.();
}
