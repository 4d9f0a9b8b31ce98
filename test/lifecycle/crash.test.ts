/**
 * A process killed (SIGKILL) in the middle of an eviction leaves a consistent cache: a restart
 * with the upstream offline serves every image it still lists, whole, and no tag points at a
 * missing manifest.
 */
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, expect, test } from 'vitest';
import { parseManifest, referencedDescriptors } from '../../src/oci/manifest.js';
import { makeImage, makeIndex, pushImage, type Image } from '../helpers/images.js';
import { freePort } from '../helpers/net.js';
import { startPullcache } from '../helpers/pullcache.js';
import { TestRegistry } from '../helpers/registry.js';

const IMAGES = 60;
let registry: TestRegistry;
const images: Image[] = [];
let root: string;

beforeAll(async () => {
  registry = await TestRegistry.start();
  const shared = makeImage('org/shared', 'v1', 'oci', [4000]);
  for (let i = 0; i < IMAGES; i++) {
    const image =
      i % 10 === 0
        ? makeIndex(`org/img${i}`, 'v1', 'oci', ['amd64', 'arm64'])
        : makeImage(`org/img${i}`, 'v1', 'oci', [2000 + i]);
    // Every third image also carries a layer others carry: shared blobs must outlive any one.
    if (i % 3 === 0 && !image.children) {
      const manifest = JSON.parse(image.manifest.toString()) as { layers: unknown[] };
      const sharedLayer = shared.blobs[1]!;
      manifest.layers.push({
        mediaType: sharedLayer.mediaType,
        size: sharedLayer.bytes.length,
        digest: sharedLayer.digest,
      });
      image.manifest = Buffer.from(JSON.stringify(manifest));
      image.digest = `sha256:${createHash('sha256').update(image.manifest).digest('hex')}`;
      image.blobs.push(sharedLayer);
    }
    images.push(image);
    await pushImage(registry, image);
  }
  root = mkdtempSync(join(tmpdir(), 'pullcache-crash-'));
  // Fill the cache through pullcache, by plain HTTP: manifests, children and every blob.
  const pc = await startPullcache({ upstreams: { 'docker.io': { url: registry.url } } }, root);
  try {
    for (const image of images) await pullWhole(pc.url, image.repository, image.tag);
  } finally {
    await pc.stop();
  }
});
afterAll(async () => {
  await registry?.close();
  if (root) rmSync(root, { recursive: true, force: true });
});

const ACCEPT = [
  'application/vnd.oci.image.index.v1+json',
  'application/vnd.oci.image.manifest.v1+json',
  'application/vnd.docker.distribution.manifest.v2+json',
  'application/vnd.docker.distribution.manifest.list.v2+json',
].join(', ');

const sha = (b: Uint8Array) => `sha256:${createHash('sha256').update(b).digest('hex')}`;

/** Pulls a manifest and everything it references; every byte is checked against its digest. */
async function pullWhole(base: string, repository: string, reference: string): Promise<void> {
  const res = await fetch(`${base}/v2/${repository}/manifests/${reference}`, {
    headers: { accept: ACCEPT },
  });
  expect(res.status, `${repository}:${reference}`).toBe(200);
  const bytes = Buffer.from(await res.arrayBuffer());
  if (reference.startsWith('sha256:')) expect(sha(bytes)).toBe(reference);
  expect(res.headers.get('docker-content-digest')).toBe(sha(bytes));
  const manifest = parseManifest(bytes, res.headers.get('content-type') ?? undefined);
  for (const d of referencedDescriptors(manifest)) {
    if (manifest.kind === 'index') {
      await pullWhole(base, repository, d.digest);
      continue;
    }
    const blob = await fetch(`${base}/v2/${repository}/blobs/${d.digest}`);
    expect(blob.status, `${repository} blob ${d.digest}`).toBe(200);
    expect(sha(Buffer.from(await blob.arrayBuffer()))).toBe(d.digest);
  }
}

/** Starts `pullcache serve` in a child with a budget that evicts nearly everything, kills it. */
async function killDuringEviction(delayMs: number): Promise<void> {
  const port = await freePort();
  const config = join(root, '..', `crash-${port}.yaml`);
  writeFileSync(
    config,
    [
      `server: { listen: "127.0.0.1:${port}" }`,
      `storage: { filesystem: { root: "${root}" } }`,
      `upstreams: { docker.io: { url: "${registry.url}" } }`,
      'retention: { maxSize: 20000, lowWater: "50%" }',
      'log: { level: info }',
    ].join('\n'),
  );
  const child = spawn(
    process.execPath,
    ['--import', import.meta.resolve('tsx'), 'src/cli.ts', 'serve', '--config', config],
    { stdio: ['ignore', 'pipe', 'pipe'] },
  );
  let out = '';
  await new Promise<void>((resolve, reject) => {
    let killing = false;
    const read = (chunk: Buffer) => {
      out += chunk.toString();
      // The eviction starts right after the scan: kill it a little way in.
      if (!killing && out.includes('"storage scanned"')) {
        killing = true;
        setTimeout(() => child.kill('SIGKILL'), delayMs);
      }
    };
    // The log goes to stderr.
    child.stdout!.on('data', read);
    child.stderr!.on('data', read);
    child.once('exit', (code, signal) =>
      signal === 'SIGKILL' ? resolve() : reject(new Error(`exited ${code}: ${out}`)),
    );
    child.once('error', reject);
    setTimeout(() => {
      child.kill('SIGKILL'); // never leave a server behind
      reject(new Error(`no scan in 30 s: ${out}`));
    }, 30_000).unref();
  });
  rmSync(config, { force: true });
}

test('SIGKILL in the middle of an eviction, then a restart with the upstream offline serves every image it still lists, whole', async () => {
  // Manifests held, in every repository: an eviction only removes. (Images listed may
  // grow by one: an index's platform manifests left by a kill after its own removal are images
  // of their own, whole, removal.ts.)
  const all = images.reduce((n, image) => n + 1 + (image.children?.length ?? 0), 0);
  let heldBefore = all;
  for (const delay of [10, 20, 30, 45, 60, 90]) {
    await killDuringEviction(delay);
    // The upstream is offline: only what storage holds can be served.
    const pc = await startPullcache(
      { upstreams: { 'docker.io': { url: registry.url, offline: true } } },
      root,
    );
    try {
      const listed = await pc.runtime.lifecycle.images();
      const held = [...pc.runtime.lifecycle.graph.repositories.values()].reduce(
        (n, node) => n + node.manifests.size,
        0,
      );
      expect(held).toBeLessThanOrEqual(heldBefore);
      heldBefore = held;
      for (const image of listed) {
        for (const reference of image.references) {
          const at = reference.lastIndexOf(reference.includes('@') ? '@' : ':');
          await pullWhole(pc.url, image.repository, reference.slice(at + 1));
        }
      }
      // No tag of any repository points at a manifest storage does not hold.
      for (const node of pc.runtime.lifecycle.graph.repositories.values())
        for (const [tag, digest] of node.tags)
          expect(node.manifests.has(digest), `${node.key.repository}:${tag}`).toBe(true);
    } finally {
      await pc.stop();
    }
  }
  // The kills landed during evictions: something was removed, and not everything at once.
  expect(heldBefore).toBeLessThan(all);
});

test('a process killed between a blob commit and its layer link: served offline after a restart, for a manifest of the repository names it', async () => {
  const image = makeImage('org/unlinked', 'v1', 'oci', [3000]);
  await pushImage(registry, image);
  const data = mkdtempSync(join(tmpdir(), 'pullcache-unlinked-'));
  try {
    const online = await startPullcache(
      { upstreams: { 'docker.io': { url: registry.url } } },
      data,
    );
    const get = (pc: { url: string }, path: string, accept?: string) =>
      fetch(`${pc.url}/v2/org/unlinked/${path}`, accept ? { headers: { accept } } : {});
    expect((await get(online, 'manifests/v1', image.mediaType)).status).toBe(200);
    for (const blob of image.blobs)
      expect((await (await get(online, `blobs/${blob.digest}`)).arrayBuffer()).byteLength).toBe(
        blob.bytes.length,
      );
    // A blob of another repository, stored too.
    const other = images[1]!.blobs[1]!;
    const res = await fetch(`${online.url}/v2/${images[1]!.repository}/blobs/${other.digest}`);
    expect((await res.arrayBuffer()).byteLength).toBe(other.bytes.length);
    await online.stop();
    // What the kill leaves: the layer committed, its link not written.
    const layer = image.blobs[1]!;
    const hex = layer.digest.slice('sha256:'.length);
    rmSync(join(data, 'repositories/docker.io/org/unlinked/_layers/sha256', hex), {
      recursive: true,
    });
    const offline = await startPullcache(
      { upstreams: { 'docker.io': { url: registry.url, offline: true } } },
      data,
    );
    try {
      await offline.runtime.lifecycle.settle(); // the count that knows the manifest's blobs
      const res = await get(offline, `blobs/${layer.digest}`);
      expect(res.status).toBe(200);
      const bytes = Buffer.from(await res.arrayBuffer());
      expect(`sha256:${createHash('sha256').update(bytes).digest('hex')}`).toBe(layer.digest);
      // A stored blob no manifest of the repository names stays refused offline, as a digest
      // stored nowhere is (503: not which digests are stored).
      expect((await get(offline, `blobs/${other.digest}`)).status).toBe(503);
    } finally {
      await offline.stop();
    }
  } finally {
    rmSync(data, { recursive: true, force: true });
  }
});
