/**
 * BlobFetch on real storage with an in-process upstream: the moment between the upload being
 * moved into place and the fetch knowing it is committed cannot be hit from outside on purpose.
 */
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { afterEach, expect, test } from 'vitest';
import { silentLogger } from '../../src/log/logger.js';
import { digestOf } from '../../src/oci/digest.js';
import { parseRepository } from '../../src/oci/reference.js';
import { BlobFetch } from '../../src/proxy/blob-fetch.js';
import { DriverBlobStore } from '../../src/storage/blob-store.js';
import { FilesystemDriver } from '../../src/storage/filesystem-driver.js';
import type { UpstreamClient } from '../../src/upstream/types.js';

const roots: string[] = [];
afterEach(() => roots.splice(0).forEach((r) => rmSync(r, { recursive: true, force: true })));

function upstreamServing(bytes: Buffer): UpstreamClient {
  return {
    name: 'fake',
    getBlob: async () => ({
      size: bytes.length,
      stream: Readable.from([bytes.subarray(0, 1000), bytes.subarray(1000)]),
    }),
  } as unknown as UpstreamClient;
}

test('a read of written bytes while the commit moves the upload into place waits and reads the blob', async () => {
  const root = mkdtempSync(join(tmpdir(), 'pullcache-fetch-'));
  roots.push(root);
  const blobs = new DriverBlobStore(new FilesystemDriver(root));
  const bytes = randomBytes(5000);
  let reachedCommit!: () => void;
  const atCommit = new Promise<void>((resolve) => (reachedCommit = resolve));
  let release!: () => void;
  const gate = new Promise<void>((resolve) => (release = resolve));
  const fetch = new BlobFetch({
    blobs,
    client: upstreamServing(bytes),
    repo: { upstream: 'docker.io', repository: parseRepository('a/b') },
    digest: digestOf(bytes),
    log: silentLogger(),
    orphanTimeout: 60_000,
    onCommitted: async () => {
      reachedCommit();
      await gate; // the upload is already moved; the fetch does not know it is committed yet
    },
  });
  await atCommit;
  expect(fetch.isCommitted()).toBe(false);
  const reading = fetch.readWritten(0, bytes.length);
  release();
  const chunks: Buffer[] = [];
  for await (const chunk of await reading) chunks.push(chunk as Buffer);
  expect(Buffer.concat(chunks).equals(bytes)).toBe(true);
  await fetch.done;
});

test('a client that follows a fetch which has already failed gets the error, not a hang', async () => {
  const root = mkdtempSync(join(tmpdir(), 'pullcache-fetch-'));
  roots.push(root);
  const bytes = randomBytes(3000);
  const broken = {
    name: 'fake',
    getBlob: async () => ({
      size: bytes.length,
      stream: Readable.from(
        (async function* () {
          yield bytes.subarray(0, 1000);
          throw new Error('upstream went away');
        })(),
      ),
    }),
  } as unknown as UpstreamClient;
  const fetch = new BlobFetch({
    blobs: new DriverBlobStore(new FilesystemDriver(root)),
    client: broken,
    repo: { upstream: 'docker.io', repository: parseRepository('a/b') },
    digest: digestOf(bytes),
    log: silentLogger(),
    orphanTimeout: 60_000,
    onCommitted: async () => {},
  });
  await fetch.ready;
  await expect(fetch.done).rejects.toThrow('upstream went away');
  const late = fetch.follow(0, bytes.length);
  await expect(
    (async () => {
      for await (const _ of late) void _;
    })(),
  ).rejects.toThrow('upstream went away');
});

test('a client reading from disk at its own pace gets every byte (no lost read request)', async () => {
  const root = mkdtempSync(join(tmpdir(), 'pullcache-fetch-'));
  roots.push(root);
  const bytes = randomBytes(24 * 1024 * 1024);
  const fetch = new BlobFetch({
    blobs: new DriverBlobStore(new FilesystemDriver(root)),
    client: upstreamServing(bytes),
    repo: { upstream: 'docker.io', repository: parseRepository('a/b') },
    digest: digestOf(bytes),
    log: silentLogger(),
    orphanTimeout: 60_000,
    onCommitted: async () => {},
  });
  await fetch.done;
  // Several clients with different paces: the socket drains at every moment of the disk reads,
  // including while a file stream is ending.
  const paces = [0, 1, 2, 3];
  const results = await Promise.all(
    paces.map(async (pace) => {
      const follower = fetch.follow(0, bytes.length);
      let received = 0;
      const stalled = new Promise<never>((_, reject) =>
        setTimeout(() => reject(new Error(`pace ${pace}: stalled at ${received}`)), 10_000).unref(),
      );
      const read = (async () => {
        const chunks: Buffer[] = [];
        for await (const chunk of follower) {
          chunks.push(chunk as Buffer);
          received += (chunk as Buffer).length;
          for (let i = 0; i < pace; i++) await new Promise((r) => setImmediate(r));
        }
        return Buffer.concat(chunks);
      })();
      return Promise.race([read, stalled]);
    }),
  );
  for (const body of results) expect(body.equals(bytes)).toBe(true);
});
