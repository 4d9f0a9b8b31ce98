import { randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, test } from 'vitest';
import { EMPTY_BLOB_DIGEST, digestOf, type Digest } from '../../src/oci/digest.js';
import {
  BlobUnknownError,
  BlobUploadUnknownError,
  DigestMismatchError,
  RangeInvalidError,
  SizeInvalidError,
  UnsupportedError,
} from '../../src/oci/errors.js';
import { parseRepository, parseTag } from '../../src/oci/reference.js';
import { DriverBlobStore } from '../../src/storage/blob-store.js';
import { FilesystemDriver } from '../../src/storage/filesystem-driver.js';
import { paths } from '../../src/storage/paths.js';
import { DriverRepositoryStore } from '../../src/storage/repository-store.js';
import type { OpenResult } from '../../src/storage/types.js';

let root: string;
let store: DriverBlobStore;

beforeEach(() => {
  root = mkdtempSync(join(tmpdir(), 'pullcache-storage-'));
  store = new DriverBlobStore(new FilesystemDriver(root), { deleteEnabled: true });
});
afterEach(() => rmSync(root, { recursive: true, force: true }));

async function read(result: OpenResult): Promise<Buffer> {
  if (!result.found) throw new Error('not found');
  const chunks: Buffer[] = [];
  for await (const c of result.stream) chunks.push(c as Buffer);
  return Buffer.concat(chunks);
}

describe('blob upload sessions', () => {
  test('resume after cancel reports an unknown upload', async () => {
    const w = await store.create();
    await w.write(Buffer.from('abc'));
    await w.cancel();
    await expect(store.resume(w.id)).rejects.toBeInstanceOf(BlobUploadUnknownError);
  });

  test('write, close, resume at the stored offset, commit; then resume is unknown', async () => {
    const data = randomBytes(100_000);
    const digest = digestOf(data);
    const w = await store.create();
    await w.write(data.subarray(0, 40_000));
    await w.close();
    const resumed = await store.resume(w.id);
    expect(resumed.size).toBe(40_000);
    await resumed.write(data.subarray(40_000));
    const descriptor = await resumed.commit({ digest, size: data.length });
    expect(descriptor).toEqual({ digest, size: data.length });
    await expect(store.resume(w.id)).rejects.toBeInstanceOf(BlobUploadUnknownError);
    expect(await store.stat(digest)).toEqual({ found: true, descriptor });
    expect(digestOf(await read(await store.open(digest)))).toBe(digest);
  });

  test('ranged and offset reads', async () => {
    const data = randomBytes(10_000);
    const digest = digestOf(data);
    await store.put(data, digest);
    expect(
      (await read(await store.open(digest, { start: 100, end: 199 }))).equals(
        data.subarray(100, 200),
      ),
    ).toBe(true);
    expect(
      (await read(await store.open(digest, { start: 9_000 }))).equals(data.subarray(9_000)),
    ).toBe(true);
    expect(
      (await read(await store.open(digest, { start: 9_990, end: 20_000 }))).equals(
        data.subarray(9_990),
      ),
    ).toBe(true);
    await expect(store.open(digest, { start: 10_000 })).rejects.toBeInstanceOf(RangeInvalidError);
  });

  test('delete makes stat and open unknown; the blob can be uploaded again', async () => {
    const data = Buffer.from('to be deleted');
    const digest = digestOf(data);
    await store.put(data, digest);
    await store.delete(digest);
    expect(await store.stat(digest)).toEqual({ found: false });
    expect(await store.open(digest)).toEqual({ found: false });
    await expect(store.delete(digest)).rejects.toBeInstanceOf(BlobUnknownError);
    await store.put(data, digest);
    expect((await store.stat(digest)).found).toBe(true);
  });

  test('delete is refused when deletes are disabled', async () => {
    const readOnly = new DriverBlobStore(new FilesystemDriver(root));
    const data = Buffer.from('kept');
    const digest = digestOf(data);
    await readOnly.put(data, digest);
    await expect(readOnly.delete(digest)).rejects.toBeInstanceOf(UnsupportedError);
    expect((await readOnly.stat(digest)).found).toBe(true);
  });

  test('a zero-length blob commits with the empty-blob digest and reads back empty', async () => {
    const w = await store.create();
    const descriptor = await w.commit({ digest: EMPTY_BLOB_DIGEST, size: 0 });
    expect(descriptor.size).toBe(0);
    expect((await read(await store.open(EMPTY_BLOB_DIGEST))).length).toBe(0);
  });

  test('a wrong digest or size on commit fails and leaves nothing visible', async () => {
    const data = Buffer.from('the real content');
    const claimed = digestOf('something else');
    const w = await store.create();
    await w.write(data);
    await expect(w.commit({ digest: claimed })).rejects.toBeInstanceOf(DigestMismatchError);
    expect(await store.stat(claimed)).toEqual({ found: false });
    expect(await store.stat(digestOf(data))).toEqual({ found: false });
    await expect(store.resume(w.id)).rejects.toBeInstanceOf(BlobUploadUnknownError);
    const w2 = await store.create();
    await w2.write(data);
    await expect(
      w2.commit({ digest: digestOf(data), size: data.length + 1 }),
    ).rejects.toBeInstanceOf(SizeInvalidError);
    expect(await store.stat(digestOf(data))).toEqual({ found: false });
  });

  test('a sha512 digest is verified by re-reading the session', async () => {
    const data = randomBytes(5000);
    const digest = digestOf(data, 'sha512');
    const w = await store.create();
    await w.write(data);
    expect((await w.commit({ digest })).digest).toBe(digest);
    expect((await read(await store.open(digest))).equals(data)).toBe(true);
  });

  test('a crash between write and commit leaves no partial blob for a new store', async () => {
    const data = randomBytes(50_000);
    const digest = digestOf(data);
    const w = await store.create();
    await w.write(data);
    // The process dies here: no close, no commit. A new store on the same directory:
    const after = new DriverBlobStore(new FilesystemDriver(root));
    expect(await after.stat(digest)).toEqual({ found: false });
    expect(await after.open(digest)).toEqual({ found: false });
    // The orphaned session is purged once it is old enough.
    expect(await after.purgeUploads(new Date(Date.now() + 1000))).toBe(1);
    expect(readdirSync(join(root, 'uploads'))).toEqual([]);
  });

  test('purge keeps recent sessions and removes old ones, also without a start time', async () => {
    const recent = await store.create();
    const old = await store.create();
    writeFileSync(
      join(root, paths.uploadStartedAt(old.id)),
      new Date(Date.now() - 3 * 86_400_000).toISOString(),
    );
    const broken = await store.create();
    rmSync(join(root, paths.uploadStartedAt(broken.id)));
    const purged = await store.purgeUploads(new Date(Date.now() - 86_400_000));
    expect(purged).toBe(1);
    expect(existsSync(join(root, paths.uploadDir(recent.id)))).toBe(true);
    expect(existsSync(join(root, paths.uploadDir(broken.id)))).toBe(true); // its data file is new
    await expect(store.resume(old.id)).rejects.toBeInstanceOf(BlobUploadUnknownError);
  });

  test('invalid upload ids are unknown uploads, never paths', async () => {
    await expect(store.resume('../../etc')).rejects.toBeInstanceOf(BlobUploadUnknownError);
  });
});

describe('storage paths', () => {
  test('every path stays under the root; bad names and digests never become paths', () => {
    const driver = new FilesystemDriver(root);
    expect(() => driver.resolve('../x')).toThrow();
    expect(() => driver.resolve('blobs/../../x')).toThrow();
    expect(() => paths.blobData('sha256:../../x' as Digest)).toThrow();
    expect(() =>
      paths.repositoryRoot({ upstream: '../x', repository: parseRepository('a') }),
    ).toThrow();
    expect(() =>
      paths.repositoryRoot({ upstream: 'docker.io', repository: '../a' as never }),
    ).toThrow();
  });
});

describe('repository view', () => {
  test('links, manifests and tags per upstream and repository survive a restart', async () => {
    const driver = new FilesystemDriver(root);
    const repos = new DriverRepositoryStore(driver);
    const a = { upstream: 'docker.io', repository: parseRepository('library/alpine') };
    const b = { upstream: 'ghcr.io', repository: parseRepository('library/alpine') };
    const digest = digestOf('manifest');
    await repos.linkManifest(a, {
      digest,
      mediaType: 'application/vnd.oci.image.manifest.v1+json',
      size: 8,
    });
    await repos.setTag(a, parseTag('3.20'), { digest, confirmedAt: 1234 });
    await repos.linkBlob(a, { digest: digestOf('layer'), size: 5 });

    const again = new DriverRepositoryStore(new FilesystemDriver(root));
    expect(await again.getManifest(a, digest)).toEqual({
      digest,
      mediaType: 'application/vnd.oci.image.manifest.v1+json',
      size: 8,
    });
    expect(await again.getTag(a, parseTag('3.20'))).toEqual({ digest, confirmedAt: 1234 });
    expect(await again.hasBlob(a, digestOf('layer'))).toBe(true);
    // The same name under another upstream is another repository.
    expect(await again.getManifest(b, digest)).toBeUndefined();
    expect(await again.getTag(b, parseTag('3.20'))).toBeUndefined();
    expect(await again.listTags(a)).toEqual(['3.20']);
    expect(await again.listRepositories('docker.io')).toEqual(['library/alpine']);
    expect(await again.listRepositories('ghcr.io')).toEqual([]);
    await again.deleteTag(a, parseTag('3.20'));
    expect(await again.listTags(a)).toEqual([]);
  });

  test('nested repositories are listed, and their data dirs are not', async () => {
    const repos = new DriverRepositoryStore(new FilesystemDriver(root));
    const digest = digestOf('m');
    for (const name of ['org/app', 'org/app/sub', 'other']) {
      await repos.linkManifest(
        { upstream: 'docker.io', repository: parseRepository(name) },
        { digest, mediaType: 'x', size: 1 },
      );
    }
    expect(await repos.listRepositories('docker.io')).toEqual(['org/app', 'org/app/sub', 'other']);
  });
});
