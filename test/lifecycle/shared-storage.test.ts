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
  const here = new Lifecycle({
    retention: { maxSize: 0, minFree: 0, lowWater: 1, unusedFor: 0, sweepInterval: 0 },
    configPins: [],
    driver,
    blobs,
    repositories,
    cache: cache(),
    manifestMemory: { forget: () => {} },
    upstreams: ['docker.io'],
    log: silentLogger(),
    metrics: new Metrics(),
    fetching: () => false,
    uploadsPurgeAge: 0,
    replicas: {},
  });
  try {
    await here.whenReady();
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
    for (const event of said) await here.keeper.removedElsewhere(event);
    expect(await counted()).toEqual(whole);

    // Heard once it is gone from storage: the graph drops it, bytes and all.
    for (const event of await removeElsewhere()) await here.keeper.removedElsewhere(event);
    expect(await counted()).toEqual([0, 0]);
    expect(here.graph.repositories.size).toBe(0);
  } finally {
    await here.close();
  }
});

test('a recount learns what storage holds; calls made before it starts share it', async () => {
  const { driver, blobs, repositories } = storage();
  const lifecycle = new Lifecycle({
    retention: { maxSize: 0, minFree: 0, lowWater: 1, unusedFor: 0, sweepInterval: 0 },
    configPins: [],
    driver,
    blobs,
    repositories,
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
    expect(await lifecycle.images()).toEqual([]);
    // Stored by another process whose messages were lost on the way.
    await storeWhole(blobs, repositories, makeImage('org/app', 'v1', 'oci', [3000]));
    const scans: number[] = [];
    const listed = blobs.list.bind(blobs);
    blobs.list = () => {
      scans.push(Date.now());
      return listed();
    };
    const [first, second] = [lifecycle.recount(), lifecycle.recount()];
    expect(second).toBe(first);
    await Promise.all([first, second]);
    expect(scans).toHaveLength(1);
    expect(await lifecycle.images()).toHaveLength(1);
    // A call once the count is done gets one of its own.
    await lifecycle.recount();
    expect(scans).toHaveLength(2);
  } finally {
    await lifecycle.close();
  }
});
