/**
 * pullcache on S3 (a real Ceph radosgw): redirect mode with a real client, S3 requests per pull,
 * the object store going away and coming back, refusing with 503 SlowDown, and a process killed
 * in the middle of an upload.
 */
import { spawn } from 'node:child_process';
import { createServer, request as httpRequest, type Server } from 'node:http';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  HeadObjectCommand,
  ListMultipartUploadsCommand,
  ListObjectsV2Command,
} from '@aws-sdk/client-s3';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import type { Logger } from '../../src/log/logger.js';
import { parseDigest } from '../../src/oci/digest.js';
import { paths } from '../../src/storage/paths.js';
import { S3Driver } from '../../src/storage/s3-driver.js';
import { StorageUnavailableError } from '../../src/storage/errors.js';
import { TestDockerd } from '../helpers/dockerd.js';
import { ociError } from '../helpers/http.js';
import { makeImage, pushImage, sha256, type Image } from '../helpers/images.js';
import { freePort, waitFor } from '../helpers/net.js';
import { capturedLog, startPullcache, type TestPullcache } from '../helpers/pullcache.js';
import { TestRegistry } from '../helpers/registry.js';
import { expectDirHolds, skopeoCopy } from '../helpers/skopeo.js';
import { s3FaultProxy } from '../helpers/s3-fault-proxy.js';
import { useStorage } from '../helpers/storage-drivers.js';

const tmp = () => mkdtempSync(join(tmpdir(), 'pullcache-s3-'));

let registry: TestRegistry;
let small: Image;
let big: Image;
let slowImage: Image;

beforeAll(async () => {
  registry = await TestRegistry.start();
  small = makeImage('library/alpine', '3.20', 'oci', [200_000, 30_000]);
  // Past one part (5 MiB here) once compressed (about half): a multipart upload.
  big = makeImage('org/big', 'v1', 'oci', [14 * 1024 * 1024, 100_000]);
  slowImage = makeImage('org/slow', 'v1', 'oci', [40 * 1024 * 1024]);
  for (const image of [small, big, slowImage]) await pushImage(registry, image);
}, 120_000);
afterAll(async () => {
  await registry?.close();
});

const storage = useStorage('s3');
const s3 = () => storage.s3!;
const driverOf = (pc: TestPullcache) => pc.runtime.driver as S3Driver;

async function objectExists(key: string): Promise<boolean> {
  try {
    await s3().client.send(new HeadObjectCommand({ Bucket: storage.bucket!, Key: key }));
    return true;
  } catch {
    return false;
  }
}

/** The keys of the multipart uploads under way in the test's storage. */
async function multipartUploads(): Promise<string[]> {
  const { Uploads } = await s3().client.send(
    new ListMultipartUploadsCommand({ Bucket: storage.bucket!, Prefix: storage.prefix! }),
  );
  return (Uploads ?? []).map((u) => u.Key!);
}

function start(
  extra: Record<string, unknown> = {},
  s3Extra: Record<string, unknown> = {},
  log?: Logger,
) {
  const config = storage.config() as { s3: Record<string, unknown> };
  return startPullcache(
    {
      ...extra,
      storage: { ...config, s3: { ...config.s3, ...s3Extra } },
      upstreams: { 'docker.io': { url: registry.url, tagTTL: '1h' } },
    },
    undefined,
    log ? { log } : undefined,
  );
}

describe('start-up', () => {
  test('a bad S3 setting stops start-up naming its key', async () => {
    const s3config = (storage.config() as { s3: Record<string, unknown> }).s3;
    const upstreams = { 'docker.io': { url: registry.url } };
    const startWith = (s3: Record<string, unknown>) =>
      startPullcache({ storage: { driver: 's3', s3: { ...s3config, ...s3 } }, upstreams });
    await expect(startWith({ partSize: '1MiB' })).rejects.toThrow(/storage\.s3\.partSize/);
    // S3 takes parts up to 5 GiB; a part is read into one Buffer, 4 GiB at most on Node 20.
    await expect(startWith({ partSize: '5GiB' })).rejects.toThrow(
      'storage.s3.partSize: expected at most 4GiB',
    );
    await expect(startWith({ accessKeyEnv: 'PULLCACHE_TEST_UNSET_VARIABLE' })).rejects.toThrow(
      'storage.s3.accessKeyEnv: environment variable PULLCACHE_TEST_UNSET_VARIABLE is not set',
    );
    await expect(startWith({ bucket: 'no-such-bucket' })).rejects.toThrow(
      `storage.s3.bucket: cannot use "no-such-bucket" at ${s3().endpoint}: storage is unavailable`,
    );
    await expect(startWith({ secretKeyEnv: 'PATH' })).rejects.toThrow(/HTTP 403/);
  });
});

describe('redirect mode', () => {
  test('skopeo pulls a cached image through 307s to presigned URLs that carry no secret', async () => {
    const pc = await start({}, { redirect: true, redirectTTL: '5m' });
    try {
      // A miss is streamed by pullcache itself (and kept).
      await skopeoCopy(pc.host, 'library/alpine:3.20', tmp());
      const layer = small.blobs[1]!;
      const res = await fetch(`${pc.url}/v2/library/alpine/blobs/${layer.digest}`, {
        redirect: 'manual',
      });
      expect(res.status).toBe(307);
      const location = new URL(res.headers.get('location')!);
      expect(location.origin).toBe(s3().endpoint);
      expect(location.searchParams.get('X-Amz-Signature')).toMatch(/^[0-9a-f]{64}$/);
      expect(location.searchParams.get('X-Amz-Expires')).toBe('300');
      expect(location.href).not.toContain(s3().secretKey);
      // The object store answers it, ranges included.
      const direct = await fetch(location, { headers: { range: 'bytes=10-19' } });
      expect(direct.status).toBe(206);
      expect(Buffer.from(await direct.arrayBuffer()).equals(layer.bytes.subarray(10, 20))).toBe(
        true,
      );
      // A real client follows it: byte-equal, and pullcache read no blob from storage for it.
      const before = driverOf(pc).requests.get('GetObjectCommand') ?? 0;
      const dir = tmp();
      await skopeoCopy(pc.host, 'library/alpine:3.20', dir);
      expectDirHolds(dir, small);
      expect(driverOf(pc).requests.get('GetObjectCommand') ?? 0).toBe(before);
      // A repository that does not hold the blob gets no URL for it (and no bytes).
      const other = await fetch(`${pc.url}/v2/org/big/blobs/${layer.digest}`, {
        redirect: 'manual',
      });
      expect(other.status).not.toBe(307);
      // Several ranges are served here (S3 takes one per GET): a part each, in the order asked.
      const parts = await fetch(`${pc.url}/v2/library/alpine/blobs/${layer.digest}`, {
        redirect: 'manual',
        headers: { range: 'bytes=0-9,100-109' },
      });
      expect(parts.status).toBe(206);
      expect(parts.headers.get('content-type')).toMatch(/^multipart\/byteranges; boundary=/);
      const body = Buffer.from(await parts.arrayBuffer()).toString('latin1');
      const first = body.indexOf(layer.bytes.subarray(0, 10).toString('latin1'));
      expect(first).toBeGreaterThan(0);
      expect(body.indexOf(layer.bytes.subarray(100, 110).toString('latin1'))).toBeGreaterThan(
        first,
      );
    } finally {
      await pc.stop();
    }
  });
});

describe('redirect mode with Docker Engine', () => {
  test('docker pulls a cached image through the redirects, byte-equal', async () => {
    const pc = await start({}, { redirect: true });
    let dockerd: TestDockerd | undefined;
    try {
      await skopeoCopy(pc.host, 'org/big:v1', tmp()); // cached, so the pull below is redirected
      dockerd = await TestDockerd.start({ daemonConfig: { 'insecure-registries': [pc.host] } });
      const redirectsBefore = await redirectCount(pc);
      await dockerd.docker('pull', `${pc.host}/org/big:v1`);
      const out = await dockerd.docker(
        'image',
        'inspect',
        '--format',
        '{{.Id}}',
        `${pc.host}/org/big:v1`,
      );
      expect(out.trim()).toBe(big.blobs[0]!.digest);
      expect((await redirectCount(pc)) - redirectsBefore).toBe(big.blobs.length);
    } finally {
      await dockerd?.stop();
      await pc.stop();
    }
  }, 120_000);
});

/** Blob GETs answered with a redirect so far: the presigned URLs the driver made. */
async function redirectCount(pc: TestPullcache): Promise<number> {
  return driverOf(pc).presigned;
}

describe('S3 requests per pull', () => {
  test('a warm pull sends no LIST and no HEAD, and one GET per blob; a cold one no LIST, and copies no upload', async () => {
    const pc = await start();
    try {
      const driver = driverOf(pc);
      const snapshot = () => new Map(driver.requests);
      const since = (before: Map<string, number>) => {
        const out: Record<string, number> = {};
        for (const [name, n] of driver.requests) {
          const d = n - (before.get(name) ?? 0);
          if (d > 0) out[name.replace(/Command$/, '')] = d;
        }
        return out;
      };
      // What each copy copies: a blob's commit copies nothing (its upload was at its key);
      // copies of an object onto itself (last-pulled times) may come at any flush.
      const copied: string[] = [];
      driver.client.middlewareStack.add(
        (next, context) => (args) => {
          if (context.commandName === 'CopyObjectCommand')
            copied.push(String((args.input as { CopySource?: string }).CopySource));
          return next(args);
        },
        { step: 'initialize', name: 'testCopySources' },
      );
      // Let the start-up work (purge, scan, owner record) settle first.
      await waitFor(async () => pc.runtime.lifecycle.ready, 'the scan');
      let before = snapshot();
      await skopeoCopy(pc.host, 'org/big:v1', tmp());
      const cold = since(before);
      before = snapshot();
      const dir = tmp();
      await skopeoCopy(pc.host, 'org/big:v1', dir);
      expectDirHolds(dir, big);
      const warm = since(before);
      console.log(
        JSON.stringify(
          { image: 'org/big:v1 (config + 2 layers, 7 MiB + 50 kB)', cold, warm },
          null,
          1,
        ),
      );
      expect(cold.ListObjectsV2 ?? 0).toBe(0);
      expect(copied.filter((source) => source.includes('/uploads/'))).toEqual([]);
      expect(cold.CompleteMultipartUpload).toBe(1);
      expect(warm.ListObjectsV2 ?? 0).toBe(0);
      expect(warm.HeadObject ?? 0).toBe(0);
      // skopeo reads the config and both layers: one GET each, nothing else.
      expect(warm).toEqual({ GetObject: 3 });
    } finally {
      await pc.stop();
    }
  });
});

describe('S3 requests per catalog', () => {
  test('the catalog of many repositories is one listing per 1,000 keys, not one per directory', async () => {
    const pc = await start();
    try {
      const driver = driverOf(pc);
      await waitFor(async () => pc.runtime.lifecycle.ready, 'the scan');
      const names = Array.from({ length: 60 }, (_, i) => `team-${i % 6}/app-${i}`).concat('solo');
      const digest = sha256(Buffer.from('a layer'));
      for (const repository of names)
        await pc.runtime.repositories.linkBlob(
          { upstream: 'docker.io', repository } as never,
          { digest, size: 7 } as never,
        );
      const lists = () => driver.requests.get('ListObjectsV2Command') ?? 0;
      const before = lists();
      const res = await fetch(`${pc.url}/v2/_catalog?n=1000`);
      expect(res.status).toBe(200);
      const { repositories } = (await res.json()) as { repositories: string[] };
      expect(repositories).toEqual([...names].sort());
      // A walk of the directories asked once per directory (67 here, one after another).
      expect(lists() - before).toBe(1);
    } finally {
      await pc.stop();
    }
  });
});

describe('the object store slow, down or refusing', () => {
  test('going away: cached manifests still served, blobs and readiness 503 with a reason; back: all served', async () => {
    const pc = await start();
    try {
      await skopeoCopy(pc.host, 'library/alpine:3.20', tmp());
      await s3().stopGateway();
      try {
        const manifest = await fetch(`${pc.url}/v2/library/alpine/manifests/${small.digest}`);
        expect(manifest.status).toBe(200);
        const blob = await fetch(`${pc.url}/v2/library/alpine/blobs/${small.blobs[1]!.digest}`);
        expect(blob.status).toBe(503);
        expect(await ociError(blob)).toBe('UNAVAILABLE');
        expect(blob.headers.get('retry-after')).toBe('10');
        const ready = await fetch(`${pc.url}/readyz`);
        expect(ready.status).toBe(503);
        expect(JSON.stringify(await ready.json())).toMatch(/storage is unavailable/);
        // An image never cached: fetched, but it cannot be kept; the client gets a clean error
        // or the verified bytes, never a blob that later shows up half-written.
        const miss = await fetch(`${pc.url}/v2/org/big/blobs/${big.blobs[2]!.digest}`);
        if (miss.status === 200)
          expect(sha256(Buffer.from(await miss.arrayBuffer()))).toBe(big.blobs[2]!.digest);
        else expect(miss.status).toBe(503);
      } finally {
        await s3().startGateway();
      }
      await waitFor(async () => (await fetch(`${pc.url}/readyz`)).status === 200, 'ready again');
      const dir = tmp();
      await skopeoCopy(pc.host, 'library/alpine:3.20', dir);
      expectDirHolds(dir, small);
      const again = tmp();
      await skopeoCopy(pc.host, 'org/big:v1', again);
      expectDirHolds(again, big);
    } finally {
      await pc.stop();
    }
  });

  test('going away in the middle of a stored blob being served cuts that response, never completes it wrong', async () => {
    const pc = await start();
    try {
      const layer = big.blobs[1]!;
      await fetch(`${pc.url}/v2/org/big/blobs/${layer.digest}`).then((r) => r.arrayBuffer());
      const res = await fetch(`${pc.url}/v2/org/big/blobs/${layer.digest}`);
      expect(res.status).toBe(200);
      const reader = res.body!.getReader();
      await reader.read(); // headers and a first chunk are through
      await s3().stopGateway('SIGKILL');
      let received = 0;
      const outcome = await (async () => {
        try {
          for (;;) {
            const { done, value } = await reader.read();
            if (done) return 'complete';
            received += value.length;
          }
        } catch {
          return 'cut';
        }
      })();
      // radosgw may have sent the whole 7 MiB before it died; if not, the response is cut.
      if (outcome === 'complete') expect(received).toBeGreaterThan(0);
      else expect(outcome).toBe('cut');
    } finally {
      await s3().startGateway();
      await pc.stop();
    }
  });

  test('503 SlowDown is retried with backoff and the pull succeeds', async () => {
    // radosgw cannot be made to say SlowDown: a proxy in front of it says it to the first
    // attempt of every other request.
    let count = 0;
    let slowDowns = 0;
    const proxy = await s3FaultProxy(s3().endpoint, (req) => {
      const first = /attempt=1\b/.test(String(req.headers['amz-sdk-request']));
      if (!first || count++ % 2 !== 0) return undefined;
      slowDowns++;
      return { status: 503, code: 'SlowDown' };
    });
    const pc = await start({}, { endpoint: proxy.endpoint });
    try {
      const dir = tmp();
      await skopeoCopy(pc.host, 'org/big:v1', dir);
      expectDirHolds(dir, big);
      expect(slowDowns).toBeGreaterThan(5);
    } finally {
      await pc.stop();
      proxy.close();
    }
  });

  test('refusing (403) while running: stored blobs and readiness answer 503 naming it; allowed again, served', async () => {
    let deny = false;
    const proxy = await s3FaultProxy(s3().endpoint, () =>
      deny ? { status: 403, code: 'AccessDenied' } : undefined,
    );
    const captured = capturedLog('info');
    const pc = await start({}, { endpoint: proxy.endpoint }, captured.log);
    try {
      await skopeoCopy(pc.host, 'library/alpine:3.20', tmp());
      deny = true;
      const layer = small.blobs[1]!.digest;
      const blob = await fetch(`${pc.url}/v2/library/alpine/blobs/${layer}`);
      expect(blob.status).toBe(503);
      // The request line names the object and the store's id of the refused request.
      const line = captured.lines.find(
        (l) => l.msg === 'request failed' && String((l.req as { url: string }).url).endsWith(layer),
      );
      expect(line).toMatchObject({
        storageKey: expect.stringContaining(layer.slice(7)),
        storageRequestId: expect.stringMatching(/^fault-\d+$/),
      });
      const body = (await blob.json()) as { errors: { code: string; message: string }[] };
      expect(body.errors[0]).toMatchObject({ code: 'UNAVAILABLE' });
      expect(body.errors[0]!.message).toMatch(
        /storage is unavailable: .*AccessDenied \(HTTP 403\)/,
      );
      const ready = await fetch(`${pc.url}/readyz`);
      expect(ready.status).toBe(503);
      expect(JSON.stringify(await ready.json())).toMatch(/AccessDenied/);
      deny = false;
      const dir = tmp();
      await skopeoCopy(pc.host, 'library/alpine:3.20', dir);
      expectDirHolds(dir, small);
    } finally {
      await pc.stop();
      proxy.close();
    }
  });
});

describe('the object store slow', () => {
  test('a store that stops answering fails the read after its timeout and retries, with a clear error', async () => {
    let hang = false;
    const proxy = await s3FaultProxy(s3().endpoint, () => (hang ? 'hang' : undefined));
    const driver = new S3Driver({
      bucket: storage.bucket!,
      region: 'us-east-1',
      endpoint: proxy.endpoint,
      forcePathStyle: true,
      prefix: storage.prefix!,
      credentials: { accessKeyId: s3().accessKey, secretAccessKey: s3().secretKey },
      partSize: 5 * 1024 * 1024,
      requestTimeout: 500,
    });
    try {
      await driver.putContent('x', 'stored');
      hang = true;
      const started = Date.now();
      const failure = await driver.getContent('x').catch((err: unknown) => err);
      expect(failure).toBeInstanceOf(StorageUnavailableError);
      expect((failure as Error).message).toBe(
        'storage is unavailable: cannot read: no answer from the store in time',
      );
      // Three attempts of 0.5 s with backoff between them: seconds, not minutes.
      expect(Date.now() - started).toBeLessThan(15_000);
      expect(driver.requests.get('GetObjectCommand')).toBe(3);
      hang = false;
      expect((await driver.getContent('x')).toString()).toBe('stored');
    } finally {
      await driver.close();
      proxy.close();
    }
  });
});

describe('a process killed in the middle of an upload', () => {
  test('leaves nothing visible, and its multipart upload is purged later', async () => {
    // A slow upstream (about 8 MiB/s) so that the kill lands in the middle of the blob.
    const upstream = new URL(registry.url);
    const slow: Server = createServer((req, res) => {
      const forward = httpRequest(
        {
          host: upstream.hostname,
          port: upstream.port,
          method: req.method,
          path: req.url,
          headers: req.headers,
        },
        (answer) => {
          res.writeHead(answer.statusCode!, answer.headers);
          answer.on('data', (chunk: Buffer) => {
            answer.pause();
            res.write(chunk);
            setTimeout(() => answer.resume(), Math.ceil(chunk.length / 8192));
          });
          answer.on('end', () => res.end());
        },
      );
      forward.on('error', () => res.destroy());
      req.pipe(forward);
    });
    const slowPort = await freePort();
    await new Promise<void>((resolve) => slow.listen(slowPort, '127.0.0.1', resolve));
    const dir = tmp();
    const port = await freePort();
    const config = join(dir, 'config.yaml');
    const s3config = (storage.config() as { s3: Record<string, unknown> }).s3;
    writeFileSync(
      config,
      JSON.stringify({
        server: { listen: `127.0.0.1:${port}` },
        storage: { driver: 's3', s3: s3config },
        upstreams: { 'docker.io': { url: `http://127.0.0.1:${slowPort}` } },
      }),
    );
    const layer = slowImage.blobs[1]!;
    const child = spawn(
      process.execPath,
      ['--import', import.meta.resolve('tsx'), 'src/cli.ts', 'serve', '--config', config],
      { stdio: ['ignore', 'ignore', 'pipe'] },
    );
    let log = '';
    child.stderr!.on('data', (chunk: Buffer) => (log += chunk.toString()));
    try {
      await waitFor(
        async () => (await fetch(`http://127.0.0.1:${port}/readyz`)).status === 200,
        'the child pullcache',
        60_000,
      ).catch((err: Error) => {
        throw new Error(`${err.message}: ${log}`);
      });
      const pull = fetch(`http://127.0.0.1:${port}/v2/org/slow/blobs/${layer.digest}`)
        .then((r) => r.arrayBuffer())
        .catch(() => undefined);
      // Killed once its multipart upload is under way (a part or more uploaded).
      await waitFor(
        async () => (await multipartUploads()).length > 0,
        'a multipart upload',
        30_000,
      );
      child.kill('SIGKILL');
      await pull;
    } finally {
      child.kill('SIGKILL');
      slow.close();
    }
    const blobKey = storage.prefix + paths.blobData(parseDigest(layer.digest).digest);
    expect(await objectExists(blobKey)).toBe(false);
    // The fetch uploaded to the blob's own key (its commit completes it there, with no copy).
    expect(await multipartUploads()).toEqual([blobKey]);
    // A new process purges sessions older than purgeAge at start: here everything before now.
    const purged = await startPullcache({
      storage: {
        ...storage.config(),
        uploads: { purgeAge: '0' },
      },
      upstreams: { 'docker.io': { url: registry.url } },
    });
    try {
      expect(await multipartUploads()).toEqual([]);
      const { Contents } = await s3().client.send(
        new ListObjectsV2Command({
          Bucket: storage.bucket!,
          Prefix: `${storage.prefix!}uploads/`,
        }),
      );
      expect(Contents ?? []).toEqual([]);
      expect(await objectExists(blobKey)).toBe(false);
      // And the blob can be pulled whole afterwards.
      const res = await fetch(`${purged.url}/v2/org/slow/blobs/${layer.digest}`);
      expect(sha256(Buffer.from(await res.arrayBuffer()))).toBe(layer.digest);
      expect(await objectExists(blobKey)).toBe(true);
    } finally {
      await purged.stop();
      rmSync(dir, { recursive: true, force: true });
    }
  }, 120_000);
});
