/**
 * Contracts of the storage layer. Paths given to a StorageDriver are driver-relative, '/'-separated
 * and built only by `paths.ts`; nothing above the driver may assume a POSIX file system. The
 * services a route uses on top of them (blobs, manifests, tags, referrers) are in services.ts.
 */
import type { Readable } from 'node:stream';
import type { RangeStream } from './file-range.js';
import type { Digest } from '../oci/digest.js';
import type { Descriptor } from '../oci/descriptor.js';
import type { Repository, Tag } from '../oci/reference.js';

export interface FileInfo {
  path: string;
  size: number;
  modTime: Date;
  isDirectory: boolean;
}

/** A file being written by `StorageDriver.writer`. */
export interface FileWriter {
  /** Bytes in the file so far (the existing ones too, when appending). */
  readonly size: number;
  /** Appends; resolves once the bytes are handed to the driver (backpressure). */
  write(chunk: Uint8Array): Promise<void>;
  /** Appends several chunks in one operation where the driver can. */
  writev(chunks: readonly Uint8Array[]): Promise<void>;
  /** Flushes and closes; the file keeps what was written. */
  close(): Promise<void>;
  /** Closes and removes the file. */
  cancel(): Promise<void>;
  /**
   * Where writing is more than keeping a local copy (S3: a multipart upload), holds that back
   * until `close`: what is written stays readable here meanwhile. For a file that may never need
   * to reach the store.
   */
  holdBack?(): void;
  /**
   * Tells the write's whole size before its first write, for a driver that sizes its parts by
   * it (S3: a blob over 10,000 parts of `partSize` gets larger parts of one size).
   */
  expectSize?(size: number): void;
  /** Set when `close` completes the write at the writer's `finalPath` instead of its path. */
  readonly completesAt?: string | undefined;
}

export interface StorageDriver {
  readonly name: string;
  /** Whole small file; throws PathNotFoundError. */
  getContent(path: string): Promise<Buffer>;
  /** Replaces a small file atomically (readers see the old or the new content, never a mix). */
  putContent(path: string, content: Uint8Array | string): Promise<void>;
  /** Streams `length` bytes (or to the end) from `offset`; throws PathNotFoundError. */
  reader(path: string, offset?: number, length?: number): Promise<RangeStream>;
  /**
   * Opens a file for writing, appending to what is there when `append`. `finalPath`: where the
   * bytes are to end up once verified, for a driver that can complete a write there directly (S3:
   * the multipart upload goes to that key, so no copy follows); such a writer says so in
   * `completesAt`, and its `close` makes the bytes visible there, not at `path`.
   */
  writer(path: string, append: boolean, options?: { finalPath?: string }): Promise<FileWriter>;
  /**
   * Resolves to undefined when nothing is at the path. A directory is reported by the
   * filesystem driver only: an object store has none (undefined), except the root (''), which
   * is a directory whenever storage can be reached. `modTime` is the last `touch` (else the
   * last write).
   */
  stat(path: string): Promise<FileInfo | undefined>;
  /** Names of the direct children of a directory; [] when it does not exist. */
  list(path: string): Promise<string[]>;
  /** Moves a file atomically, replacing the destination. Throws PathNotFoundError. */
  move(from: string, to: string): Promise<void>;
  /**
   * Where a move is a copy and a delete anyway (S3): copies a file whole and atomically (readers
   * see the old or the new destination, never a part), replacing it. Throws PathNotFoundError.
   */
  copy?(from: string, to: string): Promise<void>;
  /** Removes a file or a directory tree; no error when nothing is there. */
  delete(path: string): Promise<void>;
  /**
   * Removes files (never a directory), at once where the driver can (one request on S3, where
   * `delete` must list a tree first); no error for one that is not there.
   */
  deleteFiles(paths: readonly string[]): Promise<void>;
  /**
   * Removes the empty directories at and under a path (only the path itself without
   * `recursive`), deepest first; a directory with a file in it stays. No error when nothing is there.
   */
  deleteEmpty(path: string, options?: { recursive?: boolean }): Promise<void>;
  /**
   * Records a file's last-used time (last-pulled times live there), which `stat` then reports as
   * its `modTime`; throws PathNotFoundError.
   */
  touch(path: string, time: Date): Promise<void>;
  /**
   * Creates a small file only if nothing is at the path (an atomic test-and-set, for locks);
   * resolves to false when something is there already.
   */
  createExclusive(path: string, content: string): Promise<boolean>;
  /** Free and total bytes of the space holding storage; undefined where it has no such limit. */
  space(): Promise<{ free: number; total: number } | undefined>;
  /**
   * Where writes can be left unfinished and invisible by a process that died (S3's multipart
   * uploads): removes those under the paths started before `olderThan`; resolves to how many.
   */
  abortIncomplete?(paths: readonly string[], olderThan: Date): Promise<number>;
  /**
   * Where clients can fetch a file from the store itself: a URL valid for `ttlSeconds` that
   * carries no credential other than its signature (S3: a presigned GET).
   */
  presignedUrl?(path: string, ttlSeconds: number): Promise<string>;
  /**
   * Where a stat per file costs a request (S3): every file under a directory with its size and
   * modification time, a page of listing at a time, in no order. On S3 `modTime` is the object's
   * last write, which a `touch` (a copy onto itself) also moves, to within the flush interval of
   * the time it records.
   */
  walk?(path: string): AsyncIterable<FileInfo>;
  /**
   * Where a stat before each read costs a request (S3): the bytes [start, end] (to the end
   * without `end`, clipped to the file) and the file's size, in one request. Undefined when
   * nothing is at the path; throws RangeInvalidError when `start` is past the end.
   */
  readRange?(
    path: string,
    start: number,
    end?: number,
  ): Promise<{ stream: RangeStream; size: number } | undefined>;
}

export type StatResult = { found: false } | { found: true; descriptor: Descriptor };

export interface ByteRange {
  /** First byte, inclusive. */
  start: number;
  /** Last byte, inclusive; to the end when undefined. */
  end?: number;
}

export type OpenResult =
  | { found: false }
  | {
      found: true;
      descriptor: Descriptor;
      stream: Readable;
      range?: { start: number; end: number };
      /** True when the bytes are being fetched from the upstream as they are served. */
      fromUpstream?: boolean;
    };

/** An upload session: create -> write... -> (close, resume) -> commit or cancel. */
export interface BlobWriter {
  readonly id: string;
  readonly startedAt: Date;
  /** Bytes written so far. */
  readonly size: number;
  write(chunk: Uint8Array): Promise<void>;
  /** Appends several chunks in one operation (fewer system calls for a fast stream). */
  writev(chunks: readonly Uint8Array[]): Promise<void>;
  /** Keeps the session for a later `resume(id)`. */
  close(): Promise<void>;
  /**
   * Verifies the size (when given) and the digest, then makes the blob visible atomically and
   * ends the session. Throws SizeInvalidError or DigestMismatchError and then removes the
   * session: a blob is never visible before it is verified. `verified: true` says the caller has
   * itself checked every byte it wrote against `digest` as it streamed (the upstream client
   * does), so the session's own hash is skipped; without it, the digest is always checked here.
   */
  commit(expected: {
    digest: Digest;
    size?: number;
    mediaType?: string;
    verified?: boolean;
  }): Promise<Descriptor>;
  /** Removes the session; afterwards `resume(id)` reports an unknown upload. */
  cancel(): Promise<void>;
  /**
   * Says that another process is storing the same blob: the bytes are sent to the store (S3)
   * only at the commit, and only if the blob is not there by then. Call before the first write.
   */
  expectStoredElsewhere(): void;
  /** Says the blob's whole size (as the upstream or the bundle gave it); before the first write. */
  expectSize(size: number): void;
  /** Reads what is written so far, from `offset`, `length` bytes; for followers of a fetch. */
  readWritten(offset: number, length: number): Promise<RangeStream>;
}

export interface BlobStore {
  /** Resolves to `{found:false}` when the blob is not stored; never throws for a missing blob. */
  stat(digest: Digest): Promise<StatResult>;
  /**
   * A stream of the blob, or of a byte range of it. `{found:false}` when not stored; throws
   * RangeInvalidError for a range outside the blob.
   */
  open(digest: Digest, range?: ByteRange): Promise<OpenResult>;
  /**
   * Opens a new upload session. `hash: false` skips the running hash, for a caller that verifies
   * what it writes itself and commits with `verified: true`. `digest`: the blob it must be (a
   * fetch knows it), so that a store that can write to the blob's own place does (S3: no copy at
   * the commit); such a session commits only as that digest and cannot be closed for a resume.
   */
  create(options?: { hash?: boolean; digest?: Digest }): Promise<BlobWriter>;
  /** Continues a closed session at its stored size; throws BlobUploadUnknownError. */
  resume(id: string): Promise<BlobWriter>;
  /** Throws UnsupportedError when deletes are disabled, BlobUnknownError when not stored. */
  delete(digest: Digest): Promise<void>;
  /** Stores bytes already in memory (manifests); resolves to the verified descriptor. */
  put(content: Uint8Array, digest: Digest, mediaType?: string): Promise<Descriptor>;
  /** Removes upload sessions started before `olderThan`; resolves to how many. */
  purgeUploads(olderThan: Date): Promise<number>;
  /** Every stored blob with its size and last-pulled time (its modification time), in no order. */
  list(): AsyncIterable<StoredBlob>;
  /** Removes a blob whatever `deleteEnabled` says (eviction); no error when it is not stored. */
  remove(digest: Digest): Promise<void>;
  /**
   * Records when the blob was last pulled, unless a later pull is recorded already (storage/
   * last-pull.ts); no error when it is not stored.
   */
  markPulled(digest: Digest, at: number): Promise<void>;
}

export interface StoredBlob {
  digest: Digest;
  size: number;
  /** Last pulled (ms since epoch): the data file's modification time. */
  pulledAt: number;
}

/** Where a repository lives: repositories are kept per upstream, so names never collide. */
export interface RepositoryKey {
  upstream: string;
  repository: Repository;
}

export interface ManifestLink {
  digest: Digest;
  mediaType: string;
  size: number;
}

export interface TagLink {
  digest: Digest;
  /** When the upstream last confirmed the tag points at this digest (ms since epoch). */
  confirmedAt: number;
}

/**
 * A referrers answer as kept for a subject: the image index served, and when the upstream last
 * gave it. It is a listing that changes (like a tag), not content, so it is kept whole here.
 */
export interface ReferrersRecord {
  /** The image index, as served. */
  index: Buffer;
  /** The filters applied to it, for `OCI-Filters-Applied`. */
  filtersApplied: string[];
  /** When the upstream last gave this answer (ms since epoch). */
  confirmedAt: number;
}

/** The referrers answers kept per repository and subject, apart from its links and tags. */
export interface ReferrersStore {
  /**
   * Keeps the answer for `subject` under the `artifactTypes` filter it answers ([] for none;
   * order and repeats do not matter), replacing the one kept before.
   */
  set(
    repo: RepositoryKey,
    subject: Digest,
    artifactTypes: readonly string[],
    record: ReferrersRecord,
  ): Promise<void>;
  /** Resolves to undefined when no answer is kept for this subject and filter. */
  get(
    repo: RepositoryKey,
    subject: Digest,
    artifactTypes: readonly string[],
  ): Promise<ReferrersRecord | undefined>;
}

/** What one repository holds, as `RepositoryStore.listUpstream` finds it. */
export interface UpstreamRepository {
  blobLinks: Digest[];
  manifests: Digest[];
  /** Sorted. */
  tags: Tag[];
}

/**
 * Per repository: links to the blobs and manifests it holds, and its tags. The bytes live in
 * the BlobStore, shared by digest.
 */
export interface RepositoryStore {
  linkBlob(repo: RepositoryKey, descriptor: Descriptor): Promise<void>;
  /** True when the repository links the blob. */
  hasBlob(repo: RepositoryKey, digest: Digest): Promise<boolean>;
  linkManifest(repo: RepositoryKey, link: ManifestLink): Promise<void>;
  /** Resolves to undefined when the repository holds no such manifest. */
  getManifest(repo: RepositoryKey, digest: Digest): Promise<ManifestLink | undefined>;
  setTag(repo: RepositoryKey, tag: Tag, link: TagLink): Promise<void>;
  /** Resolves to undefined when the tag is not known. */
  getTag(repo: RepositoryKey, tag: Tag): Promise<TagLink | undefined>;
  deleteTag(repo: RepositoryKey, tag: Tag): Promise<void>;
  /** Tags of a repository, sorted; [] when none. */
  listTags(repo: RepositoryKey): Promise<string[]>;
  /** Every repository of an upstream that holds anything, sorted. */
  listRepositories(upstream: string): Promise<string[]>;
  /** The manifests a repository links, with when each was last pulled (ms since epoch). */
  listManifests(repo: RepositoryKey): Promise<{ digest: Digest; pulledAt: number }[]>;
  /** The blobs a repository links (layer links). */
  listBlobLinks(repo: RepositoryKey): Promise<Digest[]>;
  /**
   * Every repository of an upstream with what it links and tags, from one listing of all its
   * keys (`StorageDriver.walk`: on S3 a request per 1,000 keys, where the calls above are a few
   * requests per repository, one after another); undefined where the driver cannot walk.
   */
  listUpstream?(upstream: string): Promise<Map<string, UpstreamRepository> | undefined>;
  /** The manifests of a repository given by digest, with when each was last pulled. */
  manifestsPulled(
    repo: RepositoryKey,
    digests: readonly Digest[],
  ): Promise<{ digest: Digest; pulledAt: number }[]>;
  /**
   * Records when a manifest of the repository was last pulled, unless a later pull is recorded
   * already (storage/last-pull.ts); no error when it is not linked.
   */
  markManifestPulled(repo: RepositoryKey, digest: Digest, at: number): Promise<void>;
  /**
   * Removes the repository's link to a manifest, and the referrers answers kept for it; no error
   * when there is none.
   */
  unlinkManifest(repo: RepositoryKey, digest: Digest): Promise<void>;
  /** Removes the repository's link to a blob; no error when there is none. */
  unlinkBlob(repo: RepositoryKey, digest: Digest): Promise<void>;
  /** Removes what is left of a repository that holds nothing any more (empty directories). */
  prune(repo: RepositoryKey): Promise<void>;
}
