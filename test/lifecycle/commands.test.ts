/**
 * `pullcache ls | du | pin | unpin | rm | gc`, the real CLI: on storage with no server, and beside
 * a running server (through its admin API, so that its caches see a removal at once).
 */
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { hostname, tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { storedBlobPath } from '../helpers/files.js';
import { makeImage, pushImage, type Image } from '../helpers/images.js';
import { startPullcache } from '../helpers/pullcache.js';
import { Recorder } from '../helpers/recorder.js';
import { TestRegistry } from '../helpers/registry.js';
import { cli, configFile } from '../helpers/cli.js';

let registry: TestRegistry;
let recorder: Recorder;
let a: Image;
let b: Image;
let c: Image;

beforeAll(async () => {
  registry = await TestRegistry.start();
  a = makeImage('org/a', 'v1', 'oci', [100_000]);
  b = makeImage('org/b', 'v1', 'oci', [50_000]);
  c = makeImage('org/c', 'v1', 'oci', [20_000]);
  for (const image of [a, b, c]) await pushImage(registry, image);
  recorder = await Recorder.start(registry.url);
});
afterAll(async () => {
  await recorder?.close();
  await registry?.close();
});

/** A storage root holding a and b, filled through pullcache by plain HTTP. */
async function filledRoot(): Promise<string> {
  const root = mkdtempSync(join(tmpdir(), 'pullcache-cmds-'));
  const pc = await startPullcache({ upstreams: { 'docker.io': { url: recorder.url } } }, root);
  try {
    for (const image of [a, b]) {
      const res = await fetch(`${pc.url}/v2/${image.repository}/manifests/v1`, {
        headers: { accept: image.mediaType },
      });
      expect(res.status).toBe(200);
      for (const blob of image.blobs)
        expect((await fetch(`${pc.url}/v2/${image.repository}/blobs/${blob.digest}`)).status).toBe(
          200,
        );
    }
  } finally {
    await pc.stop();
  }
  return root;
}

interface LsEntry {
  references: string[];
  digest: string;
  size: number;
  lastPulled: string;
  pinned: boolean;
}

describe('on storage with no server', () => {
  let root: string;
  let config: string;
  beforeAll(async () => {
    root = await filledRoot();
    config = configFile(root, { 'docker.io': { url: recorder.url } });
  });
  afterAll(() => rmSync(root, { recursive: true, force: true }));

  test('ls and du show the images, sizes and the budget, as text and as stable JSON', async () => {
    const ls = await cli('ls', '-c', config, '--json');
    expect(ls.stderr).toBe('');
    expect(ls.code).toBe(0);
    const images = JSON.parse(ls.stdout.toString()) as LsEntry[];
    expect(images.map((i) => i.references)).toEqual([
      ['docker.io/org/a:v1'],
      ['docker.io/org/b:v1'],
    ]);
    const sizeOf = (image: Image) =>
      image.manifest.length + image.blobs.reduce((s, x) => s + x.bytes.length, 0);
    expect(images[0]).toMatchObject({ digest: a.digest, size: sizeOf(a), pinned: false });
    expect(Date.parse(images[0]!.lastPulled)).toBeGreaterThan(Date.now() - 120_000);

    const text = await cli('ls', '-c', config, '--sort', 'size');
    expect(text.stdout.toString()).toMatch(/^REFERENCE\s+DIGEST\s+SIZE/);
    expect(text.stdout.toString().indexOf('org/a')).toBeLessThan(
      text.stdout.toString().indexOf('org/b'),
    );

    const du = await cli('du', '-c', config, '--json');
    expect(du.code).toBe(0);
    const usage = JSON.parse(du.stdout.toString()) as Record<string, unknown>;
    expect(usage).toMatchObject({ bytes: sizeOf(a) + sizeOf(b), blobs: 6, images: 2, maxSize: 0 });
    expect(usage.free).toBeGreaterThan(0);
  });

  test('pin keeps rm away; unpin, rm --dry-run, rm, then gc', async () => {
    expect((await cli('pin', '-c', config, 'org/a:v1')).code).toBe(0);
    const ls = JSON.parse((await cli('ls', '-c', config, '--json')).stdout.toString()) as LsEntry[];
    expect(ls.find((i) => i.digest === a.digest)?.pinned).toBe(true);

    const refused = await cli('rm', '-c', config, 'org/a:v1');
    expect(refused.code).toBe(1);
    expect(refused.stderr).toMatch(/pinned \(unpin it first\)/);
    expect(existsSync(storedBlobPath(root, a.digest))).toBe(true);

    expect((await cli('unpin', '-c', config, 'org/a:v1')).code).toBe(0);
    const dry = await cli('rm', '-c', config, '--dry-run', 'org/a:v1');
    expect(dry.code).toBe(0);
    expect(dry.stdout.toString()).toMatch(/would remove image docker\.io\/org\/a:v1/);
    expect(existsSync(storedBlobPath(root, a.digest))).toBe(true);

    const rm = await cli('rm', '-c', config, 'org/a:v1');
    expect(rm.code).toBe(0);
    expect(rm.stdout.toString()).toMatch(/removed image docker\.io\/org\/a:v1/);
    for (const digest of [a.digest, ...a.blobs.map((x) => x.digest)])
      expect(existsSync(storedBlobPath(root, digest))).toBe(false);
    const left = JSON.parse(
      (await cli('ls', '-c', config, '--json')).stdout.toString(),
    ) as LsEntry[];
    expect(left.map((i) => i.digest)).toEqual([b.digest]);

    const missing = await cli('rm', '-c', config, 'org/nothing:v1');
    expect(missing.code).toBe(1);
    expect(missing.stderr).toMatch(/org\/nothing:v1: not cached/);

    const gc = await cli('gc', '-c', config);
    expect(gc.code).toBe(0);
    expect(gc.stdout.toString()).toMatch(/^gc: /m);
  });

  test('while another command manages the storage, a command says so and changes nothing', async () => {
    // A live process (this one) holds the owner record, without a server URL.
    writeFileSync(
      join(root, 'lifecycle', 'owner.json'),
      JSON.stringify({ pid: process.pid, host: hostname(), expiresAt: Date.now() + 60_000 }),
    );
    try {
      const rm = await cli('rm', '-c', config, 'org/b:v1');
      expect(rm.code).toBe(1);
      expect(rm.stderr).toMatch(
        /another pullcache process \(pid \d+ on .+\) is managing this storage/,
      );
      expect(existsSync(storedBlobPath(root, b.digest))).toBe(true);
    } finally {
      rmSync(join(root, 'lifecycle', 'owner.json'), { force: true });
    }
  });
});

test('beside a running server, the commands go through its admin API and its caches see a removal at once', async () => {
  const root = await filledRoot();
  const pc = await startPullcache({ upstreams: { 'docker.io': { url: recorder.url } } }, root);
  try {
    const config = configFile(root, { 'docker.io': { url: recorder.url } });
    // The manifest is hot in the server's memory and metadata cache.
    const get = () =>
      fetch(`${pc.url}/v2/${a.repository}/manifests/${a.digest}`, {
        headers: { accept: a.mediaType },
      });
    expect((await get()).status).toBe(200);
    const ls = await cli('ls', '-c', config, '--json');
    expect(ls.code).toBe(0);
    expect((JSON.parse(ls.stdout.toString()) as LsEntry[]).length).toBe(2);

    const rm = await cli('rm', '-c', config, 'org/a:v1');
    expect(rm.stderr).toBe('');
    expect(rm.code).toBe(0);
    expect((await pc.runtime.lifecycle.images()).map((i) => i.repository)).toEqual(['org/b']);
    // The server does not answer from memory: it asks the upstream again, and serves it right.
    const before = recorder.requests.length;
    const again = await get();
    expect(again.status).toBe(200);
    expect(Buffer.from(await again.arrayBuffer()).equals(a.manifest)).toBe(true);
    expect(
      recorder.requests
        .slice(before)
        .some((r) => r.path === `/v2/${a.repository}/manifests/${a.digest}`),
    ).toBe(true);

    // A prefetch beside the server: the server counts what it added at once.
    const listed = async () => (await pc.runtime.lifecycle.images()).map((i) => i.repository);
    expect(await listed()).not.toContain('org/c');
    const prefetch = await cli('prefetch', '-c', config, 'org/c:v1');
    expect(prefetch.code).toBe(0);
    expect(await listed()).toContain('org/c');

    // And the admin API answers JSON errors for bad input.
    const bad = await fetch(`${pc.url}/_pullcache/v1/remove`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ references: ['Not A Name!'] }),
    });
    expect(bad.status).toBe(400);
    expect(((await bad.json()) as { errors: { code: string }[] }).errors[0]!.code).toMatch(
      /NAME_INVALID|TAG_INVALID|INVALID_REQUEST/,
    );
  } finally {
    await pc.stop();
    rmSync(root, { recursive: true, force: true });
  }
});
