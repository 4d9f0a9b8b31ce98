/**
 * The lifecycle's writes and removals where storage changes under it: the collection after a
 * scan that another process wrote under (the scan lists blobs before links and tags, so an image
 * a worker or replica stored in between has its links and tag in the graph and not its blobs:
 * storage, not the graph, decides what is missing), and the last pulls a failed write must not
 * lose.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, expect, test } from 'vitest';
import { ImageGraph } from '../../src/lifecycle/image-graph.js';
import { Lifecycle } from '../../src/lifecycle/lifecycle.js';
import type { RemovedEvent } from '../../src/lifecycle/types.js';
import { Metrics } from '../../src/metrics.js';
import { PullRecorder } from '../../src/lifecycle/pulls.js';
import { Removal } from '../../src/lifecycle/removal.js';
import { scanStorage } from '../../src/lifecycle/scan.js';
import { silentLogger } from '../../src/log/logger.js';
import { KeyvMetadataCache } from '../../src/metadata/keyv-cache.js';
import { parseDigest, type Digest } from '../../src/oci/digest.js';
import { parseRepository, parseTag } from '../../src/oci/reference.js';
import { DriverBlobStore } from '../../src/storage/blob-store.js';
import { FilesystemDriver } from '../../src/storage/filesystem-driver.js';
import { DriverRepositoryStore } from '../../src/storage/repository-store.js';
import { paths } from '../../src/storage/paths.js';
import type { BlobStore, RepositoryKey, RepositoryStore } from '../../src/storage/types.js';
import { makeImage, type Image } from '../helpers/images.js';

const roots: string[] = [];
afterEach(() => {
  for (const root of roots.splice(0)) rmSync(root, { recursive: true, force: true });
});

const repo = { upstream: 'docker.io', repository: parseRepository('org/app') } as RepositoryKey;

/** A storage directory of its own, and its stores. */
function storage() {
  const root = mkdtempSync(join(tmpdir(), 'pullcache-shared-'));
  roots.push(root);
  const driver = new FilesystemDriver(root);
  return {
    driver,
    blobs: new DriverBlobStore(driver, { deleteEnabled: true }),
    repositories: new DriverRepositoryStore(driver),
  };
}

/** Stores an image as another process would, in the order pullcache stores one: blobs, links, tag. */
async function storeWhole(
  blobs: BlobStore,
  repositories: RepositoryStore,
  image: Image,
): Promise<void> {
  for (const b of image.blobs) {
    const d = parseDigest(b.digest).digest;
    await blobs.put(b.bytes, d);
    await repositories.linkBlob(repo, { digest: d, size: b.bytes.length });
  }
  const digest = parseDigest(image.digest).digest;
  await blobs.put(image.manifest, digest, image.mediaType);
  await repositories.linkManifest(repo, {
    digest,
    mediaType: image.mediaType,
    size: image.manifest.length,
  });
  await repositories.setTag(repo, parseTag(image.tag), { digest, confirmedAt: Date.now() });
}

test('an image another process stored while the scan listed blobs is kept whole by the collection', async () => {
  const { blobs, repositories } = storage();
  const image = makeImage('org/app', 'v1', 'oci', [3000]);
  const digest = parseDigest(image.digest).digest;
  const tag = parseTag('v1');

  const storeImage = () => storeWhole(blobs, repositories, image);
  // It stores the image right after the scan's blob listing has gone by.
  const listing: BlobStore = Object.assign(Object.create(blobs) as BlobStore, {
    async *list() {
      yield* blobs.list();
      await storeImage();
    },
  });
  const graph = new ImageGraph();
  await scanStorage({
    graph,
    blobs: listing,
    repositories,
    upstreams: ['docker.io'],
    log: silentLogger(),
  });
  expect(graph.blobs.size).toBe(0); // the state the collection meets
  expect(graph.repositories.get('docker.io/org/app')?.manifests.has(digest)).toBe(true);

  const removal = new Removal({
    graph: () => graph,
    blobs,
    repositories,
    cache: new KeyvMetadataCache({ store: 'memory', log: silentLogger() }),
    manifestMemory: { forget: () => {} },
    inUse: () => false,
  });
  const report = await removal.collect(false, {
    unlinkedBefore: Date.now() - 60_000,
    uploadsBefore: new Date(0),
  });
  expect(report.removed).toEqual([]);
  expect(await repositories.getTag(repo, tag)).toMatchObject({ digest });
  expect(await repositories.getManifest(repo, digest)).toMatchObject({ digest });
  for (const b of image.blobs) {
    const d = parseDigest(b.digest).digest;
    expect(await repositories.hasBlob(repo, d)).toBe(true);
    expect(graph.blobs.has(d)).toBe(true); // learned from storage
  }
});

test('a last pull that storage did not take is written at the next flush, and the others at once', async () => {
  const { driver, blobs, repositories: stored } = storage();
  const images = [makeImage('org/app', 'a', 'oci', [100]), makeImage('org/app', 'b', 'oci', [200])];
  const digests = images.map((i) => parseDigest(i.digest).digest);
  for (const [i, image] of images.entries()) {
    await stored.linkManifest(repo, {
      digest: digests[i]!,
      mediaType: image.mediaType,
      size: image.manifest.length,
    });
    await driver.touch(paths.manifestRevisionLink(repo, digests[i]!), new Date(1000));
  }
  // Storage refuses the first write of a last pull (an S3 503 past its retries), then answers.
  let refusals = 1;
  const repositories = Object.assign(Object.create(stored) as RepositoryStore, {
    markManifestPulled(r: RepositoryKey, d: Digest, at: number) {
      if (refusals-- > 0) return Promise.reject(new Error('storage did not answer'));
      return stored.markManifestPulled(r, d, at);
    },
  });
  const graph = new ImageGraph();
  const pulls = new PullRecorder({
    change: (apply) => {
      apply(graph);
      return graph;
    },
    blobs,
    repositories,
  });
  pulls.graphReady();
  const at = Date.now();
  for (const d of digests) pulls.pulled(repo, d, at, true);
  await expect(pulls.flush()).rejects.toThrow('storage did not answer');
  const times = async () =>
    Object.fromEntries((await stored.listManifests(repo)).map((m) => [m.digest, m.pulledAt]));
  // The second was written at once; the first waits for the next flush, not for another pull.
  expect(await times()).toEqual({ [digests[0]!]: 1000, [digests[1]!]: at });
  await pulls.flush();
  expect(await times()).toEqual({ [digests[0]!]: at, [digests[1]!]: at });
});

test('what another process removed leaves the graph once storage agrees, not before', async () => {
  const { driver, blobs, repositories } = storage();
  const image = makeImage('org/app', 'v1', 'oci', [3000, 5000]);
  await storeWhole(blobs, repositories, image);
  const cache = () => new KeyvMetadataCache({ store: 'memory', log: silentLogger() });
  await withLifecycle({ driver, blobs, repositories }, async (here) => {
    const counted = async () => [(await here.images()).length, (await here.usage()).bytes];
    const whole = await counted();
    expect(whole[0]).toBe(1);

    // The other process removes the image, and says what left storage as it goes.
    const removeElsewhere = async () => {
      const graph = new ImageGraph();
      await scanStorage({
        graph,
        blobs,
        repositories,
        upstreams: ['docker.io'],
        log: silentLogger(),
      });
      const said: RemovedEvent[] = [];
      const removal = new Removal({
        graph: () => graph,
        blobs,
        repositories,
        cache: cache(),
        manifestMemory: { forget: () => {} },
        inUse: () => false,
        onRemoved: (event) => said.push(event),
      });
      const node = graph.repositories.get('docker.io/org/app')!;
      await removal.removeImage(node, graph.image(node, graph.roots(node)[0]!));
      return said;
    };
    const said = await removeElsewhere();
    expect(said.map((e) => e.kind).sort()).toEqual(
      ['blob', 'blob', 'blob', 'blob', 'link', 'link', 'link', 'manifest', 'tag'].sort(),
    );

    // Heard after the image was stored again (by a third process): storage still holds it all,
    // and the graph keeps it.
    await storeWhole(blobs, repositories, image);
    for (const event of said) await here.keeper.changedElsewhere(event);
    expect(await counted()).toEqual(whole);

    // Heard once it is gone from storage: the graph drops it, bytes and all.
    for (const event of await removeElsewhere()) await here.keeper.changedElsewhere(event);
    expect(await counted()).toEqual([0, 0]);
    expect(here.graph.repositories.size).toBe(0);
  });
});

/**
 * A process's lifecycle on `stores`, sharing them with others (no budget, no sweep): `body` runs
 * once its start-up scan is done, and the lifecycle is closed after.
 */
async function withLifecycle(
  stores: Pick<ReturnType<typeof storage>, 'driver' | 'blobs' | 'repositories'>,
  body: (lifecycle: Lifecycle) => Promise<void>,
): Promise<void> {
  const lifecycle = new Lifecycle({
    ...stores,
    retention: { maxSize: 0, minFree: 0, lowWater: 1, unusedFor: 0, sweepInterval: 0 },
    configPins: [],
    cache: new KeyvMetadataCache({ store: 'memory', log: silentLogger() }),
    manifestMemory: { forget: () => {} },
    upstreams: ['docker.io'],
    log: silentLogger(),
    metrics: new Metrics(),
    fetching: () => false,
    uploadsPurgeAge: 0,
    replicas: {},
  });
  try {
    await lifecycle.whenReady();
    await body(lifecycle);
  } finally {
    await lifecycle.close();
  }
}

/** Makes the first call of `object[name]` wait, after doing its work, until `release` is called. */
function holdFirstCall<T extends object, K extends keyof T>(object: T, name: K) {
  const real = (object[name] as (...args: unknown[]) => Promise<unknown>).bind(object);
  let release!: () => void;
  const gate = new Promise<void>((r) => (release = r));
  let calls = 0;
  let entered!: () => void;
  const started = new Promise<void>((r) => (entered = r));
  (object as Record<K, unknown>)[name] = async (...args: unknown[]) => {
    const first = calls++ === 0;
    if (first) entered();
    const result = await real(...args);
    if (first) await gate;
    return result;
  };
  return { started, release: () => release(), calls: () => calls };
}

test('a recount learns what storage holds; calls made before it starts share it', async () => {
  const stores = storage();
  const { blobs, repositories } = stores;
  await withLifecycle(stores, async (lifecycle) => {
    expect(await lifecycle.images()).toEqual([]);
    // Stored by another process whose messages were lost on the way.
    await storeWhole(blobs, repositories, makeImage('org/app', 'v1', 'oci', [3000]));
    // The first count's listing of blobs waits, once it has listed them, until released.
    const listed = blobs.list.bind(blobs);
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    let started!: () => void;
    const listing = {
      calls: 0,
      started: new Promise<void>((r) => (started = r)),
      release: () => release(),
    };
    blobs.list = async function* () {
      const first = listing.calls++ === 0;
      if (first) started();
      yield* listed();
      if (first) await gate;
    };
    const [first, second] = [lifecycle.recount(), lifecycle.recount()];
    expect(second).toBe(first);
    // Once the count has begun, a call may be about what it has read past: it gets its own.
    await listing.started;
    const third = lifecycle.recount();
    expect(third).not.toBe(first);
    listing.release();
    await Promise.all([first, second, third]);
    expect(listing.calls).toBe(2);
    expect(await lifecycle.images()).toHaveLength(1);
  });
});

test('a removal heard while this process links the manifest again leaves it in the graph', async () => {
  const stores = storage();
  const { blobs, repositories } = stores;
  const image = makeImage('org/app', 'v1', 'oci', [3000]);
  const digest = parseDigest(image.digest).digest;
  await storeWhole(blobs, repositories, image);
  await withLifecycle(stores, async (here) => {
    expect(await here.images()).toHaveLength(1);
    // Another process unlinks the manifest and says so; this one reads storage: gone.
    await repositories.unlinkManifest(repo, digest);
    const reading = holdFirstCall(repositories, 'getManifest');
    const heard = here.keeper.changedElsewhere({ kind: 'manifest', repo, digest });
    await reading.started;
    // Meanwhile this process links it again (a pull): what it did itself wins over that read.
    await repositories.linkManifest(repo, {
      digest,
      mediaType: image.mediaType,
      size: image.manifest.length,
    });
    await here.keeper.stored({ kind: 'manifest', repo, digest });
    reading.release();
    await heard;
    expect(await here.images()).toHaveLength(1);
  });
});

test('a stored message read before a removal, and the removal heard after it, leave nothing', async () => {
  const stores = storage();
  const { blobs, repositories } = stores;
  await withLifecycle(stores, async (here) => {
    const image = makeImage('org/app', 'v1', 'oci', [3000]);
    const digest = parseDigest(image.digest).digest;
    await storeWhole(blobs, repositories, image);
    // The stored message's read finds the manifest, and is slow to come back...
    const reading = holdFirstCall(repositories, 'getManifest');
    const stored = here.keeper.changedElsewhere({ kind: 'manifest', repo, digest });
    await reading.started;
    // ...while the manifest is removed, and that is heard too: it waits for the first read.
    await repositories.unlinkManifest(repo, digest);
    const removed = here.keeper.changedElsewhere({ kind: 'manifest', repo, digest });
    reading.release();
    await Promise.all([stored, removed]);
    expect(here.graph.repositories.get('docker.io/org/app')?.manifests.has(digest)).toBeFalsy();
  });
});
