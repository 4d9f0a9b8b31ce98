/**
 * The storage drivers a suite runs on: `describe.each(DRIVERS)` and `useStorage(kind)` inside,
 * which gives each test fresh, empty storage: a temporary directory, or a fresh key prefix in a
 * bucket of the file's own radosgw (started once per file, see s3.ts).
 */
import { randomUUID } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, beforeEach } from 'vitest';
import { FilesystemDriver } from '../../src/storage/filesystem-driver.js';
import { S3Driver } from '../../src/storage/s3-driver.js';
import type { StorageDriver } from '../../src/storage/types.js';
import { startS3, type TestS3 } from './s3.js';

export type DriverKind = 'filesystem' | 's3';
export const DRIVERS: DriverKind[] = ['filesystem', 's3'];

/** The environment variables the test configs name for the S3 key (never the key itself). */
export const S3_KEY_ENV = 'PULLCACHE_TEST_S3_ACCESS_KEY';
export const S3_SECRET_ENV = 'PULLCACHE_TEST_S3_SECRET_KEY';

export interface TestStorage {
  kind: DriverKind;
  /** A new driver instance on this test's storage (a new process, as far as drivers know). */
  open(options?: { partSize?: number }): StorageDriver;
  /** The `storage` section of a pullcache config for this test's storage. */
  config(): Record<string, unknown>;
  /** The `storage` section for another, empty storage of the same kind (removed afterwards). */
  another(): Record<string, unknown>;
  /** The test's radosgw (s3 only). */
  readonly s3: TestS3 | undefined;
  readonly bucket: string | undefined;
  readonly prefix: string | undefined;
  /** The directory (filesystem only). */
  readonly root: string | undefined;
}

/**
 * Registers the hooks that give every test of the enclosing describe its own storage, or with
 * `scope: 'file'` one storage for all of them (a suite that shares one server across its tests).
 */
export function useStorage(
  kind: DriverKind,
  options: { scope?: 'test' | 'file' } = {},
): TestStorage {
  let s3: TestS3 | undefined;
  let bucket: string | undefined;
  let prefix: string | undefined;
  let root: string | undefined;
  let opened: StorageDriver[] = [];
  if (kind === 's3') {
    beforeAll(async () => {
      s3 = await startS3();
      bucket = await s3.bucket();
      process.env[S3_KEY_ENV] = s3.accessKey;
      process.env[S3_SECRET_ENV] = s3.secretKey;
    }, 120_000);
    afterAll(async () => {
      await s3?.stop();
    });
  }
  const made: string[] = [];
  const fresh = () => {
    if (kind === 's3') prefix = `t-${randomUUID()}/`;
    else made.push((root = mkdtempSync(join(tmpdir(), 'pullcache-storage-'))));
  };
  const cleanup = async () => {
    for (const driver of opened) if (driver instanceof S3Driver) await driver.close();
    opened = [];
    for (const dir of made.splice(0)) rmSync(dir, { recursive: true, force: true });
    root = undefined;
  };
  if (options.scope === 'file') {
    beforeAll(fresh);
    afterAll(cleanup);
  } else {
    beforeEach(fresh);
    afterEach(cleanup);
  }
  return {
    kind,
    get s3() {
      return s3;
    },
    get bucket() {
      return bucket;
    },
    get prefix() {
      return prefix;
    },
    get root() {
      return root;
    },
    open(options = {}) {
      const driver: StorageDriver =
        kind === 's3'
          ? new S3Driver({
              bucket: bucket!,
              region: 'us-east-1',
              endpoint: s3!.endpoint,
              forcePathStyle: true,
              prefix: prefix!,
              credentials: { accessKeyId: s3!.accessKey, secretAccessKey: s3!.secretKey },
              partSize: options.partSize ?? 5 * 1024 * 1024,
            })
          : new FilesystemDriver(root!);
      opened.push(driver);
      return driver;
    },
    another() {
      const [savedPrefix, savedRoot] = [prefix, root];
      fresh();
      const config = this.config();
      [prefix, root] = [savedPrefix, savedRoot];
      return config;
    },
    config() {
      return kind === 's3'
        ? {
            driver: 's3',
            s3: {
              bucket,
              endpoint: s3!.endpoint,
              forcePathStyle: true,
              prefix,
              accessKeyEnv: S3_KEY_ENV,
              secretKeyEnv: S3_SECRET_ENV,
              partSize: '5MiB',
            },
          }
        : { driver: 'filesystem', filesystem: { root } };
    },
  };
}
