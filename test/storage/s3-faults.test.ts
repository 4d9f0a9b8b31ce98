/**
 * The S3 driver's failures (a real Ceph radosgw): a spool directory that cannot take a blob,
 * failures of the store that are unavailability (503), never an internal error (500), nor a
 * missing key, the multipart part limit, and presigned reads outliving their credentials. A proxy
 * in front of radosgw makes the faults it cannot be made to produce (a body cut short, an
 * ExpiredToken answer).
 */
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import {
  AbortMultipartUploadCommand,
  HeadObjectCommand,
  ListMultipartUploadsCommand,
} from '@aws-sdk/client-s3';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { silentLogger } from '../../src/log/logger.js';
import { digestOf, parseDigest } from '../../src/oci/digest.js';
import { parseRepository, parseTag } from '../../src/oci/reference.js';
import { BlobFetch } from '../../src/proxy/blob-fetch.js';
import { DriverBlobStore } from '../../src/storage/blob-store.js';
import { DriverRepositoryStore } from '../../src/storage/repository-store.js';
import { ImageGraph } from '../../src/lifecycle/image-graph.js';
import { scanStorage } from '../../src/lifecycle/scan.js';
import { paths } from '../../src/storage/paths.js';
import { S3Driver, type S3DriverOptions } from '../../src/storage/s3-driver.js';
import type { RepositoryStore } from '../../src/storage/types.js';
import { PathNotFoundError, StorageUnavailableError } from '../../src/storage/errors.js';
import type { UpstreamClient } from '../../src/upstream/types.js';
import { ociError } from '../helpers/http.js';
import { makeImage, ociManifest, pushImage, sha256, type Image } from '../helpers/images.js';
import { waitFor } from '../helpers/net.js';
import { capturedLog, startPullcache, type TestPullcache } from '../helpers/pullcache.js';
import { TestRegistry } from '../helpers/registry.js';
import { skopeoCopy } from '../helpers/skopeo.js';
import { s3FaultProxy } from '../helpers/s3-fault-proxy.js';
import { useStorage } from '../helpers/storage-drivers.js';

const MiB = 1024 * 1024;

let registry: TestRegistry;
let small: Image;
let big: Image;

beforeAll(async () => {
  registry = await TestRegistry.start();
  small = makeImage('library/alpine', '3.20', 'oci', [200_000, 30_000]);
  big = makeImage('org/big', 'v1', 'oci', [14 * MiB, 100_000]);
  for (const image of [small, big]) await pushImage(registry, image);
}, 120_000);
afterAll(async () => {
  await registry?.close();
});

const storage = useStorage('s3');
const s3 = () => storage.s3!;

/** A driver on the test's storage, through `endpoint` when given (a fault proxy). */
function driver(options: Partial<S3DriverOptions> = {}): S3Driver {
  return new S3Driver({
    bucket: storage.bucket!,
    region: 'us-east-1',
    endpoint: s3().endpoint,
    forcePathStyle: true,
    prefix: storage.prefix!,
    credentials: { accessKeyId: s3().accessKey, secretAccessKey: s3().secretKey },
    partSize: 5 * MiB,
    ...options,
  });
}

async function objectExists(key: string): Promise<boolean> {
  try {
    await s3().client.send(new HeadObjectCommand({ Bucket: storage.bucket!, Key: key }));
    return true;
  } catch {
    return false;
  }
}

/** A failure, or a fail of the test when there is none. */
async function failure(promise: Promise<unknown>): Promise<unknown> {
  return promise.then(
    () => expect.fail('expected a failure'),
    (err: unknown) => err,
  );
}

describe('the spool directory', () => {
  test('full: a fetch answers 503 saying so, the log names it once, and nothing is evicted from the bucket', async () => {
    const spool = mkdtempSync(join(tmpdir(), 'pullcache-spool-test-'));
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', spool]);
    const captured = capturedLog('info');
    const config = storage.config() as { s3: Record<string, unknown> };
    let pc: TestPullcache | undefined;
    try {
      pc = await startPullcache(
        {
          storage: { ...config, s3: { ...config.s3, spoolDir: spool } },
          upstreams: { 'docker.io': { url: registry.url, tagTTL: '1h' } },
        },
        undefined,
        { log: captured.log },
      );
      // Stored first: what a "storage is full" would evict.
      const pulled = mkdtempSync(join(tmpdir(), 'pullcache-s3-faults-'));
      await skopeoCopy(pc.host, 'library/alpine:3.20', pulled);
      rmSync(pulled, { recursive: true, force: true });
      const stored = small.blobs.map(
        (b) => storage.prefix + paths.blobData(parseDigest(b.digest).digest),
      );
      for (const key of stored) expect(await objectExists(key)).toBe(true);
      // About 7 MiB, in a spool of 1 MiB: the first fetch may have answered its headers before
      // the spool filled (then it is cut); the next is refused before it answers anything.
      const layer = big.blobs[1]!;
      await fetch(`${pc.url}/v2/org/big/blobs/${layer.digest}`)
        .then((r) => r.arrayBuffer())
        .catch(() => undefined);
      const res = await fetch(`${pc.url}/v2/org/big/blobs/${layer.digest}`);
      // Nothing evicted: a full local spool is not a full bucket.
      await new Promise((resolve) => setTimeout(resolve, 1500));
      expect(captured.lines.filter((l) => /storage is full/.test(String(l.msg)))).toEqual([]);
      for (const key of stored) expect(await objectExists(key)).toBe(true);
      expect(res.status).toBe(503);
      expect(res.headers.get('retry-after')).toBe('10');
      const body = (await res.clone().json()) as { errors: { message: string }[] };
      expect(await ociError(res)).toBe('UNAVAILABLE');
      // The reason, not the server's paths: the log line names the directory.
      expect(body.errors[0]!.message).toContain('the spool directory cannot take the blob');
      expect(body.errors[0]!.message).not.toContain(spool);
      expect(body.errors[0]!.message).toMatch(/it is full \(ENOSPC\)/);
      const logged = captured.lines.filter((l) =>
        /spool directory cannot take/.test(String(l.msg)),
      );
      expect(logged).toHaveLength(1);
      expect(logged[0]).toMatchObject({ spoolDir: spool });
    } finally {
      try {
        await pc?.stop();
      } finally {
        execFileSync('umount', [spool]);
        rmSync(spool, { recursive: true, force: true });
      }
    }
  }, 60_000);
});

describe('the count of storage', () => {
  test('lists each upstream once, not a few listings per repository, and counts the same', async () => {
    const d = driver({ prefix: `${storage.prefix}count-${randomBytes(4).toString('hex')}/` });
    try {
      const blobs = new DriverBlobStore(d, { deleteEnabled: true });
      const repositories = new DriverRepositoryStore(d);
      const mediaType = 'application/vnd.oci.image.manifest.v1+json';
      const names = ['org/a', 'org/b/c', 'library/x', 'org/b'];
      for (const [i, name] of names.entries()) {
        const repo = { upstream: 'docker.io', repository: parseRepository(name) };
        for (let j = 0; j < 2; j++) {
          const config = Buffer.from(`{"architecture":"amd64","os":"linux","n":"${i}-${j}"}`);
          const layer = randomBytes(1000);
          const manifest = ociManifest({ digest: sha256(config), size: config.length }, [
            { digest: sha256(layer), size: layer.length },
          ]);
          const digest = parseDigest(sha256(manifest)).digest;
          for (const bytes of [config, layer]) {
            const d2 = parseDigest(sha256(bytes)).digest;
            await blobs.put(bytes, d2);
            await repositories.linkBlob(repo, { digest: d2, size: bytes.length });
          }
          await blobs.put(manifest, digest, mediaType);
          await repositories.linkManifest(repo, { digest, mediaType, size: manifest.length });
          await repositories.setTag(repo, parseTag(`v${j}`), { digest, confirmedAt: Date.now() });
        }
      }
      const count = async (store: RepositoryStore) => {
        const graph = new ImageGraph();
        const log = silentLogger();
        const counted = await scanStorage({
          graph,
          blobs,
          repositories: store,
          upstreams: ['docker.io'],
          log,
        });
        return { graph, counted };
      };
      const shape = (graph: ImageGraph) =>
        [...graph.repositories.values()]
          .map((r) => ({
            repo: r.key.repository,
            links: [...r.links].sort(),
            tags: [...r.tags].sort(),
            manifests: [...r.manifests.values()]
              .map((m) => [m.digest, [...m.blobs].sort(), m.pulledAt])
              .sort(),
          }))
          .sort((a, b) => a.repo.localeCompare(b.repo));
      const lists = () => d.requests.get('ListObjectsV2Command') ?? 0;
      const before = lists();
      const flat = await count(repositories);
      // One listing of the blobs and one of the upstream (each a request per 1,000 keys).
      expect(lists() - before).toBe(2);
      // The same storage counted repository by repository (the filesystem's way).
      const perRepository = Object.assign(Object.create(repositories) as RepositoryStore, {
        listUpstream: undefined,
      });
      const walked = await count(perRepository);
      expect(lists() - before).toBeGreaterThan(2 + 4 * names.length);
      expect(flat.counted).toEqual(walked.counted);
      expect(shape(flat.graph)).toEqual(shape(walked.graph));
      expect(shape(flat.graph).map((r) => r.repo)).toEqual([...names].sort());
    } finally {
      await d.close();
    }
  });
});

describe('a write cancelled while it writes', () => {
  test('is no failure of the spool directory: the next write is taken', async () => {
    const d = driver();
    try {
      for (let i = 0; i < 5; i++) {
        const writer = await d.writer(`cancelled-${i}`, false);
        // Past one part: a part is read back from the spool file while the cancel closes it.
        const writing = writer.write(randomBytes(12 * MiB));
        await writer.cancel();
        await writing.catch(() => {});
        // Not refused as "the spool directory cannot take the blob" for the next 10 s.
        const next = await d.writer(`after-${i}`, false);
        await next.write(Buffer.from('whole'));
        await next.close();
        expect((await d.getContent(`after-${i}`)).toString()).toBe('whole');
      }
    } finally {
      await d.close();
    }
  });
});

describe('a blob larger than the whole budget', () => {
  test('is streamed to its client from the spool, and never uploaded to the bucket', async () => {
    const pc = await startPullcache({
      storage: storage.config(),
      upstreams: { 'docker.io': { url: registry.url, tagTTL: '1h' } },
      retention: { maxSize: '4MiB' },
    });
    try {
      const driver = pc.runtime.driver as S3Driver;
      const layer = big.blobs[1]!; // 14 MiB (blobs[0] is the config)
      const res = await fetch(`${pc.url}/v2/org/big/blobs/${layer.digest}`);
      expect(res.status).toBe(200);
      expect(sha256(Buffer.from(await res.arrayBuffer()))).toBe(sha256(layer.bytes));
      await pc.runtime.lifecycle.settle();
      expect(
        await objectExists(storage.prefix + paths.blobData(parseDigest(layer.digest).digest)),
      ).toBe(false);
      // 14 MiB in 5 MiB parts: a multipart upload of two parts and the rest, had it been sent.
      expect(driver.requests.get('CreateMultipartUploadCommand') ?? 0).toBe(0);
      expect(driver.requests.get('UploadPartCommand') ?? 0).toBe(0);
    } finally {
      await pc.stop();
    }
  });
});

describe('failures of the store are unavailability (503)', () => {
  test('a missing bucket is not a missing key, and the error names the key and request id', async () => {
    const d = driver({ bucket: 'pullcache-no-such-bucket' });
    try {
      const read = await failure(d.getContent('some/file'));
      expect(read).toBeInstanceOf(StorageUnavailableError);
      expect((read as Error).message).toMatch(/NoSuchBucket \(HTTP 404\)/);
      expect(read).toMatchObject({ key: `${storage.prefix!}some/file` });
      expect((read as StorageUnavailableError).requestId).toMatch(/.+/);
      const range = await failure(d.readRange('some/file', 0));
      expect(range).toBeInstanceOf(StorageUnavailableError);
      expect((range as Error).message).toMatch(/NoSuchBucket \(HTTP 404\)/);
    } finally {
      await d.close();
    }
  });

  test('an upload gone from under a write (NoSuchUpload) fails its close as unavailable', async () => {
    const d = driver();
    try {
      const writer = await d.writer('uploads/x/data', false);
      await writer.write(randomBytes(6 * MiB)); // one part uploaded: the upload exists
      await waitFor(async () => (await uploads()).length > 0, 'the multipart upload');
      const gone = await uploads();
      for (const u of gone)
        await s3().client.send(
          new AbortMultipartUploadCommand({
            Bucket: storage.bucket!,
            Key: u.Key!,
            UploadId: u.UploadId!,
          }),
        );
      const closed = await failure(writer.close());
      expect(closed).toBeInstanceOf(StorageUnavailableError);
      expect((closed as Error).message).toMatch(/NoSuchUpload \(HTTP 404\)/);
      // Aborting one that is gone already is no error.
      for (const u of gone) await d.abortUpload(u.Key!, u.UploadId!);
      // A missing key stays what it is.
      expect(await failure(d.getContent('nothing/here'))).toBeInstanceOf(PathNotFoundError);
      expect(await d.readRange('nothing/here', 0)).toBeUndefined();
    } finally {
      await d.close();
    }
  });

  test('a connection cut in the middle of a body is unavailable', async () => {
    const proxy = await s3FaultProxy(s3().endpoint, (req) =>
      req.method === 'GET' ? 'cut' : undefined,
    );
    const d = driver({ endpoint: proxy.endpoint, maxAttempts: 1 });
    try {
      await d.putContent('file', randomBytes(4 * MiB));
      const read = await failure(d.getContent('file'));
      expect(read).toBeInstanceOf(StorageUnavailableError);
      expect((read as Error).message).toMatch(/^storage is unavailable: cannot read: /);
    } finally {
      await d.close();
      proxy.close();
    }
  });

  test('no credentials to sign a redirect with is unavailable', async () => {
    const d = driver({
      credentials: () => {
        const err = new Error('Could not load credentials from any providers');
        err.name = 'CredentialsProviderError';
        return Promise.reject(err);
      },
    });
    try {
      const signed = await failure(d.presignedUrl('blobs/x', 60));
      expect(signed).toBeInstanceOf(StorageUnavailableError);
      expect((signed as Error).message).toMatch(/cannot sign a URL/);
    } finally {
      await d.close();
    }
  });
});

describe('the multipart part limit', () => {
  // A store that takes 4 parts (S3 takes 10,000): 5 MiB parts would need 8 for 40 MiB.
  const maxParts = 4;
  const parts = (d: S3Driver) => d.requests.get('UploadPartCommand') ?? 0;
  /** The sizes of the parts `d` uploads, in MiB, in the order they are sent. */
  const partSizes = (d: S3Driver) => {
    const sizes: number[] = [];
    d.client.middlewareStack.add(
      (next, context) => (args) => {
        if (context.commandName === 'UploadPartCommand')
          sizes.push((args.input as { Body: Buffer }).Body.length / MiB);
        return next(args);
      },
      { step: 'initialize', name: 'testPartSizes' },
    );
    return sizes;
  };

  test('a write of a known size fits in the parts the store takes, in parts of one size', async () => {
    const d = driver({ maxParts });
    try {
      const bytes = randomBytes(40 * MiB);
      const sizes = partSizes(d);
      const writer = await d.writer('sized', false, { size: bytes.length });
      for (let i = 0; i < bytes.length; i += MiB) await writer.write(bytes.subarray(i, i + MiB));
      await writer.close();
      expect(parts(d)).toBeLessThanOrEqual(maxParts);
      expect(sizes).toEqual([10, 10, 10, 10]);
      expect(sha256(await d.getContent('sized'))).toBe(sha256(bytes));
    } finally {
      await d.close();
    }
  });

  test('a fetched blob tells the store its size before the first part: parts of one size', async () => {
    const d = driver({ maxParts });
    try {
      const bytes = randomBytes(40 * MiB);
      const sizes = partSizes(d);
      // An upstream in-process: what matters is the size it announces before the body.
      const client = {
        name: 'fake',
        getBlob: async () => ({
          size: bytes.length,
          stream: Readable.from(
            Array.from({ length: 40 }, (_, i) => bytes.subarray(i * MiB, (i + 1) * MiB)),
          ),
        }),
      } as unknown as UpstreamClient;
      const fetch = new BlobFetch({
        blobs: new DriverBlobStore(d),
        client,
        repo: { upstream: 'docker.io', repository: parseRepository('org/big') },
        digest: digestOf(bytes),
        log: silentLogger(),
        orphanTimeout: 60_000,
        onCommitted: async () => {},
      });
      expect((await fetch.done).size).toBe(bytes.length);
      // Not knowing it, the parts would double from 5 MiB at each part (maxParts < 10).
      expect(sizes).toEqual([10, 10, 10, 10]);
    } finally {
      await d.close();
    }
  });

  test('a write of an unknown size grows its parts before the limit', async () => {
    const d = driver({ maxParts });
    try {
      const bytes = randomBytes(40 * MiB);
      const writer = await d.writer('unsized', false);
      for (let i = 0; i < bytes.length; i += MiB) await writer.write(bytes.subarray(i, i + MiB));
      await writer.close();
      expect(parts(d)).toBeLessThanOrEqual(maxParts);
      expect(sha256(await d.getContent('unsized'))).toBe(sha256(bytes));
    } finally {
      await d.close();
    }
  });
});

describe('presigned reads and expiring credentials', () => {
  test('a read answered 400 ExpiredToken is signed afresh and served', async () => {
    let expired = 0;
    const proxy = await s3FaultProxy(s3().endpoint, (req) => {
      // The first presigned GET (undici's: signed in its query) as if its token had expired.
      if (req.method !== 'GET' || !req.url?.includes('X-Amz-Signature') || expired > 0)
        return undefined;
      expired++;
      return { status: 400, code: 'ExpiredToken' };
    });
    const d = driver({ endpoint: proxy.endpoint });
    try {
      await d.putContent('blob', 'stored bytes');
      const read = await d.readRange('blob', 0);
      expect(read).toBeDefined();
      expect(read!.size).toBe(12);
      let text = '';
      for await (const chunk of read!.stream) text += (chunk as Buffer).toString();
      expect(text).toBe('stored bytes');
      expect(expired).toBe(1);
    } finally {
      await d.close();
      proxy.close();
    }
  });

  test('a kept read URL does not outlive the credentials it was signed with', async () => {
    const signedAt: string[] = [];
    const proxy = await s3FaultProxy(s3().endpoint, (req) => {
      const date = /X-Amz-Date=([0-9TZ]+)/.exec(req.url ?? '')?.[1];
      if (req.method === 'GET' && date) signedAt.push(date);
      return undefined;
    });
    // Credentials that expire in 30 s (less than the margin): a URL signed with them is used
    // once, not kept for minutes.
    const d = driver({
      endpoint: proxy.endpoint,
      credentials: () =>
        Promise.resolve({
          accessKeyId: s3().accessKey,
          secretAccessKey: s3().secretKey,
          expiration: new Date(Date.now() + 30_000),
        }),
    });
    try {
      await d.putContent('blob', 'stored');
      for (let i = 0; i < 2; i++) {
        const read = await d.readRange('blob', 0);
        for await (const _ of read!.stream);
        // Signing times are whole seconds: the second read is signed in another one.
        await new Promise((resolve) => setTimeout(resolve, 1100));
      }
      expect(signedAt).toHaveLength(2);
      expect(signedAt[0]).not.toBe(signedAt[1]);
    } finally {
      await d.close();
      proxy.close();
    }
  });
});

/** The multipart uploads under way under the test's prefix. */
async function uploads() {
  const { Uploads } = await s3().client.send(
    new ListMultipartUploadsCommand({ Bucket: storage.bucket!, Prefix: storage.prefix! }),
  );
  return Uploads ?? [];
}
