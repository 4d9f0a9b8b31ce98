/**
 * A recount (every sweep of the owner with replicas, every import beside the server) builds the
 * graph again from storage. Manifests are immutable: one the last count read, still stored with
 * the same size, is taken from that count instead of being read again (on S3, a GET each), and
 * the sizes it gives its blobs still name a blob torn since.
 */
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, expect, test } from 'vitest';
import { GraphKeeper } from '../../src/lifecycle/graph-keeper.js';
import type { Suspect } from '../../src/lifecycle/scan.js';
import { silentLogger } from '../../src/log/logger.js';
import { digestOf, type Digest } from '../../src/oci/digest.js';
import { parseRepository, parseTag } from '../../src/oci/reference.js';
import { DriverBlobStore } from '../../src/storage/blob-store.js';
import { FilesystemDriver } from '../../src/storage/filesystem-driver.js';
import { DriverRepositoryStore } from '../../src/storage/repository-store.js';
import { storedBlobPath } from '../helpers/files.js';
import { ociManifest } from '../helpers/images.js';

const roots: string[] = [];
afterEach(() => roots.splice(0).forEach((r) => rmSync(r, { recursive: true, force: true })));

const mediaType = 'application/vnd.oci.image.manifest.v1+json';

/** Storage with `count` images of a config and a layer each, in one repository. */
async function storage(count: number, options: { expectedPruneMin?: number } = {}) {
  const root = mkdtempSync(join(tmpdir(), 'pullcache-recount-'));
  roots.push(root);
  const driver = new FilesystemDriver(root);
  const blobs = new DriverBlobStore(driver, { deleteEnabled: true });
  const repositories = new DriverRepositoryStore(driver);
  const repo = { upstream: 'docker.io', repository: parseRepository('org/app') };
  const images: { manifest: Digest; layer: { digest: Digest; bytes: Buffer } }[] = [];
  const add = async (i: number) => {
    const config = Buffer.from(`{"architecture":"amd64","os":"linux","n":${i}}`);
    const layer = randomBytes(10_000);
    const [configDigest, layerDigest] = [digestOf(config), digestOf(layer)];
    const manifest = ociManifest({ size: config.length, digest: configDigest }, [
      { size: layer.length, digest: layerDigest },
    ]);
    const digest = digestOf(manifest);
    for (const [bytes, d] of [
      [config, configDigest],
      [layer, layerDigest],
    ] as const) {
      await blobs.put(bytes, d);
      await repositories.linkBlob(repo, { digest: d, size: bytes.length });
    }
    await blobs.put(manifest, digest, mediaType);
    await repositories.linkManifest(repo, { digest, mediaType, size: manifest.length });
    await repositories.setTag(repo, parseTag(`v${i}`), { digest, confirmedAt: Date.now() });
    images.push({ manifest: digest, layer: { digest: layerDigest, bytes: layer } });
    return {
      digest,
      size: manifest.length,
      config: { digest: configDigest, size: config.length },
      layer: { digest: layerDigest, size: layer.length },
    };
  };
  for (let i = 0; i < count; i++) await add(i);
  // Every blob read, by digest: the count reads manifests' bytes only. One in `unreadable` is
  // not found (a fault storage cannot be made to produce on purpose).
  const opened: Digest[] = [];
  const unreadable = new Set<Digest>();
  const open = blobs.open.bind(blobs);
  blobs.open = async (digest, range) => {
    opened.push(digest);
    return unreadable.has(digest) ? { found: false } : open(digest, range);
  };
  const found: Suspect[][] = [];
  const keeper = new GraphKeeper({
    blobs,
    repositories,
    upstreams: ['docker.io'],
    log: silentLogger(),
    now: Date.now,
    added: () => {},
    suspects: (s) => found.push(s),
    ...options,
  });
  return { root, blobs, keeper, images, opened, found, unreadable, repo, add };
}

test('a recount reads no manifest the last count read, and counts the same graph', async () => {
  const { keeper, images, opened } = await storage(20);
  const first = await keeper.recount();
  expect(new Set(opened)).toEqual(new Set(images.map((i) => i.manifest)));
  const graph = keeper.graph;
  opened.length = 0;
  const second = await keeper.recount();
  expect(opened).toEqual([]);
  expect(second).toEqual(first);
  expect(keeper.graph).not.toBe(graph);
  const shape = (g: typeof graph) =>
    [...g.repositories.values()]
      .flatMap((r) =>
        [...r.manifests.values()].map((m) => [m.digest, [...m.blobs].sort(), m.children]),
      )
      .sort((a, b) => String(a[0]).localeCompare(String(b[0])));
  expect(shape(keeper.graph)).toEqual(shape(graph));
  expect(keeper.graph.bytes).toBe(graph.bytes);
});

test('a layer torn after the count that read its manifest is still found by the next', async () => {
  const { root, keeper, images, opened, found } = await storage(3);
  await keeper.recount();
  expect(found.at(-1)).toEqual([]);
  const { layer } = images[1]!;
  writeFileSync(storedBlobPath(root, layer.digest), layer.bytes.subarray(0, 4000));
  opened.length = 0;
  await keeper.recount();
  expect(opened).toEqual([]);
  expect(found.at(-1)).toEqual([{ digest: layer.digest, size: 4000, expected: 10_000 }]);
});

test('a manifest whose bytes could not be read at a count is read again at the next', async () => {
  const { keeper, images, opened, unreadable } = await storage(2);
  const manifest = images[0]!.manifest;
  // Stored, but not found when the count looked (the link made before the bytes were visible).
  unreadable.add(manifest);
  await keeper.recount();
  const node = () => [...keeper.graph.repositories.values()][0]!.manifests.get(manifest)!;
  expect(node().unread).toBe(true);
  unreadable.delete(manifest);
  opened.length = 0;
  await keeper.recount();
  expect(opened).toEqual([manifest]);
  expect(node().unread).toBeUndefined();
  expect(node().blobs).toContain(images[0]!.layer.digest);
});

test('a layer of an image stored after the count, torn since, is found by the next count', async () => {
  const { root, keeper, images, opened, found, repo, add } = await storage(2);
  await keeper.recount();
  // Pulled after the count: told to the graph as the pull path tells it.
  const pulled = await add(2);
  for (const blob of [pulled.config, pulled.layer, pulled])
    await keeper.stored({ kind: 'blob', digest: blob.digest, size: blob.size });
  await keeper.stored({ kind: 'manifest', repo, digest: pulled.digest });
  const { layer } = images[2]!;
  writeFileSync(storedBlobPath(root, layer.digest), layer.bytes.subarray(0, 4000));
  opened.length = 0;
  await keeper.recount();
  expect(opened).toEqual([]); // read when it was stored, not again
  expect(found.at(-1)).toEqual([{ digest: layer.digest, size: 4000, expected: 10_000 }]);
});

test('the sizes noted of manifests that left the graph go (they grew with every manifest stored)', async () => {
  const { root, keeper, images, found, repo, add } = await storage(2, { expectedPruneMin: 8 });
  await keeper.recount();
  const expected = () => keeper['expected'];
  // Pulled, then evicted, one after another, with no recount between (a worker that does not
  // sweep): each left its config's and layer's sizes behind.
  for (let i = 2; i < 32; i++) {
    const pulled = await add(i);
    for (const blob of [pulled.config, pulled.layer, pulled])
      await keeper.stored({ kind: 'blob', digest: blob.digest, size: blob.size });
    await keeper.stored({ kind: 'manifest', repo, digest: pulled.digest });
    keeper.change((g) => g.drop({ kind: 'manifest', repo, digest: pulled.digest }));
  }
  // 64 entries without pruning; pruned, at most twice what was held at the last prune (the two
  // images kept and the one being stored), and one image's more.
  expect(expected().size).toBeLessThanOrEqual(2 * 6 + 2);
  // What the graph still holds keeps its sizes: a torn layer of it is found at the next count.
  for (const image of images.slice(0, 2)) expect(expected().has(image.layer.digest)).toBe(true);
  const { layer } = images[0]!;
  writeFileSync(storedBlobPath(root, layer.digest), layer.bytes.subarray(0, 4000));
  await keeper.recount();
  expect(found.at(-1)).toContainEqual({ digest: layer.digest, size: 4000, expected: 10_000 });
});
