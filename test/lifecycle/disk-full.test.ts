/**
 * A full disk is not a crash: on a small tmpfs, a fetch that meets ENOSPC gives its client a clean
 * error (a cut connection, never a short body taken for the blob), keeps nothing partial, starts an
 * eviction, and the server goes on serving; the same pull then succeeds. Needs root (mount).
 */
import { execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, expect, test, vi } from 'vitest';
import { fillDisk, storedBlobPath } from '../helpers/files.js';
import { makeImage, pushBlob, pushImage, type Image } from '../helpers/images.js';
import { capturedLog, startPullcache, type TestPullcache } from '../helpers/pullcache.js';
import { TestRegistry } from '../helpers/registry.js';
import { expectDirHolds, skopeoCopy } from '../helpers/skopeo.js';

let registry: TestRegistry;
let mount: string;
let first: Image;
let second: Image;

beforeAll(async () => {
  registry = await TestRegistry.start();
  // About 12 and 15 MB once compressed: each fits the 24 MiB disk alone, not both.
  first = makeImage('org/first', 'v1', 'oci', [24_000_000]);
  second = makeImage('org/second', 'v1', 'oci', [30_000_000]);
  await pushImage(registry, first);
  await pushImage(registry, second);
  mount = mkdtempSync(join(tmpdir(), 'pullcache-tmpfs-'));
  execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=24m', 'tmpfs', mount]);
});
afterAll(async () => {
  if (mount) {
    execFileSync('umount', [mount]);
    rmSync(mount, { recursive: true, force: true });
  }
  await registry?.close();
});

const stored = (pc: TestPullcache, digest: string) => existsSync(storedBlobPath(pc.root, digest));

test('ENOSPC on a small disk: a clean error, nothing partial kept, an eviction, serving goes on, and the pull then succeeds', async () => {
  const { log, lines } = capturedLog('info');
  const pc = await startPullcache(
    { upstreams: { 'docker.io': { url: registry.url } } },
    join(mount, 'data'),
    { log },
  );
  const dest = () => mkdtempSync(join(tmpdir(), 'pullcache-enospc-'));
  try {
    const d1 = dest();
    await skopeoCopy(pc.host, 'org/first:v1', d1);
    expectDirHolds(d1, first);
    await pc.runtime.lifecycle.settle();

    // No budget is set: only the disk says no.
    await expect(skopeoCopy(pc.host, 'org/second:v1', dest())).rejects.toThrow();
    const layer = second.blobs[1]!;
    expect(stored(pc, layer.digest)).toBe(false);
    // The failed fetch removes its upload as it ends, which may be just after the client is cut.
    await vi.waitFor(() => expect(readdirSync(join(pc.root, 'uploads'))).toEqual([]), {
      timeout: 10_000,
    });
    await pc.runtime.lifecycle.settle();
    expect(lines.some((l) => l.msg === 'storage is full: evicting')).toBe(true);
    // first was the least recently pulled: it made room, whole.
    expect(first.blobs.some((b) => stored(pc, b.digest))).toBe(false);
    expect((await fetch(`${pc.url}/readyz`)).status).toBe(200);

    const d2 = dest();
    await skopeoCopy(pc.host, 'org/second:v1', d2);
    expectDirHolds(d2, second);
    expect(stored(pc, layer.digest)).toBe(true);
  } finally {
    await pc.stop();
  }
});

test('a manifest fetched while the disk is full is served, not kept, and an eviction starts', async () => {
  const { log, lines } = capturedLog('info');
  const pc = await startPullcache(
    { upstreams: { 'docker.io': { url: registry.url } } },
    join(mount, 'data-full'),
    { log },
  );
  const filler = join(mount, 'filler');
  try {
    fillDisk(filler); // every byte left on the disk
    const res = await fetch(`${pc.url}/v2/org/first/manifests/v1`, {
      headers: { accept: first.mediaType },
    });
    expect(res.status).toBe(200);
    expect(Buffer.from(await res.arrayBuffer()).equals(first.manifest)).toBe(true);
    expect(lines.some((l) => l.msg === 'storage is full: manifest served, not kept')).toBe(true);
    expect(lines.some((l) => l.msg === 'storage is full: evicting')).toBe(true);
    expect(stored(pc, first.digest)).toBe(false);
  } finally {
    rmSync(filler, { force: true });
    await pc.stop();
  }
});

test('a disk filled by something else, no fetch under way: the readiness probe makes room, and readiness comes back', async () => {
  const own = mkdtempSync(join(tmpdir(), 'pullcache-probe-'));
  execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=24m', 'tmpfs', own]);
  const { log, lines } = capturedLog('info');
  const pc = await startPullcache(
    { upstreams: { 'docker.io': { url: registry.url } } },
    join(own, 'data'),
    { log },
  );
  const filler = join(own, 'filler');
  const d1 = mkdtempSync(join(tmpdir(), 'pullcache-enospc-'));
  try {
    await skopeoCopy(pc.host, 'org/first:v1', d1);
    await pc.runtime.lifecycle.settle();
    fillDisk(filler);
    // A stored layer asked for another repository needs only a link, which finds no room: a
    // 503 to retry, not a 500.
    const layer = first.blobs[1]!;
    await pushBlob(registry, 'org/also-first', layer);
    const linked = await fetch(`${pc.url}/v2/org/also-first/blobs/${layer.digest}`);
    expect([linked.status, linked.headers.get('retry-after')]).toEqual([503, '10']);
    expect(((await linked.json()) as { errors: { code: string }[] }).errors[0]!.code).toBe(
      'UNAVAILABLE',
    );
    // Not ready while the disk is full; the probe that says so starts an eviction.
    const first503 = await fetch(`${pc.url}/readyz`);
    expect(first503.status).toBe(503);
    await vi.waitFor(async () => expect((await fetch(`${pc.url}/readyz`)).status).toBe(200), {
      timeout: 10_000,
      interval: 200,
    });
    expect(lines.some((l) => l.msg === 'storage is full: evicting')).toBe(true);
    expect(first.blobs.some((b) => stored(pc, b.digest))).toBe(false);
  } finally {
    await pc.stop();
    execFileSync('umount', [own]);
    rmSync(own, { recursive: true, force: true });
    rmSync(d1, { recursive: true, force: true });
  }
});

test('minFree: below it, the least recently pulled images go until the disk has room again', async () => {
  const small = mkdtempSync(join(tmpdir(), 'pullcache-minfree-'));
  execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=8m', 'tmpfs', small]);
  const images = [1, 2, 3].map((n) => makeImage(`org/minfree${n}`, 'v1', 'oci', [3_000_000]));
  for (const image of images) await pushImage(registry, image);
  const minFree = 4 * 1024 * 1024;
  const pc = await startPullcache(
    {
      upstreams: { 'docker.io': { url: registry.url } },
      retention: { minFree: '4MiB', lowWater: '90%' },
    },
    join(small, 'data'),
  );
  try {
    for (const image of images) {
      const d = mkdtempSync(join(tmpdir(), 'pullcache-minfree-pull-'));
      await skopeoCopy(pc.host, `${image.repository}:v1`, d);
      expectDirHolds(d, image);
      rmSync(d, { recursive: true, force: true });
      await pc.runtime.lifecycle.settle();
    }
    // Three images of about 1.5 MB left less than 4 MiB of the 8: the first pulled went.
    const held = (await pc.runtime.lifecycle.images()).map((i) => i.repository).sort();
    expect(held).toEqual(['org/minfree2', 'org/minfree3']);
    const usage = await pc.runtime.lifecycle.usage();
    expect(usage.free).toBeGreaterThanOrEqual(minFree);
    expect(usage.minFree).toBe(minFree);
  } finally {
    await pc.stop();
    execFileSync('umount', [small]);
    rmSync(small, { recursive: true, force: true });
  }
});
