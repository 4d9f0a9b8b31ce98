/**
 * The budget end to end, against the real upstream registry: least recently pulled images go
 * first and whole, pins stay, a blob larger than the budget is streamed and not kept, clients
 * reading an image while eviction wants its space get every byte, last-pulled times survive a
 * restart, unusedFor, and no metadata cache (Redis included) answers for an evicted image.
 */
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { promisify } from 'node:util';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { storedBlobPath } from '../helpers/files.js';
import { makeImage, pushImage, type Image } from '../helpers/images.js';
import { capturedLog, startPullcache, type TestPullcache } from '../helpers/pullcache.js';
import { waitFor } from '../helpers/net.js';
import { Recorder } from '../helpers/recorder.js';
import { startRedis, type TestRedis } from '../helpers/redis.js';
import { TestRegistry } from '../helpers/registry.js';
import { expectDirHolds, skopeoCopy } from '../helpers/skopeo.js';
import { Throttle } from '../helpers/throttle.js';

const run = promisify(execFile);
const tmp = () => mkdtempSync(join(tmpdir(), 'pullcache-budget-'));
/** Bytes an image takes in storage: its manifest and every blob. */
const bytesOf = (image: Image) =>
  image.manifest.length + image.blobs.reduce((sum, b) => sum + b.bytes.length, 0);
const ref = (image: Image) => `${image.repository}:${image.tag}`;

async function pull(pc: TestPullcache, image: Image): Promise<void> {
  const dir = tmp();
  try {
    await skopeoCopy(pc.host, ref(image), dir);
    expectDirHolds(dir, image);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/** The images pullcache holds now, by repository, after any eviction under way has ended. */
async function held(pc: TestPullcache): Promise<string[]> {
  await pc.runtime.lifecycle.settle();
  return (await pc.runtime.lifecycle.images()).map((i) => i.repository).sort();
}

/** Every blob of the image is in storage (true) or none is (false); anything else fails. */
function stored(pc: TestPullcache, image: Image): boolean {
  const present = [image.digest, ...image.blobs.map((b) => b.digest)].map((d) =>
    existsSync(storedBlobPath(pc.root, d)),
  );
  expect(new Set(present).size, `${image.repository} is held whole or not at all`).toBe(1);
  return present[0]!;
}

describe('the budget', () => {
  let registry: TestRegistry;
  let recorder: Recorder;
  const images: Record<string, Image> = {};
  let unit = 0;

  beforeAll(async () => {
    registry = await TestRegistry.start();
    for (const name of ['a', 'b', 'c', 'd', 'e']) {
      images[name] = makeImage(`org/${name}`, 'v1', 'oci', [300_000]);
      await pushImage(registry, images[name]);
    }
    images.big = makeImage('org/big', 'v1', 'oci', [3_000_000]);
    await pushImage(registry, images.big);
    images.huge = makeImage('org/huge', 'v1', 'oci', [12_000_000]);
    await pushImage(registry, images.huge);
    unit = Math.max(...['a', 'b', 'c', 'd', 'e'].map((n) => bytesOf(images[n]!)));
    recorder = await Recorder.start(registry.url);
  });
  afterAll(async () => {
    await recorder?.close();
    await registry?.close();
  });

  const start = (
    retention: Record<string, unknown>,
    extra: Record<string, unknown> = {},
    root?: string,
  ) =>
    startPullcache(
      { upstreams: { 'docker.io': { url: recorder.url } }, retention, ...extra },
      root,
    );

  test('the least recently pulled image goes first, whole, and comes back from the upstream when pulled again', async () => {
    const { a, b, c, d } = images as Record<string, Image>;
    // Room for three images: the fourth evicts exactly one.
    const pc = await start({ maxSize: 3 * unit + 1000, lowWater: '100%' });
    try {
      for (const image of [a!, b!, c!]) await pull(pc, image);
      await pull(pc, a!); // a is now the most recently pulled: b is the oldest
      expect(await held(pc)).toEqual(['org/a', 'org/b', 'org/c']);
      await pull(pc, d!);
      expect(await held(pc)).toEqual(['org/a', 'org/c', 'org/d']);
      expect(stored(pc, b!)).toBe(false);
      expect(existsSync(join(pc.root, 'repositories/docker.io/org/b'))).toBe(false);
      for (const image of [a!, c!, d!]) expect(stored(pc, image)).toBe(true);
      const usage = await pc.runtime.lifecycle.usage();
      expect(usage.bytes).toBeLessThanOrEqual(3 * unit + 1000);

      // b again: fetched afresh from the upstream, byte for byte; c is the oldest now.
      const before = recorder.requests.filter((r) => r.path.startsWith('/v2/org/b/blobs/')).length;
      await pull(pc, b!);
      const after = recorder.requests.filter((r) => r.path.startsWith('/v2/org/b/blobs/')).length;
      expect(after - before).toBe(b!.blobs.length);
      expect(await held(pc)).toEqual(['org/a', 'org/b', 'org/d']);
      expect(stored(pc, c!)).toBe(false);

      const metrics = await (await fetch(`${pc.url}/metrics`)).text();
      expect(metrics).toMatch(/pullcache_evictions_total\{reason="size"\} 2/);
      expect(metrics).toMatch(new RegExp(`pullcache_storage_limit_bytes ${3 * unit + 1000}`));
      expect(metrics).toMatch(/pullcache_storage_bytes \d+/);
    } finally {
      await pc.stop();
    }
  });

  test('a pinned image survives pressure; the next least recently pulled goes instead', async () => {
    const { a, b, c, d } = images as Record<string, Image>;
    const pc = await start({
      maxSize: 3 * unit + 1000,
      lowWater: '100%',
      pins: ['org/b:v1'],
    });
    try {
      for (const image of [b!, a!, c!, d!]) await pull(pc, image);
      expect(await held(pc)).toEqual(['org/b', 'org/c', 'org/d']);
      const pinned = (await pc.runtime.lifecycle.images()).filter((i) => i.pinned);
      expect(pinned.map((i) => i.references)).toEqual([['docker.io/org/b:v1']]);
    } finally {
      await pc.stop();
    }
  });

  test('a blob larger than the whole budget is streamed to its client and not kept, logged once', async () => {
    const { huge } = images as Record<string, Image>;
    const { log, lines } = capturedLog('info');
    const pc = await startPullcache(
      { upstreams: { 'docker.io': { url: recorder.url } }, retention: { maxSize: '4MiB' } },
      undefined,
      { log },
    );
    try {
      await pull(pc, huge!);
      const layer = huge!.blobs[1]!;
      expect(existsSync(storedBlobPath(pc.root, layer.digest))).toBe(false);
      expect(existsSync(storedBlobPath(pc.root, huge!.blobs[0]!.digest))).toBe(true);
      // Nothing of it is left in the uploads either.
      const { readdirSync } = await import('node:fs');
      await pc.runtime.lifecycle.settle();
      expect(readdirSync(join(pc.root, 'uploads'))).toEqual([]);
      // Again: served right again, logged no more.
      await pull(pc, huge!);
      expect(
        lines.filter((l) => l.msg === 'blob larger than the whole budget: streamed, not kept'),
      ).toHaveLength(1);
    } finally {
      await pc.stop();
    }
  });

  test('16 clients reading an image while eviction wants its space all finish with the right bytes', async () => {
    const { big, e } = images as Record<string, Image>;
    const layer = big!.blobs[1]!;
    // Room for big alone: pulling e afterwards wants big's space.
    const pc = await start({ maxSize: bytesOf(big!) + 1000, lowWater: '100%' });
    try {
      await pull(pc, big!);
      const url = `${pc.url}/v2/${big!.repository}/blobs/${layer.digest}`;
      const readers = Array.from({ length: 16 }, async () => {
        const res = await fetch(url);
        expect(res.status).toBe(200);
        const hash = createHash('sha256');
        const reader = res.body!.getReader();
        for (let i = 0; ; i++) {
          const { done, value } = await reader.read();
          if (done) break;
          hash.update(value);
          // Slow readers: the eviction runs while every one of them is still reading.
          if (i % 8 === 0) await new Promise((r) => setTimeout(r, 5));
        }
        return `sha256:${hash.digest('hex')}`;
      });
      await new Promise((r) => setTimeout(r, 20));
      await pull(pc, e!);
      const digests = await Promise.all(readers);
      expect(digests).toEqual(Array.from({ length: 16 }, () => layer.digest));
      // Once nobody reads big, the budget holds again.
      await pc.runtime.lifecycle.settle();
      expect((await pc.runtime.lifecycle.usage()).bytes).toBeLessThanOrEqual(bytesOf(big!) + 1000);
    } finally {
      await pc.stop();
    }
  });

  test('a blob being fetched to be kept makes room while it comes, not only once it is stored', async () => {
    const { a, b, c } = images as Record<string, Image>;
    const mid = makeImage('org/mid', 'v1', 'oci', [2 * unit]);
    await pushImage(registry, mid);
    const throttle = await Throttle.start(registry.url);
    const pc = await startPullcache({
      upstreams: { 'docker.io': { url: throttle.url } },
      retention: { maxSize: 3 * unit + 1000, lowWater: '100%' },
    });
    try {
      for (const image of [a!, b!, c!]) await pull(pc, image);
      const manifest = await fetch(`${pc.url}/v2/org/mid/manifests/v1`, {
        headers: { accept: mid.mediaType },
      });
      expect(manifest.status).toBe(200);
      await manifest.arrayBuffer();
      // The layer comes slowly (about 3 s); a and b make room for it meanwhile.
      const layer = mid.blobs[1]!;
      throttle.bytesPerSecond = Math.ceil(layer.bytes.length / 3);
      let done = false;
      const download = fetch(`${pc.url}/v2/org/mid/blobs/${layer.digest}`)
        .then(async (r) => Buffer.from(await r.arrayBuffer()))
        .finally(() => (done = true));
      await waitFor(async () => {
        const held = (await pc.runtime.lifecycle.images()).map((i) => i.repository);
        return !held.includes('org/a') && !held.includes('org/b');
      }, 'a and b evicted');
      expect(done).toBe(false);
      expect(
        createHash('sha256')
          .update(await download)
          .digest('hex'),
      ).toBe(layer.digest.slice('sha256:'.length));
      expect(await held(pc)).toEqual(['org/c', 'org/mid']);
      expect((await pc.runtime.lifecycle.usage()).bytes).toBeLessThanOrEqual(3 * unit + 1000);
    } finally {
      await pc.stop();
      await throttle.close();
    }
  });

  test('last-pulled order survives a restart', async () => {
    const { a, b, c } = images as Record<string, Image>;
    const root = tmp();
    try {
      let pc = await start({}, {}, root);
      for (const image of [c!, a!, b!]) await pull(pc, image);
      await pc.stop();
      // Restart with a budget for two: c, pulled first, goes.
      pc = await start({ maxSize: 2 * unit + 1000, lowWater: '100%' }, {}, root);
      try {
        expect(await held(pc)).toEqual(['org/a', 'org/b']);
        expect(stored(pc, c!)).toBe(false);
      } finally {
        await pc.stop();
      }
    } finally {
      rmSync(root, { recursive: true, force: true });
    }
  });

  test('images not pulled for unusedFor are removed by the sweep; one pulled meanwhile stays', async () => {
    const { a, b } = images as Record<string, Image>;
    const pc = await start({ unusedFor: '1500ms', sweepInterval: '300ms' });
    try {
      await pull(pc, a!);
      await pull(pc, b!);
      const until = Date.now() + 2500;
      while (Date.now() < until) {
        // b keeps being pulled (a HEAD of its manifest is a pull too).
        const res = await fetch(`${pc.url}/v2/${b!.repository}/manifests/v1`, {
          method: 'HEAD',
          headers: { accept: b!.mediaType },
        });
        expect(res.status).toBe(200);
        await new Promise((r) => setTimeout(r, 200));
      }
      expect(await held(pc)).toEqual(['org/b']);
      expect(stored(pc, a!)).toBe(false);
      const metrics = await (await fetch(`${pc.url}/metrics`)).text();
      expect(metrics).toMatch(/pullcache_evictions_total\{reason="unused"\} 1/);
      expect(metrics).toMatch(/pullcache_gc_runs_total [1-9]/);
    } finally {
      await pc.stop();
    }
  });

  describe('with Redis as the metadata cache', () => {
    let redis: TestRedis;
    beforeAll(async () => {
      redis = await startRedis();
    });
    afterAll(async () => {
      await redis?.stop();
    });

    test('no entry for an evicted image is left in Redis, and a pull after the eviction fetches it again', async () => {
      const { a, b, c, d } = images as Record<string, Image>;
      const pc = await start(
        { maxSize: 3 * unit + 1000, lowWater: '100%' },
        { cache: { store: 'redis', redis: { url: redis.url } } },
      );
      try {
        for (const image of [a!, b!, c!]) await pull(pc, image);
        const keysOf = async (image: Image) => {
          const { stdout } = await run('redis-cli', [
            '-u',
            redis.url,
            '--scan',
            '--pattern',
            'pullcache:*',
          ]);
          const all = stdout.split('\n').filter(Boolean);
          const digests = [image.digest, ...image.blobs.map((x) => x.digest)];
          return all.filter(
            (k) =>
              k.includes(`/${image.repository}:`) || digests.some((dg) => k.endsWith(`blob:${dg}`)),
          );
        };
        expect((await keysOf(a!)).length).toBeGreaterThan(0);
        await pull(pc, d!);
        expect(await held(pc)).toEqual(['org/b', 'org/c', 'org/d']);
        expect(await keysOf(a!)).toEqual([]);
        // Its tag and manifest are asked of the upstream again, and served right.
        const before = recorder.requests.length;
        await pull(pc, a!);
        expect(
          recorder.requests
            .slice(before)
            .some((r) => r.path === `/v2/${a!.repository}/manifests/v1`),
        ).toBe(true);
      } finally {
        await pc.stop();
      }
    });
  });
});
