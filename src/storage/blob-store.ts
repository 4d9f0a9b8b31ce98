/**
 * The content-addressed blob store, with upload sessions in the semantics of distribution's
 * blob store: a blob becomes visible only by an atomic move after its digest is verified.
 */
import { createHash, randomUUID, type Hash } from 'node:crypto';
import type { RangeStream } from './file-range.js';
import { digestOf, parseDigest, type Digest } from '../oci/digest.js';
import type { Descriptor } from '../oci/descriptor.js';
import {
  BlobUnknownError,
  BlobUploadUnknownError,
  DigestMismatchError,
  SizeInvalidError,
  UnsupportedError,
} from '../oci/errors.js';
import { isUploadId, paths } from './paths.js';
import { recordPull } from './last-pull.js';
import type {
  BlobStore,
  BlobWriter,
  ByteRange,
  FileWriter,
  OpenResult,
  StatResult,
  StorageDriver,
  StoredBlob,
} from './types.js';
import { resolveRange } from './byte-range.js';
import { PathNotFoundError } from './errors.js';

/** Blobs stat'ed at once when listing storage. */
const LIST_BATCH = 64;

export interface BlobStoreOptions {
  deleteEnabled?: boolean;
}

export class DriverBlobStore implements BlobStore {
  constructor(
    readonly driver: StorageDriver,
    private readonly options: BlobStoreOptions = {},
  ) {}

  async stat(digest: Digest): Promise<StatResult> {
    const info = await this.driver.stat(paths.blobData(digest));
    if (!info || info.isDirectory) return { found: false };
    return { found: true, descriptor: { digest, size: info.size } };
  }

  async open(digest: Digest, range?: ByteRange): Promise<OpenResult> {
    if (this.driver.readRange) return this.openInOne(digest, range);
    const stat = await this.stat(digest);
    if (!stat.found) return { found: false };
    const { start, end } = resolveRange(stat.descriptor.size, range);
    try {
      const stream = await this.driver.reader(paths.blobData(digest), start, end - start + 1);
      return range
        ? { found: true, descriptor: stat.descriptor, stream, range: { start, end } }
        : { found: true, descriptor: stat.descriptor, stream };
    } catch (err) {
      // Deleted between stat and open.
      if (err instanceof PathNotFoundError) return { found: false };
      throw err;
    }
  }

  /** `open` in one request where a stat costs one of its own (S3). */
  private async openInOne(digest: Digest, range?: ByteRange): Promise<OpenResult> {
    const opened = await this.driver.readRange!(
      paths.blobData(digest),
      range?.start ?? 0,
      range?.end,
    );
    if (!opened) return { found: false };
    const descriptor = { digest, size: opened.size };
    if (!range) return { found: true, descriptor, stream: opened.stream };
    const { start, end } = resolveRange(opened.size, range);
    return { found: true, descriptor, stream: opened.stream, range: { start, end } };
  }

  async create(options: { hash?: boolean; digest?: Digest } = {}): Promise<BlobWriter> {
    const id = randomUUID();
    const startedAt = new Date();
    await this.driver.putContent(paths.uploadStartedAt(id), startedAt.toISOString());
    const file = await this.driver.writer(
      paths.uploadData(id),
      false,
      options.digest ? { finalPath: paths.blobData(options.digest) } : undefined,
    );
    // Without a running hash, commit re-reads the data unless the caller verified it itself.
    return new DriverBlobWriter(
      this.driver,
      id,
      startedAt,
      file,
      options.hash === false ? undefined : createHash('sha256'),
      options.digest,
    );
  }

  async resume(id: string): Promise<BlobWriter> {
    if (!isUploadId(id)) throw new BlobUploadUnknownError(id);
    let startedAt: Date;
    try {
      startedAt = new Date(
        (await this.driver.getContent(paths.uploadStartedAt(id))).toString('utf8'),
      );
    } catch (err) {
      if (err instanceof PathNotFoundError) throw new BlobUploadUnknownError(id);
      throw err;
    }
    if (!(await this.driver.stat(paths.uploadData(id)))) throw new BlobUploadUnknownError(id);
    const file = await this.driver.writer(paths.uploadData(id), true);
    // The running hash cannot be persisted; commit re-reads what an earlier process wrote.
    return new DriverBlobWriter(this.driver, id, startedAt, file, undefined);
  }

  async delete(digest: Digest): Promise<void> {
    if (!this.options.deleteEnabled) throw new UnsupportedError('deletes are disabled');
    const stat = await this.stat(digest);
    if (!stat.found) throw new BlobUnknownError(digest);
    await this.remove(digest);
  }

  async put(content: Uint8Array, digest: Digest, mediaType?: string): Promise<Descriptor> {
    const existing = await this.stat(digest);
    // Stored already, unless torn (a power loss can leave a file of the wrong size at its
    // name, where the filesystem does not flush blobs): then it is written again.
    if (existing.found && existing.descriptor.size === content.length) {
      return mediaType ? { ...existing.descriptor, mediaType } : existing.descriptor;
    }
    // Verified in memory, then written whole in one atomic replace: no upload session needed.
    const actual = digestOf(content, parseDigest(digest).algorithm);
    if (actual !== digest) throw new DigestMismatchError(digest, actual);
    await this.driver.putContent(paths.blobData(digest), content);
    const descriptor: Descriptor = { digest, size: content.length };
    if (mediaType) descriptor.mediaType = mediaType;
    return descriptor;
  }

  async *list(): AsyncIterable<StoredBlob> {
    if (this.driver.walk) {
      // One listing request per thousand blobs instead of a stat each.
      for await (const file of this.driver.walk(paths.blobsRoot())) {
        const m = /^blobs\/([a-z0-9]+)\/[0-9a-f]{2}\/([0-9a-f]+)\/data$/.exec(file.path);
        if (!m) continue;
        let digest: Digest;
        try {
          digest = parseDigest(`${m[1]}:${m[2]}`).digest;
        } catch {
          continue; // not ours
        }
        yield { digest, size: file.size, pulledAt: file.modTime.getTime() };
      }
      return;
    }
    for (const algorithm of await this.driver.list(paths.blobsRoot())) {
      for (const prefix of await this.driver.list(`${paths.blobsRoot()}/${algorithm}`)) {
        const hexes = await this.driver.list(`${paths.blobsRoot()}/${algorithm}/${prefix}`);
        // Stat in parallel batches: 100,000 blobs one after the other take several seconds.
        for (let i = 0; i < hexes.length; i += LIST_BATCH) {
          const batch = hexes.slice(i, i + LIST_BATCH).map(async (hex) => {
            let digest: Digest;
            try {
              digest = parseDigest(`${algorithm}:${hex}`).digest;
            } catch {
              return undefined; // not ours
            }
            const info = await this.driver.stat(paths.blobData(digest));
            return info && !info.isDirectory
              ? { digest, size: info.size, pulledAt: info.modTime.getTime() }
              : undefined;
          });
          for (const blob of await Promise.all(batch)) if (blob) yield blob;
        }
      }
    }
  }

  async remove(digest: Digest): Promise<void> {
    const data = paths.blobData(digest);
    await this.driver.deleteFiles([data]);
    await this.driver.deleteEmpty(data.slice(0, data.lastIndexOf('/')), { recursive: false });
  }

  async markPulled(digest: Digest, at: number): Promise<void> {
    await recordPull(this.driver, paths.blobData(digest), at);
  }

  async purgeUploads(olderThan: Date): Promise<number> {
    let purged = 0;
    for (const id of await this.driver.list(paths.uploadsRoot())) {
      if (!isUploadId(id)) continue;
      let started: number;
      try {
        started = Date.parse(
          (await this.driver.getContent(paths.uploadStartedAt(id))).toString('utf8'),
        );
      } catch {
        // A session without its start time is a crash's leftover: judge it by its data file.
        started =
          (
            (await this.driver.stat(paths.uploadData(id))) ??
            (await this.driver.stat(paths.uploadDir(id)))
          )?.modTime.getTime() ?? 0;
      }
      if (!(started >= olderThan.getTime())) {
        await this.driver.delete(paths.uploadDir(id));
        purged++;
      }
    }
    // Writes a dead process left unfinished (S3 multipart uploads, of a session or at a blob's
    // own key): invisible, but they cost.
    if (this.driver.abortIncomplete)
      purged += await this.driver.abortIncomplete(
        [paths.uploadsRoot(), paths.blobsRoot()],
        olderThan,
      );
    return purged;
  }
}

class DriverBlobWriter implements BlobWriter {
  private done = false;
  private file: FileWriter | undefined;

  constructor(
    private readonly driver: StorageDriver,
    readonly id: string,
    readonly startedAt: Date,
    file: FileWriter,
    /** Hash of every byte from 0 when this process saw them all; else undefined. */
    private hash: Hash | undefined,
    /** The blob the session was opened for: it commits as that one only. */
    private readonly openedFor?: Digest,
  ) {
    this.file = file;
  }

  get size(): number {
    return this.file?.size ?? 0;
  }

  async write(chunk: Uint8Array): Promise<void> {
    const file = this.openFile();
    this.hash?.update(chunk);
    await file.write(chunk);
  }

  async writev(chunks: readonly Uint8Array[]): Promise<void> {
    const file = this.openFile();
    for (const chunk of chunks) this.hash?.update(chunk);
    await file.writev(chunks);
  }

  async close(): Promise<void> {
    // Where the file is written at the blob's own place (S3), closing would make unverified
    // bytes the blob: such a session is made whole in one go.
    if (this.openedFor)
      throw new Error('an upload opened for its blob cannot be kept for a resume');
    await this.file?.close();
    this.file = undefined;
    this.done = true;
  }

  async commit(expected: {
    digest: Digest;
    size?: number;
    mediaType?: string;
    verified?: boolean;
  }): Promise<Descriptor> {
    const file = this.openFile();
    const parsed = parseDigest(expected.digest);
    const size = file.size;
    const target = paths.blobData(expected.digest);
    this.done = true;
    try {
      if (this.openedFor !== undefined && this.openedFor !== expected.digest)
        throw new Error(`this upload was opened for another blob than ${expected.digest}`);
      // Both checked before anything is sent or completed (the upload read back from where it
      // is written, if the caller did not verify it): a wrong blob costs no upload, and one
      // written at its own key (S3) is never completed unchecked.
      if (expected.size !== undefined && expected.size !== size)
        throw new SizeInvalidError(expected.size, size);
      const actual = await this.digestOf(expected, parsed.algorithm);
      if (actual !== expected.digest) throw new DigestMismatchError(expected.digest, actual);
      // Stored already (another process fetched it too): the upload is needless, and is
      // dropped before it is completed (on S3, before a held-back upload is sent at all). Not
      // when what is there has another size than these verified bytes: a file torn by a power
      // loss (the filesystem does not flush blob data), which this commit replaces.
      if ((await this.driver.stat(target))?.size === size) {
        await file.cancel();
        this.file = undefined;
      } else {
        await file.close();
        this.file = undefined;
        // Where a copy and a delete are separate requests (S3), the upload's delete goes with
        // the session's own below, in one. A write completed at the blob's key needs neither.
        if (!file.completesAt)
          await (this.driver.copy
            ? this.driver.copy(paths.uploadData(this.id), target)
            : this.driver.move(paths.uploadData(this.id), target));
        // A blob's last pull is its modification time, and a commit is its first use. A move
        // keeps the time of the session's last write, which may be long past (an import stages
        // every blob of a bundle before it commits them, for as long as reading it takes), and
        // a sweep collects an unlinked blob whose last use is 10 minutes old: the blob must
        // start now, or it may be collected before its link is written. A copy (S3) or a
        // completed upload is a new object, of the current time already. (A completed
        // multipart upload on AWS may carry the time it began; RGW's is its completion.)
        if (!this.driver.copy && !file.completesAt)
          await this.driver.touch(target, new Date()).catch((err: unknown) => {
            if (!(err instanceof PathNotFoundError)) throw err; // removed at once: no matter
          });
      }
    } finally {
      // A file left open by a failure above (the store unreachable) goes with its session.
      await this.file?.cancel().catch(() => {});
      this.file = undefined;
      await this.removeSession();
    }
    const descriptor: Descriptor = { digest: expected.digest, size };
    if (expected.mediaType) descriptor.mediaType = expected.mediaType;
    return descriptor;
  }

  expectStoredElsewhere(): void {
    this.file?.holdBack?.();
  }

  expectSize(size: number): void {
    this.file?.expectSize?.(size);
  }

  async cancel(): Promise<void> {
    this.done = true;
    // Not `close`: on S3 that would send what is held back, or complete a write at the blob's
    // own key.
    await this.file?.cancel().catch(() => {});
    this.file = undefined;
    await this.removeSession();
  }

  /** The digest of what was written: the caller's word, the running hash, or a read-back. */
  private async digestOf(expected: { digest: Digest; verified?: boolean }, algorithm: string) {
    if (expected.verified) return expected.digest;
    if (this.hash && algorithm === 'sha256') return `sha256:${this.hash.digest('hex')}`;
    return this.rehash(algorithm);
  }

  /** The session's two files and its directory: no listing needed (S3 would LIST for it). */
  private async removeSession(): Promise<void> {
    await this.driver.deleteFiles([paths.uploadData(this.id), paths.uploadStartedAt(this.id)]);
    await this.driver.deleteEmpty(paths.uploadDir(this.id), { recursive: false });
  }

  async readWritten(offset: number, length: number): Promise<RangeStream> {
    return this.driver.reader(paths.uploadData(this.id), offset, length);
  }

  private openFile(): FileWriter {
    if (this.done || !this.file) throw new BlobUploadUnknownError(this.id);
    return this.file;
  }

  private async rehash(algorithm: string): Promise<string> {
    const hash = createHash(algorithm);
    const stream = await this.driver.reader(paths.uploadData(this.id));
    for await (const chunk of stream) hash.update(chunk as Buffer);
    return `${algorithm}:${hash.digest('hex')}`;
  }
}
