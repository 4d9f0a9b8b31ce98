/**
 * The storage contract, on every driver: the same tests on the filesystem and on S3 (a real
 * Ceph radosgw, see test/helpers/s3.ts).
 */
import { randomBytes, randomUUID } from 'node:crypto';
import { existsSync, readdirSync, utimesSync, writeFileSync } from 'node:fs';
import { basename, join } from 'node:path';
import { ListMultipartUploadsCommand } from '@aws-sdk/client-s3';
import { open } from 'node:fs/promises';
import { beforeEach, describe, expect, test, vi } from 'vitest';
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
import { S3Driver } from '../../src/storage/s3-driver.js';
import type { OpenResult, StorageDriver } from '../../src/storage/types.js';
import { DRIVERS, useStorage } from '../helpers/storage-drivers.js';

async function read(result: OpenResult): Promise<Buffer> {
  if (!result.found) throw new Error('not found');
  const chunks: Buffer[] = [];
  for await (const c of result.stream) chunks.push(c as Buffer);
  return Buffer.concat(chunks);
}

describe.each(DRIVERS)('storage contract on %s', (kind) => {
  const storage = useStorage(kind);
  let driver: StorageDriver;
  let store: DriverBlobStore;

  beforeEach(() => {
    driver = storage.open();
    store = new DriverBlobStore(driver, { deleteEnabled: true });
  });

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
      const readOnly = new DriverBlobStore(storage.open());
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
      // Past one part (5 MiB in these tests): on S3 a multipart upload is under way.
      const data = randomBytes(6 * 1024 * 1024);
      const digest = digestOf(data);
      const w = await store.create();
      await w.write(data);
      // The process dies here: no close, no commit. A new store on the same storage:
      const after = new DriverBlobStore(storage.open());
      expect(await after.stat(digest)).toEqual({ found: false });
      expect(await after.open(digest)).toEqual({ found: false });
      // The orphaned session is purged once it is old enough (on S3 its upload is aborted too).
      expect(await after.purgeUploads(new Date(Date.now() + 1000))).toBeGreaterThanOrEqual(1);
      expect(await driver.list(paths.uploadsRoot())).toEqual([]);
      if (storage.s3) {
        const { Uploads } = await storage.s3.client.send(
          new ListMultipartUploadsCommand({ Bucket: storage.bucket!, Prefix: storage.prefix! }),
        );
        expect(Uploads ?? []).toEqual([]);
      }
      // The dead process's descriptor, which its exit would have closed.
      await w.cancel();
    });

    test('purge keeps recent sessions and removes old ones, also without a start time', async () => {
      const recent = await store.create();
      const old = await store.create();
      await driver.putContent(
        paths.uploadStartedAt(old.id),
        new Date(Date.now() - 3 * 86_400_000).toISOString(),
      );
      const broken = await store.create();
      await driver.delete(paths.uploadStartedAt(broken.id));
      const purged = await store.purgeUploads(new Date(Date.now() - 86_400_000));
      expect(purged).toBe(1);
      const left = await driver.list(paths.uploadsRoot());
      expect(left).toContain(recent.id);
      expect(left).not.toContain(old.id);
      await expect(store.resume(old.id)).rejects.toBeInstanceOf(BlobUploadUnknownError);
      // The one without a start time is judged by its data, which is new: kept, and resumable.
      await broken.write(Buffer.from('x'));
      await broken.commit({ digest: digestOf('x') });
      expect((await store.stat(digestOf('x'))).found).toBe(true);
      await Promise.all([recent.cancel(), old.cancel()]);
    });

    test('a blob of several parts commits whole; ranges across parts read back', async () => {
      const data = randomBytes(11 * 1024 * 1024 + 123);
      const digest = digestOf(data);
      const w = await store.create();
      for (let i = 0; i < data.length; i += 1024 * 1024)
        await w.writev([data.subarray(i, Math.min(i + 1024 * 1024, data.length))]);
      expect(await store.stat(digest)).toEqual({ found: false });
      await w.commit({ digest, size: data.length });
      expect(digestOf(await read(await store.open(digest)))).toBe(digest);
      const start = 5 * 1024 * 1024 - 10;
      expect(
        (await read(await store.open(digest, { start, end: start + 99 }))).equals(
          data.subarray(start, start + 100),
        ),
      ).toBe(true);
    });

    test('a spare upload (the blob expected from another process): sent nowhere while held, dropped at a commit that finds the blob, stored whole by one that does not', async () => {
      const multipartUploads = async () =>
        storage.s3
          ? ((
              await storage.s3.client.send(
                new ListMultipartUploadsCommand({
                  Bucket: storage.bucket!,
                  Prefix: storage.prefix!,
                }),
              )
            ).Uploads ?? [])
          : [];
      const data = randomBytes(11 * 1024 * 1024 + 5);
      const digest = digestOf(data);
      const spare = await store.create({ hash: false });
      spare.expectStoredElsewhere();
      for (let i = 0; i < data.length; i += 1024 * 1024)
        await spare.writev([data.subarray(i, Math.min(i + 1024 * 1024, data.length))]);
      // Two parts' worth written, none sent; still readable here for the clients behind.
      expect(await multipartUploads()).toEqual([]);
      const tail = await read({
        found: true,
        descriptor: { digest, size: data.length },
        stream: await spare.readWritten(data.length - 100, 100),
      });
      expect(tail.equals(data.subarray(data.length - 100))).toBe(true);
      // Another process stores the blob meanwhile.
      const other = await store.create();
      await other.writev([data]);
      await other.commit({ digest, size: data.length });
      expect(await spare.commit({ digest, size: data.length, verified: true })).toEqual({
        digest,
        size: data.length,
      });
      expect(await driver.stat(paths.uploadData(spare.id))).toBeUndefined();
      expect(await multipartUploads()).toEqual([]);
      expect(digestOf(await read(await store.open(digest)))).toBe(digest);

      // Nobody stored this one: the spare is sent at its commit, and is the blob.
      const lone = randomBytes(11 * 1024 * 1024 + 7);
      const held = await store.create({ hash: false });
      held.expectStoredElsewhere();
      await held.writev([lone]);
      expect(await multipartUploads()).toEqual([]);
      await held.commit({ digest: digestOf(lone), size: lone.length, verified: true });
      expect((await read(await store.open(digestOf(lone)))).equals(lone)).toBe(true);
      expect(await driver.list(paths.uploadsRoot())).toEqual([]);

      // One given up (the peer failed, no client left) sends nothing either, and leaves nothing.
      const dropped = randomBytes(11 * 1024 * 1024 + 9);
      const given = await store.create({ hash: false, digest: digestOf(dropped) });
      given.expectStoredElsewhere();
      await given.writev([dropped]);
      await given.cancel();
      expect(await multipartUploads()).toEqual([]);
      expect(await store.stat(digestOf(dropped))).toEqual({ found: false });
      expect(await driver.list(paths.uploadsRoot())).toEqual([]);
    });

    test('a session opened for its digest: nothing visible before a checked commit; a wrong size, digest or a close never makes it the blob', async () => {
      const data = randomBytes(11 * 1024 * 1024 + 3);
      const digest = digestOf(data);
      const open = async () => {
        const w = await store.create({ hash: false, digest });
        await w.writev([data]);
        return w;
      };
      // On S3 the parts go to the blob's own key, and stay invisible until the commit.
      const w = await open();
      if (storage.s3) {
        const { Uploads } = await storage.s3.client.send(
          new ListMultipartUploadsCommand({ Bucket: storage.bucket!, Prefix: storage.prefix! }),
        );
        expect((Uploads ?? []).map((u) => u.Key)).toEqual([
          storage.prefix! + paths.blobData(digest),
        ]);
      }
      expect(await store.stat(digest)).toEqual({ found: false });
      await expect(w.close()).rejects.toThrow(/cannot be kept for a resume/);
      await expect(w.commit({ digest, size: data.length + 1, verified: true })).rejects.toThrow(
        SizeInvalidError,
      );
      expect(await store.stat(digest)).toEqual({ found: false });
      // Another digest than the session's, and bytes that do not match when not verified.
      const other = digestOf(Buffer.from('other'));
      await expect((await open()).commit({ digest: other, verified: true })).rejects.toThrow(
        /opened for another blob/,
      );
      const bad = await store.create({ digest });
      await bad.writev([data.subarray(1)]);
      await expect(bad.commit({ digest })).rejects.toThrow(DigestMismatchError);
      expect(await store.stat(digest)).toEqual({ found: false });
      expect(await store.stat(other)).toEqual({ found: false });
      // The same for a blob smaller than one part (one PUT at the commit on S3).
      const small = randomBytes(100_000);
      const smallDigest = digestOf(small);
      const wrong = await store.create({ digest: smallDigest });
      await wrong.writev([small.subarray(1)]);
      await expect(wrong.commit({ digest: smallDigest })).rejects.toThrow(DigestMismatchError);
      const short = await store.create({ hash: false, digest: smallDigest });
      await short.writev([small]);
      await expect(
        short.commit({ digest: smallDigest, size: small.length - 1, verified: true }),
      ).rejects.toThrow(SizeInvalidError);
      expect(await store.stat(smallDigest)).toEqual({ found: false });
      const right = await store.create({ digest: smallDigest });
      await right.writev([small]);
      await right.commit({ digest: smallDigest });
      expect((await read(await store.open(smallDigest))).equals(small)).toBe(true);
      // A verified commit is the blob, whole; and its session is gone.
      const good = await open();
      expect(await good.commit({ digest, size: data.length, verified: true })).toEqual({
        digest,
        size: data.length,
      });
      expect((await read(await store.open(digest))).equals(data)).toBe(true);
      expect(await driver.list(paths.uploadsRoot())).toEqual([]);
      if (storage.s3) {
        const { Uploads } = await storage.s3.client.send(
          new ListMultipartUploadsCommand({ Bucket: storage.bucket!, Prefix: storage.prefix! }),
        );
        expect(Uploads ?? []).toEqual([]);
      }
    });

    test('what is written so far is readable by followers before the commit', async () => {
      const data = randomBytes(7 * 1024 * 1024);
      const w = await store.create();
      await w.write(data.subarray(0, 6 * 1024 * 1024));
      const chunks: Buffer[] = [];
      for await (const c of await w.readWritten(1000, 6 * 1024 * 1024 - 1000))
        chunks.push(c as Buffer);
      expect(Buffer.concat(chunks).equals(data.subarray(1000, 6 * 1024 * 1024))).toBe(true);
      const stream = await w.readWritten(10, 100);
      const buffer = Buffer.alloc(100);
      expect(await stream.readInto(buffer, 100)).toBe(100);
      stream.destroy();
      expect(buffer.equals(data.subarray(10, 110))).toBe(true);
      await w.write(data.subarray(6 * 1024 * 1024));
      await w.commit({ digest: digestOf(data) });
      expect(digestOf(await read(await store.open(digestOf(data))))).toBe(digestOf(data));
    });

    test('a last pull is kept and listed with the blob, and survives a new store', async () => {
      const data = Buffer.from('pulled');
      const digest = digestOf(data);
      await store.put(data, digest);
      const longAgo = Date.now() - 3 * 86_400_000;
      // Pulled long ago (the time as storage keeps it); a pull before that changes nothing.
      await driver.touch(paths.blobData(digest), new Date(longAgo));
      await store.markPulled(digest, longAgo - 60_000);
      await store.markPulled(digestOf('not stored'), longAgo); // no error
      // A stat tells the time recorded, exactly.
      expect((await storage.open().stat(paths.blobData(digest)))?.modTime.getTime()).toBe(longAgo);
      await store.markPulled(digest, longAgo + 1000);
      expect((await storage.open().stat(paths.blobData(digest)))?.modTime.getTime()).toBe(
        longAgo + 1000,
      );
      // A listing tells it to within seconds (on S3 it is the time of the record itself).
      const now = Date.now();
      await store.markPulled(digest, now);
      const listed = [];
      for await (const blob of new DriverBlobStore(storage.open()).list()) listed.push(blob);
      expect(listed).toEqual([{ digest, size: data.length, pulledAt: expect.any(Number) }]);
      expect(Math.abs(listed[0]!.pulledAt - now)).toBeLessThan(5000);
    });

    test('an exclusive create is won once; a missing path is undefined, an empty list []', async () => {
      expect(await driver.createExclusive('lifecycle/lock', 'a')).toBe(true);
      expect(await storage.open().createExclusive('lifecycle/lock', 'b')).toBe(false);
      expect((await driver.getContent('lifecycle/lock')).toString()).toBe('a');
      expect(await driver.stat('no/such/file')).toBeUndefined();
      expect(await driver.list('no/such/dir')).toEqual([]);
      await expect(driver.getContent('no/such/file')).rejects.toThrow(/path not found/);
      await expect(driver.touch('no/such/file', new Date())).rejects.toThrow(/path not found/);
      // delete takes a whole tree and is quiet about what is not there.
      await driver.putContent('tree/a/b', '1');
      await driver.putContent('tree/c', '2');
      await driver.delete('tree');
      await driver.delete('tree');
      expect(await driver.list('tree')).toEqual([]);
      expect((await driver.stat(''))?.isDirectory).toBe(true);
    });

    test("a commit is the blob's first use: its last pull is the commit, however long ago its session was written", async () => {
      // An import stages every blob of a bundle, then commits them all: a session may have been
      // written long before its commit, and a sweep collects an unlinked blob not used for 10
      // minutes. Here the session was written an hour ago (on S3 a copy makes a new object: its
      // time is the commit's whatever the session's).
      const data = randomBytes(70_000);
      const digest = digestOf(data);
      const w = await store.create({ hash: false });
      await w.write(data);
      await w.close();
      if (!storage.s3) await driver.touch(paths.uploadData(w.id), new Date(Date.now() - 3_600_000));
      const before = Date.now();
      await (await store.resume(w.id)).commit({ digest, size: data.length, verified: true });
      // To the second: S3 keeps times in whole seconds.
      const modTime = (await storage.open().stat(paths.blobData(digest)))!.modTime.getTime();
      expect(modTime).toBeGreaterThanOrEqual(before - 1000);
      const listed = [];
      for await (const blob of new DriverBlobStore(storage.open()).list()) listed.push(blob);
      expect(listed).toEqual([{ digest, size: data.length, pulledAt: expect.any(Number) }]);
      expect(listed[0]!.pulledAt).toBeGreaterThanOrEqual(before - 1000);
    });

    test('a blob torn at its name (another size: a power loss) is replaced by the next verified commit or put', async () => {
      const data = randomBytes(80_000);
      const digest = digestOf(data);
      // What a power loss leaves where the data was never flushed: the name, with no bytes.
      await driver.putContent(paths.blobData(digest), '');
      expect(await store.stat(digest)).toEqual({ found: true, descriptor: { digest, size: 0 } });
      const w = await store.create();
      await w.write(data);
      expect(await w.commit({ digest, size: data.length })).toEqual({ digest, size: data.length });
      expect((await read(await store.open(digest))).equals(data)).toBe(true);
      expect(await driver.list(paths.uploadsRoot())).toEqual([]);
      // Torn halfway, written again by a session opened for its digest (S3: at its own key).
      await driver.putContent(paths.blobData(digest), data.subarray(0, 1000));
      const again = await store.create({ hash: false, digest });
      await again.writev([data]);
      await again.commit({ digest, size: data.length, verified: true });
      expect((await read(await store.open(digest))).equals(data)).toBe(true);
      // A manifest's bytes (put whole from memory) the same.
      const manifest = Buffer.from('{"schemaVersion":2}');
      await driver.putContent(paths.blobData(digestOf(manifest)), '');
      expect(await store.put(manifest, digestOf(manifest))).toEqual({
        digest: digestOf(manifest),
        size: manifest.length,
      });
      expect((await read(await store.open(digestOf(manifest)))).equals(manifest)).toBe(true);
      // One whole is kept as it is: a commit that finds it drops its own upload.
      const kept = await store.create();
      await kept.write(data);
      await kept.commit({ digest, size: data.length });
      expect((await read(await store.open(digest))).equals(data)).toBe(true);
      expect(await driver.list(paths.uploadsRoot())).toEqual([]);
    });

    test('invalid upload ids are unknown uploads, never paths', async () => {
      await expect(store.resume('../../etc')).rejects.toBeInstanceOf(BlobUploadUnknownError);
    });
  });

  describe('storage paths', () => {
    test('every path stays under the root; bad names and digests never become paths', () => {
      const d = driver;
      if (d instanceof FilesystemDriver) {
        expect(() => d.resolve('../x')).toThrow();
        expect(() => d.resolve('blobs/../../x')).toThrow();
      }
      if (d instanceof S3Driver) {
        expect(() => d.key('../x')).toThrow();
        expect(() => d.key('blobs/../../x')).toThrow();
        expect(d.key('blobs/x')).toBe(`${storage.prefix}blobs/x`);
      }
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

      const again = new DriverRepositoryStore(storage.open());
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

    test("a manifest's last pull never goes back: the later of two processes' records stays", async () => {
      const repo = { upstream: 'docker.io', repository: parseRepository('library/busy') };
      const digest = digestOf('busy manifest');
      await new DriverRepositoryStore(driver).linkManifest(repo, {
        digest,
        mediaType: 'application/vnd.oci.image.manifest.v1+json',
        size: 13,
      });
      // Stored a day ago; two processes on one storage served it since, at t1 and at t2, and the
      // one with the later pull writes first.
      await driver.touch(
        paths.manifestRevisionLink(repo, digest),
        new Date(Date.now() - 86_400_000),
      );
      const t2 = Date.now() - 1000;
      const t1 = t2 - 5000;
      await new DriverRepositoryStore(storage.open()).markManifestPulled(repo, digest, t2);
      await new DriverRepositoryStore(storage.open()).markManifestPulled(repo, digest, t1);
      expect(await new DriverRepositoryStore(storage.open()).listManifests(repo)).toEqual([
        { digest, pulledAt: t2 },
      ]);
    });

    test('nested repositories are listed, and their data dirs are not', async () => {
      const repos = new DriverRepositoryStore(storage.open());
      const digest = digestOf('m');
      for (const name of ['org/app', 'org/app/sub', 'other']) {
        await repos.linkManifest(
          { upstream: 'docker.io', repository: parseRepository(name) },
          { digest, mediaType: 'x', size: 1 },
        );
      }
      expect(await repos.listRepositories('docker.io')).toEqual([
        'org/app',
        'org/app/sub',
        'other',
      ]);
    });
  });
});

describe('filesystem driver: power losses and crash leftovers', () => {
  const storage = useStorage('filesystem');
  const hourAgo = () => new Date(Date.now() - 2 * 3_600_000);

  test('small files are written in .tmp/ and renamed into place; what a killed write left there is purged once stale', async () => {
    const driver = storage.open() as FilesystemDriver;
    const store = new DriverBlobStore(driver);
    await driver.putContent('lifecycle/pins.json', '[]\n');
    expect(await driver.createExclusive('lifecycle/owner.json', '{}')).toBe(true);
    expect(readdirSync(join(storage.root!, 'lifecycle')).sort()).toEqual([
      'owner.json',
      'pins.json',
    ]);
    // A process killed between the write and the rename leaves its temporary file; a live
    // write's is young.
    const tmpDir = join(storage.root!, '.tmp');
    expect(readdirSync(tmpDir)).toEqual([]);
    const dead = join(tmpDir, `link.tmp-${randomUUID()}`);
    const live = join(tmpDir, `link.tmp-${randomUUID()}`);
    writeFileSync(dead, 'sha256:0');
    utimesSync(dead, hourAgo(), hourAgo());
    writeFileSync(live, 'sha256:1');
    // The purge of upload sessions (at start and every purgeInterval, and `gc`) takes it, even
    // with the default purgeAge of a day: a write takes milliseconds, not an hour.
    expect(await store.purgeUploads(new Date(Date.now() - 86_400_000))).toBe(1);
    expect(readdirSync(tmpDir)).toEqual([basename(live)]);
  });

  test("the lifecycle's records are flushed to the disk before they are renamed into place; the pull path's small files are not", async () => {
    const driver = storage.open();
    const probe = await open(join(storage.root!, 'probe'), 'w');
    const FileHandle = Object.getPrototypeOf(probe) as { sync: () => Promise<void> };
    await probe.close();
    const sync = vi.spyOn(FileHandle, 'sync');
    try {
      const repo = { upstream: 'docker.io', repository: parseRepository('org/flushed') };
      await new DriverRepositoryStore(driver).setTag(repo, parseTag('v1'), {
        digest: digestOf('m'),
        confirmedAt: 1,
      });
      // A tag (torn, it reads as absent: fetched again): not flushed.
      expect(sync).toHaveBeenCalledTimes(0);
      expect(await driver.createExclusive('lifecycle/owner.json', '{}')).toBe(true);
      await driver.putContent('lifecycle/pins.json', '{"pins":[]}');
      expect(sync).toHaveBeenCalledTimes(2);
      // An upload session's start time: not flushed.
      await new DriverBlobStore(driver).create();
      expect(sync).toHaveBeenCalledTimes(2);
    } finally {
      sync.mockRestore();
    }
  });

  test('a blob whose directory holds a stale temporary file (left beside it by an older version) is removed whole', async () => {
    const driver = storage.open();
    const store = new DriverBlobStore(driver);
    const data = Buffer.from('{"schemaVersion":2,"left":"behind"}');
    const digest = digestOf(data);
    await store.put(data, digest);
    const dir = join(storage.root!, paths.blobData(digest), '..');
    const leftover = join(dir, `data.tmp-${randomUUID()}`);
    writeFileSync(leftover, data.subarray(0, 5));
    utimesSync(leftover, hourAgo(), hourAgo());
    // Hidden from listings, as before.
    expect(await driver.list(dir.slice(storage.root!.length + 1))).toEqual(['data']);
    await store.remove(digest);
    expect(existsSync(dir)).toBe(false);
    // A young one may be a write under way: it keeps its directory.
    await store.put(data, digest);
    const young = join(dir, `data.tmp-${randomUUID()}`);
    writeFileSync(young, '');
    await store.remove(digest);
    expect(readdirSync(dir)).toEqual([basename(young)]);
  });
});
