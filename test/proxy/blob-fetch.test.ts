/**
 * BlobFetch on real storage with an in-process upstream: the moment between the upload being
 * moved into place and the fetch knowing it is committed cannot be hit from outside on purpose.
 */
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable, Writable } from 'node:stream';
import { afterEach, expect, test } from 'vitest';
import { silentLogger } from '../../src/log/logger.js';
import { digestOf } from '../../src/oci/digest.js';
import { parseRepository } from '../../src/oci/reference.js';
import { BlobFetch } from '../../src/proxy/blob-fetch.js';
import { DriverBlobStore } from '../../src/storage/blob-store.js';
import { FilesystemDriver } from '../../src/storage/filesystem-driver.js';
import type { UpstreamClient } from '../../src/upstream/types.js';
import type { Lease } from '../../src/fleet/types.js';

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

/** A fetch of `bytes` from `client` into fresh storage (on `driverAt`'s driver when given). */
function fetchFrom(
  client: UpstreamClient,
  bytes: Buffer,
  onCommitted: () => Promise<void> = async () => {},
  driverAt: (root: string) => FilesystemDriver = (root) => new FilesystemDriver(root),
  lease?: Lease,
): BlobFetch {
  const root = mkdtempSync(join(tmpdir(), 'pullcache-fetch-'));
  roots.push(root);
  return new BlobFetch({
    blobs: new DriverBlobStore(driverAt(root)),
    client,
    repo: { upstream: 'docker.io', repository: parseRepository('a/b') },
    digest: digestOf(bytes),
    log: silentLogger(),
    orphanTimeout: 60_000,
    onCommitted,
    ...(lease ? { lease } : {}),
  });
}

test('a fetch nobody reads commits without reading its upload back: each byte is hashed once', async () => {
  const bytes = randomBytes(300_000);
  const reads: string[] = [];
  const fetch = fetchFrom(upstreamServing(bytes), bytes, undefined, (root) => {
    const driver = new FilesystemDriver(root);
    const reader = driver.reader.bind(driver);
    driver.reader = (path, offset, length) => {
      reads.push(path);
      return reader(path, offset, length);
    };
    return driver;
  });
  expect((await fetch.done).digest).toBe(digestOf(bytes));
  expect(reads).toEqual([]);
});

test('a read of written bytes while the commit moves the upload into place waits and reads the blob', async () => {
  const bytes = randomBytes(5000);
  let reachedCommit!: () => void;
  const atCommit = new Promise<void>((resolve) => (reachedCommit = resolve));
  let release!: () => void;
  const gate = new Promise<void>((resolve) => (release = resolve));
  const fetch = fetchFrom(upstreamServing(bytes), bytes, async () => {
    reachedCommit();
    await gate; // the upload is already moved; the fetch does not know it is committed yet
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
  const fetch = fetchFrom(broken, bytes);
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
  const bytes = randomBytes(24 * 1024 * 1024);
  const fetch = fetchFrom(upstreamServing(bytes), bytes);
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

test('sendTo serves a running fetch to a late joiner from the disk through two reused buffers, and lets go when its client leaves while waiting', async () => {
  const MiB = 1024 * 1024;
  const bytes = randomBytes(6 * MiB);
  // An upstream that sends 1 MiB every 20 ms, so the clients keep waiting for the disk.
  async function* slowly() {
    for (let o = 0; o < bytes.length; o += MiB) {
      await new Promise((r) => setTimeout(r, 20));
      yield bytes.subarray(o, o + MiB);
    }
  }
  const slow = {
    name: 'fake',
    getBlob: async () => ({ size: bytes.length, stream: Readable.from(slowly()) }),
  } as unknown as UpstreamClient;
  const fetch = fetchFrom(slow, bytes);
  await fetch.ready;
  const whole = client(() => 0);
  const tail = client(() => 0);
  const leaving = client(() => 0);
  const sending = [
    fetch.follow(0, bytes.length).sendTo(whole.dest),
    fetch.follow(5 * MiB, bytes.length).sendTo(tail.dest),
  ];
  const left = fetch.follow(0, bytes.length).sendTo(leaving.dest);
  await new Promise((r) => setTimeout(r, 30));
  leaving.dest.destroy(); // the client goes away while its follower waits for the disk
  await expect(left).rejects.toMatchObject({ code: 'ERR_STREAM_PREMATURE_CLOSE' });
  expect(fetch.state).toBe('running'); // it let go at once, not when the blob was complete
  await Promise.all(sending);
  expect(Buffer.concat(whole.chunks).equals(bytes)).toBe(true);
  expect(Buffer.concat(tail.chunks).equals(bytes.subarray(5 * MiB))).toBe(true);
  expect(new Set(whole.memory).size).toBeLessThanOrEqual(2);
  expect(whole.chunks.length).toBeGreaterThan(2);
  await fetch.done;
});

/** An upstream that sends `bytes` 1 MiB every `ms`. */
function pacedUpstream(bytes: Buffer, ms: number): UpstreamClient {
  async function* paced() {
    for (let o = 0; o < bytes.length; o += 1024 * 1024) {
      await new Promise((r) => setTimeout(r, ms));
      yield bytes.subarray(o, o + 1024 * 1024);
    }
  }
  return {
    name: 'fake',
    getBlob: async () => ({ size: bytes.length, stream: Readable.from(paced()) }),
  } as unknown as UpstreamClient;
}

/**
 * A client socket stand-in: it copies what it is given, as a socket does; its nth write takes
 * `delayMs(n)`, or until the promise `delay(n)` gives settles; it notes the memory each write was
 * given.
 */
function client(delay: (n: number) => number | Promise<void>) {
  const chunks: Buffer[] = [];
  const memory: ArrayBufferLike[] = [];
  const dest = new Writable({
    write(chunk: Buffer, _enc, done) {
      chunks.push(Buffer.from(chunk));
      memory.push(chunk.buffer);
      const d = delay(chunks.length);
      if (typeof d === 'number') setTimeout(done, d);
      else void d.then(() => done());
    },
  });
  return { dest, chunks, memory };
}

/** Where each read of `fetch`'s written bytes starts, as they are asked for. */
function readsOf(fetch: BlobFetch): number[] {
  const reads: number[] = [];
  const readWritten = fetch.readWritten.bind(fetch);
  fetch.readWritten = (offset, length) => {
    reads.push(offset);
    return readWritten(offset, length);
  };
  return reads;
}

test('a client that keeps up is sent the chunks as they arrive, nothing read back but the last byte, from the upload', async () => {
  const bytes = randomBytes(6 * 1024 * 1024);
  const fetch = fetchFrom(pacedUpstream(bytes, 20), bytes);
  await fetch.ready;
  const reads = readsOf(fetch);
  const c = client(() => 0);
  await fetch.follow(0, bytes.length).sendTo(c.dest);
  expect(Buffer.concat(c.chunks).equals(bytes)).toBe(true);
  // The received chunks themselves (the upstream's memory here), but the last byte, held until
  // the digest was checked: read from the upload, opened once while it ran.
  expect(c.memory.slice(0, -1).every((m) => m === bytes.buffer)).toBe(true);
  expect(c.memory.at(-1)).not.toBe(bytes.buffer);
  expect(reads.length).toBe(1);
  expect(reads[0]).toBeLessThan(bytes.length - 1);
  await fetch.done;
});

test('a client that pushes back is sent the rest from the disk, and the chunks again once caught up', async () => {
  const MiB = 1024 * 1024;
  // Long enough that the client, once fast, catches up well before the end, however busy the
  // machine.
  const bytes = randomBytes(24 * MiB);
  const fetch = fetchFrom(pacedUpstream(bytes, 15), bytes);
  await fetch.ready;
  const reads = readsOf(fetch);
  // Its first write takes until the upstream has sent a third of the blob (behind, whatever the
  // timers do on a busy machine), then it is fast: it catches up while the upstream still sends.
  const behind = async () => {
    while (fetch.received < 8 * MiB) await new Promise((r) => setTimeout(r, 5));
  };
  const c = client((n) => (n === 1 ? behind() : 0));
  await fetch.follow(0, bytes.length).sendTo(c.dest);
  expect(Buffer.concat(c.chunks).equals(bytes)).toBe(true);
  // Live first and again at the end (the upstream's memory), from the disk in between (the
  // reused buffers).
  const live = c.memory.map((m) => m === bytes.buffer);
  expect(live[0]).toBe(true);
  expect(live.includes(false)).toBe(true);
  expect(live.at(-2)).toBe(true);
  // One open upload for the whole response, read on from wherever the live chunks ended.
  expect(reads.length).toBe(1);
  await fetch.done;
});

test('the lease tells the other processes that the fetch is committing once every byte is written, before the commit', async () => {
  const bytes = randomBytes(300_000);
  const told: string[] = [];
  let written = 0;
  const lease: Lease = {
    started: () => told.push('started'),
    progress: (n) => void (written = n),
    committing: () => told.push(`committing, ${written} written`),
    committed: (size) => told.push(`committed ${size}`),
    failed: (reason) => told.push(`failed: ${reason}`),
  };
  let commits = 0;
  const fetch = fetchFrom(
    upstreamServing(bytes),
    bytes,
    async () => {
      commits++;
      expect(told.at(-1)).toBe(`committing, ${bytes.length} written`);
    },
    undefined,
    lease,
  );
  await fetch.done;
  expect(commits).toBe(1);
  expect(told).toEqual([
    'started',
    `committing, ${bytes.length} written`,
    `committed ${bytes.length}`,
  ]);
});
