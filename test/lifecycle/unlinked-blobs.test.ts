/**
 * Blobs no repository links yet are collected only 10 minutes after their last use (a commit is
 * one): `pullcache import` stages a whole bundle before it commits and links, and a sweep of the
 * server beside it must not take what it committed before its links are written.
 */
import { randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, rmSync, statSync, utimesSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, expect, test } from 'vitest';
import { ImageGraph } from '../../src/lifecycle/image-graph.js';
import { Removal } from '../../src/lifecycle/removal.js';
import { silentLogger } from '../../src/log/logger.js';
import { KeyvMetadataCache } from '../../src/metadata/keyv-cache.js';
import { digestOf, type Digest } from '../../src/oci/digest.js';
import { parseRepository } from '../../src/oci/reference.js';
import { DriverBlobStore } from '../../src/storage/blob-store.js';
import { FilesystemDriver } from '../../src/storage/filesystem-driver.js';
import { paths } from '../../src/storage/paths.js';
import { DriverRepositoryStore } from '../../src/storage/repository-store.js';
import { storedBlobPath } from '../helpers/files.js';
import { startPullcache, type TestPullcache } from '../helpers/pullcache.js';

const HOUR = 3_600_000;
const hourAgo = () => new Date(Date.now() - HOUR);

let root: string;
beforeEach(() => {
  root = mkdtempSync(join(tmpdir(), 'pullcache-unlinked-'));
});
afterEach(() => rmSync(root, { recursive: true, force: true }));

test('a blob committed from a session written an hour ago survives a sweep before it is linked; one unused for an hour does not', async () => {
  const pc: TestPullcache = await startPullcache(
    { upstreams: { 'docker.io': { url: 'http://registry.invalid' } } },
    root,
  );
  try {
    const { blobs, repositories, lifecycle } = pc.runtime;
    await lifecycle.whenReady();
    // Staged like an import stages a bundle: written, closed, and committed an hour later.
    const staged = randomBytes(50_000);
    const digest = digestOf(staged);
    const w = await blobs.create({ hash: false });
    await w.write(staged);
    await w.close();
    const session = join(root, paths.uploadData(w.id));
    utimesSync(session, hourAgo(), hourAgo());
    await (await blobs.resume(w.id)).commit({ digest, size: staged.length, verified: true });

    // A blob nobody used for an hour, for comparison: the sweep does collect those.
    const unused = randomBytes(40_000);
    await blobs.put(unused, digestOf(unused));
    utimesSync(storedBlobPath(root, digestOf(unused)), hourAgo(), hourAgo());

    // `pullcache gc` (the sweep's collection, storage counted afresh first).
    const report = await lifecycle.gc(false);
    expect(report.removed.map((r) => r.name)).toEqual([digestOf(unused)]);
    expect(existsSync(storedBlobPath(root, digestOf(unused)))).toBe(false);
    expect(existsSync(storedBlobPath(root, digest))).toBe(true);
    // Its last use is its commit.
    expect(statSync(storedBlobPath(root, digest)).mtimeMs).toBeGreaterThan(Date.now() - 60_000);

    // The import links it now, and it is the repository's.
    const repo = { upstream: 'docker.io', repository: parseRepository('org/app') };
    await repositories.linkBlob(repo, { digest, size: staged.length });
    await lifecycle.gc(false);
    expect(existsSync(storedBlobPath(root, digest))).toBe(true);
  } finally {
    await pc.stop();
  }
});

test("the collection reads a blob's last use again from storage before it removes it: another process may have just committed or used it", async () => {
  const driver = new FilesystemDriver(root);
  const blobs = new DriverBlobStore(driver);
  const data = randomBytes(30_000);
  const digest = digestOf(data);
  await blobs.put(data, digest);
  // The count saw it unused for an hour; another process committed or used it since.
  const graph = new ImageGraph();
  graph.addBlob(digest, data.length, Date.now() - HOUR);
  const gone = digestOf('counted, not stored');
  graph.addBlob(gone, 5, Date.now() - HOUR);
  const removal = new Removal({
    graph: () => graph,
    blobs,
    repositories: new DriverRepositoryStore(driver),
    cache: new KeyvMetadataCache({ store: 'memory', log: silentLogger() }),
    manifestMemory: { forget() {} },
    inUse: () => false,
    // As the lifecycle gives it (src/lifecycle/lifecycle.ts).
    lastPulled: async (d: Digest) => (await driver.stat(paths.blobData(d)))?.modTime.getTime(),
  });
  const report = await removal.collect(false, {
    unlinkedBefore: Date.now() - 10 * 60_000,
    uploadsBefore: new Date(0),
  });
  expect(report.removed.map((r) => r.name)).toEqual([gone]);
  expect((await blobs.stat(digest)).found).toBe(true);
  // The graph learned the time storage has.
  expect(graph.blobs.get(digest)!.pulledAt).toBeGreaterThan(Date.now() - 60_000);
});
