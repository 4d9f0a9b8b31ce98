/**
 * What a power loss can leave on the filesystem, which does not flush blob data: a manifest at
 * its final name with the wrong bytes (none, or zeros). It is never served: its bytes are checked
 * against its digest when read from the disk, and it is fetched again (missing while offline). A
 * layer torn short is found by the count at start, which compares stored sizes with the sizes the
 * manifests give, and removed by the serving owner once hashed (src/lifecycle/torn.ts), never by
 * a command; it is replaced by its next verified commit too (blob-store.test.ts).
 */
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { afterAll, beforeAll, expect, test } from 'vitest';
import { openCacheAdmin, type CacheAdmin } from '../../src/commands/cache.js';
import { parseConfig } from '../../src/config/load.js';
import { ImageGraph } from '../../src/lifecycle/image-graph.js';
import { Removal } from '../../src/lifecycle/removal.js';
import type { RemovedEvent } from '../../src/lifecycle/types.js';
import { silentLogger } from '../../src/log/logger.js';
import { KeyvMetadataCache } from '../../src/metadata/keyv-cache.js';
import type { MetadataCache } from '../../src/metadata/types.js';
import { digestOf, parseDigest, type Digest } from '../../src/oci/digest.js';
import { parseRepository, parseTag } from '../../src/oci/reference.js';
import { createRuntime } from '../../src/runtime.js';
import { DriverBlobStore } from '../../src/storage/blob-store.js';
import { FilesystemDriver } from '../../src/storage/filesystem-driver.js';
import { LocalManifestService } from '../../src/storage/local-services.js';
import { DriverRepositoryStore } from '../../src/storage/repository-store.js';
import type { BlobStore, RepositoryStore } from '../../src/storage/types.js';
import { storedBlobPath } from '../helpers/files.js';
import { makeImage, ociManifest, pushImage, type Image } from '../helpers/images.js';
import { capturedLog, startPullcache } from '../helpers/pullcache.js';
import { Recorder } from '../helpers/recorder.js';
import { TestRegistry } from '../helpers/registry.js';

let registry: TestRegistry;
let recorder: Recorder;
let image: Image;
let root: string;

const sha = (b: Uint8Array) => `sha256:${createHash('sha256').update(b).digest('hex')}`;

beforeAll(async () => {
  registry = await TestRegistry.start();
  image = makeImage('org/torn', 'v1', 'oci', [300_000]);
  await pushImage(registry, image);
  recorder = await Recorder.start(registry.url);
  root = mkdtempSync(join(tmpdir(), 'pullcache-torn-'));
});
afterAll(async () => {
  await recorder?.close();
  await registry?.close();
  if (root) rmSync(root, { recursive: true, force: true });
});

/** A pullcache on `root` (a new process: nothing in memory), for as long as `run` takes. */
async function withPullcache(offline: boolean, run: (url: string) => Promise<void>): Promise<void> {
  const pc = await startPullcache(
    { upstreams: { 'docker.io': { url: recorder.url, ...(offline ? { offline: true } : {}) } } },
    root,
  );
  try {
    await run(pc.url);
  } finally {
    await pc.stop();
  }
}

const getManifest = (url: string) =>
  fetch(`${url}/v2/${image.repository}/manifests/${image.digest}`, {
    headers: { accept: image.mediaType },
  });

test('a manifest torn at its name (zeros, or nothing) is never served: fetched again, or missing while offline', async () => {
  const layer = image.blobs.at(-1)!;
  await withPullcache(false, async (url) => {
    expect((await getManifest(url)).status).toBe(200);
    const blob = await fetch(`${url}/v2/${image.repository}/blobs/${layer.digest}`);
    expect(sha(Buffer.from(await blob.arrayBuffer()))).toBe(layer.digest);
  });
  const manifestFile = storedBlobPath(root, image.digest);
  expect(readFileSync(manifestFile).equals(image.manifest)).toBe(true);

  // Power lost: the manifest's blocks were never written (zeros, of the right size).
  writeFileSync(manifestFile, Buffer.alloc(image.manifest.length));
  await withPullcache(false, async (url) => {
    const before = recorder.requests.length;
    const res = await getManifest(url);
    expect(res.status).toBe(200);
    const body = Buffer.from(await res.arrayBuffer());
    expect(sha(body)).toBe(image.digest);
    // Fetched again from the upstream, and stored whole.
    expect(
      recorder.requests
        .slice(before)
        .some((r) => r.path === `/v2/${image.repository}/manifests/${image.digest}`),
    ).toBe(true);
    expect(readFileSync(manifestFile).equals(image.manifest)).toBe(true);
    // Served from then on without the upstream.
    const after = recorder.requests.length;
    expect(sha(Buffer.from(await (await getManifest(url)).arrayBuffer()))).toBe(image.digest);
    expect(recorder.requests.length).toBe(after);
  });

  // Torn to nothing, and the upstream is offline: answered as a manifest never stored is,
  // never with the torn bytes.
  writeFileSync(manifestFile, '');
  await withPullcache(true, async (url) => {
    const res = await getManifest(url);
    const never = await fetch(`${url}/v2/${image.repository}/manifests/${sha(Buffer.from('x'))}`, {
      headers: { accept: image.mediaType },
    });
    expect(res.status).not.toBe(200);
    expect(res.status).toBe(never.status);
    const [error, neverError] = [await res.json(), await never.json()] as {
      errors: { code: string }[];
    }[];
    expect(error!.errors[0]!.code).toBe(neverError!.errors[0]!.code);
  });
});

test('torn bytes read while another request stores the manifest whole: the whole copy is served, not removed', async () => {
  const manifest = Buffer.from(
    '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}',
  );
  const digest = sha(manifest) as Digest;
  const reads = [Buffer.alloc(manifest.length), manifest]; // torn, then stored whole meanwhile
  let removed = 0;
  const blobs = {
    open: async () => ({ found: true, stream: Readable.from([reads.shift() ?? manifest]) }),
    remove: async () => void removed++,
  } as unknown as BlobStore;
  const link = { digest, mediaType: 'application/vnd.oci.image.manifest.v1+json', size: 10 };
  const cache = {
    getManifest: async () => link,
    deleteDescriptor: async () => {},
  } as unknown as MetadataCache;
  const service = new LocalManifestService(blobs, {} as RepositoryStore, cache);
  const got = await service.get(
    { upstream: 'docker.io', repository: parseRepository('a/b') },
    digest,
  );
  expect(got.found && got.bytes.equals(manifest)).toBe(true);
  expect(removed).toBe(0);
});

/** Storage roots the layer tests made, removed at the end. */
const dataRoots: string[] = [];
afterAll(() => {
  for (const data of dataRoots) rmSync(data, { recursive: true, force: true });
});

const upstreams = () => ({ upstreams: { 'docker.io': { url: recorder.url } } });

/** A pullcache serving `data`, with its log lines kept. */
async function serving(data: string) {
  const { log, lines } = capturedLog('info');
  const pc = await startPullcache(upstreams(), data, { log });
  const removedLines = () =>
    lines.filter((l) => String(l.msg).startsWith('a stored blob does not match'));
  return { pc, removedLines };
}

/** Pulls an image whole through pullcache, each blob checked against its digest. */
async function pull(url: string, img: Image): Promise<void> {
  const res = await fetch(`${url}/v2/${img.repository}/manifests/${img.tag}`, {
    headers: { accept: img.mediaType },
  });
  expect(res.status).toBe(200);
  await res.arrayBuffer();
  for (const blob of img.blobs) {
    const got = await fetch(`${url}/v2/${img.repository}/blobs/${blob.digest}`);
    expect(sha(Buffer.from(await got.arrayBuffer()))).toBe(blob.digest);
  }
}

/**
 * A storage root that holds two images pulled whole, then a power loss: the last 100,000 bytes
 * of `torn`'s layer never written. `lying`'s manifest gives its layer one byte more than it has
 * (the registry checks only that the blob exists): the layer is whole, only the manifest is wrong.
 */
async function tornStorage() {
  const torn = makeImage('org/torn-layer', 'v1', 'oci', [200_000]);
  const lying = makeImage('org/lying-size', 'v1', 'oci', [150_000]);
  const json = JSON.parse(lying.manifest.toString()) as { layers: { size: number }[] };
  json.layers[0]!.size += 1;
  lying.manifest = Buffer.from(JSON.stringify(json));
  lying.digest = sha(lying.manifest);
  for (const img of [torn, lying]) await pushImage(registry, img);
  const data = mkdtempSync(join(tmpdir(), 'pullcache-torn-layer-'));
  dataRoots.push(data);
  const pc = await startPullcache(upstreams(), data);
  try {
    for (const img of [torn, lying]) await pull(pc.url, img);
  } finally {
    await pc.stop();
  }
  const layer = torn.blobs.at(-1)!;
  const layerFile = storedBlobPath(data, layer.digest);
  writeFileSync(layerFile, layer.bytes.subarray(0, 100_000));
  return {
    data,
    torn,
    layer,
    layerFile,
    lyingFile: storedBlobPath(data, lying.blobs.at(-1)!.digest),
  };
}

test('a layer torn short at its name is found by the count at start of the serving owner: removed, and fetched again whole; a layer a manifest gives a wrong size is kept', async () => {
  const { data, torn, layer, layerFile, lyingFile } = await tornStorage();
  const { pc, removedLines } = await serving(data);
  try {
    await pc.runtime.lifecycle.settle(); // the count at start, and the check of what it found
    expect(existsSync(layerFile)).toBe(false);
    expect(removedLines()).toEqual([
      expect.objectContaining({ digest: layer.digest, bytes: 100_000 }),
    ]);
    expect(existsSync(lyingFile)).toBe(true);
    const before = recorder.requests.length;
    await pull(pc.url, torn);
    expect(
      recorder.requests.slice(before).filter((r) => r.path.endsWith(`/blobs/${layer.digest}`)),
    ).not.toEqual([]);
    expect(readFileSync(layerFile).equals(layer.bytes)).toBe(true);
  } finally {
    await pc.stop();
  }
});

test('the commands (ls, du, gc --dry-run) on storage with no server count it and remove no torn layer: only the serving owner does', async () => {
  const { data, layerFile } = await tornStorage();
  const config = parseConfig({ ...upstreams(), storage: { filesystem: { root: data } } });
  // As the CLI opens the cache for each of them (src/cli.ts).
  for (const command of [
    (admin: CacheAdmin) => admin.images(),
    (admin: CacheAdmin) => admin.usage(),
    (admin: CacheAdmin) => admin.gc(true),
  ]) {
    const runtime = await createRuntime(config, silentLogger());
    try {
      const admin = await openCacheAdmin(runtime, config);
      expect(admin.via).toBe('storage');
      await command(admin);
      await runtime.lifecycle.settle();
    } finally {
      await runtime.close();
    }
    expect(statSync(layerFile).size).toBe(100_000);
  }
});

test('a torn layer being served is not removed; the next count after it is released removes it', async () => {
  const { data, layer, layerFile } = await tornStorage();
  // Whole when the server starts; torn under it while it runs, for its next count to find.
  writeFileSync(layerFile, layer.bytes);
  const { pc, removedLines } = await serving(data);
  try {
    await pc.runtime.lifecycle.settle();
    writeFileSync(layerFile, layer.bytes.subarray(0, 100_000));
    const release = pc.runtime.lifecycle.serve(parseDigest(layer.digest).digest);
    await pc.runtime.lifecycle.sweep(); // counts storage afresh
    await pc.runtime.lifecycle.settle();
    expect(statSync(layerFile).size).toBe(100_000);
    expect(removedLines()).toEqual([]);
    release();
    await pc.runtime.lifecycle.sweep();
    await pc.runtime.lifecycle.settle();
    expect(existsSync(layerFile)).toBe(false);
    expect(removedLines()).toEqual([expect.objectContaining({ digest: layer.digest })]);
  } finally {
    await pc.stop();
  }
});

test('sha512 blobs are hashed with sha512: a torn one is removed, a whole one a manifest gives a wrong size is kept', async () => {
  const data = mkdtempSync(join(tmpdir(), 'pullcache-torn-sha512-'));
  dataRoots.push(data);
  const driver = new FilesystemDriver(data);
  const blobs = new DriverBlobStore(driver, { deleteEnabled: true });
  const repositories = new DriverRepositoryStore(driver);
  const repo = { upstream: 'docker.io', repository: parseRepository('org/sha512') };
  const blob = (bytes: Buffer) => ({ bytes, digest: digestOf(bytes, 'sha512') });
  const config = blob(Buffer.from('{"architecture":"amd64","os":"linux"}'));
  const [torn, whole] = [blob(randomBytes(60_000)), blob(randomBytes(50_000))];
  const mediaType = 'application/vnd.oci.image.manifest.v1+json';
  const manifest = ociManifest({ size: config.bytes.length, digest: config.digest }, [
    { size: torn.bytes.length, digest: torn.digest },
    // Wrong: the layer is whole.
    { size: whole.bytes.length + 1, digest: whole.digest },
  ]);
  const digest = digestOf(manifest);
  for (const b of [config, torn, whole]) {
    await blobs.put(b.bytes, b.digest);
    await repositories.linkBlob(repo, { digest: b.digest, size: b.bytes.length });
  }
  await blobs.put(manifest, digest, mediaType);
  await repositories.linkManifest(repo, { digest, mediaType, size: manifest.length });
  await repositories.setTag(repo, parseTag('v1'), { digest, confirmedAt: Date.now() });
  const tornFile = storedBlobPath(data, torn.digest);
  writeFileSync(tornFile, torn.bytes.subarray(0, 30_000));

  const { pc, removedLines } = await serving(data);
  try {
    await pc.runtime.lifecycle.settle();
    expect(existsSync(tornFile)).toBe(false);
    expect(readFileSync(storedBlobPath(data, whole.digest)).equals(whole.bytes)).toBe(true);
    expect(removedLines()).toEqual([
      expect.objectContaining({ digest: torn.digest, bytes: 30_000 }),
    ]);
  } finally {
    await pc.stop();
  }
});

test('a torn blob replaced by a whole copy after it was hashed is kept: removed only while it is the file hashed', async () => {
  const data = mkdtempSync(join(tmpdir(), 'pullcache-torn-replaced-'));
  dataRoots.push(data);
  const driver = new FilesystemDriver(data);
  const blobs = new DriverBlobStore(driver, { deleteEnabled: true });
  const bytes = randomBytes(40_000);
  const digest = digestOf(bytes);
  await blobs.put(bytes, digest);
  const cache = new KeyvMetadataCache({ store: 'memory', log: silentLogger() });
  await cache.setDescriptor({ digest, size: bytes.length });
  // Linked to a repository, which keeps its link (its next pull fetches the blob again).
  const repo = { upstream: 'docker.io', repository: parseRepository('org/app') };
  await cache.setRepositoryDescriptor(repo, { digest, size: bytes.length });
  const graph = new ImageGraph();
  graph.addBlob(digest, 10_000, Date.now());
  graph.linkBlob(repo, digest);
  const removed: RemovedEvent[] = [];
  const removal = new Removal({
    graph: () => graph,
    blobs,
    repositories: new DriverRepositoryStore(driver),
    cache,
    manifestMemory: { forget() {} },
    inUse: () => false,
    onRemoved: (event) => removed.push(event),
  });
  // Hashed torn at 10,000 bytes; a fetch has stored it whole since.
  expect(await removal.removeTorn(digest, 10_000)).toBe(false);
  expect((await blobs.stat(digest)).found).toBe(true);
  expect(removed).toEqual([]);
  // Still the file hashed: it goes, as any blob's data does (caches, graph, the others told).
  writeFileSync(storedBlobPath(data, digest), bytes.subarray(0, 10_000));
  expect(await removal.removeTorn(digest, 10_000)).toBe(true);
  expect((await blobs.stat(digest)).found).toBe(false);
  expect(await cache.getDescriptor(digest)).toBeUndefined();
  expect(await cache.getRepositoryDescriptor(repo, digest)).toBeUndefined();
  expect(graph.blobs.has(digest)).toBe(false);
  expect(removed).toEqual([{ kind: 'blob', digest }]);
});
