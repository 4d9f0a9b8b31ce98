/**
 * Decorators that tell the lifecycle what happens, implementing the same contracts as what they
 * wrap (distribution's decorator idea): the stores report content coming and going, the services
 * report what is served (a pull, hits included) and hold a blob while it streams.
 */
import type { Digest } from '../oci/digest.js';
import type { Descriptor } from '../oci/descriptor.js';
import type { Tag } from '../oci/reference.js';
import type { RangeStream } from '../storage/file-range.js';
import type {
  BlobStore,
  BlobWriter,
  ByteRange,
  ManifestLink,
  OpenResult,
  RepositoryKey,
  RepositoryStore,
  StatResult,
  StoredBlob,
  TagLink,
  UpstreamRepository,
} from '../storage/types.js';
import type {
  BlobService,
  ManifestResult,
  ManifestService,
  ManifestStat,
  TagResult,
  TagService,
} from '../storage/services.js';
import type { GraphKeeper } from './graph-keeper.js';
import type { Lifecycle } from './lifecycle.js';

/** Counts every blob committed to storage. */
export class TrackedBlobStore implements BlobStore {
  constructor(
    private readonly inner: BlobStore,
    private readonly keeper: GraphKeeper,
  ) {}

  stat(digest: Digest): Promise<StatResult> {
    return this.inner.stat(digest);
  }
  open(digest: Digest, range?: ByteRange): Promise<OpenResult> {
    return this.inner.open(digest, range);
  }
  async create(options?: Parameters<BlobStore['create']>[0]): Promise<BlobWriter> {
    return new TrackedWriter(await this.inner.create(options), this.keeper);
  }
  async resume(id: string): Promise<BlobWriter> {
    return new TrackedWriter(await this.inner.resume(id), this.keeper);
  }
  async delete(digest: Digest): Promise<void> {
    await this.inner.delete(digest);
  }
  async put(content: Uint8Array, digest: Digest, mediaType?: string): Promise<Descriptor> {
    const descriptor = await this.inner.put(content, digest, mediaType);
    await this.keeper.stored({ kind: 'blob', digest: descriptor.digest, size: descriptor.size });
    return descriptor;
  }
  purgeUploads(olderThan: Date): Promise<number> {
    return this.inner.purgeUploads(olderThan);
  }
  list(): AsyncIterable<StoredBlob> {
    return this.inner.list();
  }
  remove(digest: Digest): Promise<void> {
    return this.inner.remove(digest);
  }
  markPulled(digest: Digest, at: number): Promise<void> {
    return this.inner.markPulled(digest, at);
  }
}

class TrackedWriter implements BlobWriter {
  constructor(
    private readonly inner: BlobWriter,
    private readonly keeper: GraphKeeper,
  ) {}
  get id() {
    return this.inner.id;
  }
  get startedAt() {
    return this.inner.startedAt;
  }
  get size() {
    return this.inner.size;
  }
  write(chunk: Uint8Array): Promise<void> {
    return this.inner.write(chunk);
  }
  writev(chunks: readonly Uint8Array[]): Promise<void> {
    return this.inner.writev(chunks);
  }
  close(): Promise<void> {
    return this.inner.close();
  }
  async commit(expected: Parameters<BlobWriter['commit']>[0]): Promise<Descriptor> {
    const descriptor = await this.inner.commit(expected);
    await this.keeper.stored({ kind: 'blob', digest: descriptor.digest, size: descriptor.size });
    return descriptor;
  }
  cancel(): Promise<void> {
    return this.inner.cancel();
  }
  expectStoredElsewhere(): void {
    this.inner.expectStoredElsewhere();
  }
  expectSize(size: number): void {
    this.inner.expectSize(size);
  }
  readWritten(offset: number, length: number): Promise<RangeStream> {
    return this.inner.readWritten(offset, length);
  }
}

/** Reports links and tags as repositories gain and lose them. */
export class TrackedRepositoryStore implements RepositoryStore {
  constructor(
    private readonly inner: RepositoryStore,
    private readonly keeper: GraphKeeper,
  ) {}

  async linkBlob(repo: RepositoryKey, descriptor: Descriptor): Promise<void> {
    await this.inner.linkBlob(repo, descriptor);
    await this.keeper.stored({ kind: 'link', repo, digest: descriptor.digest });
  }
  hasBlob(repo: RepositoryKey, digest: Digest): Promise<boolean> {
    return this.inner.hasBlob(repo, digest);
  }
  async linkManifest(repo: RepositoryKey, link: ManifestLink): Promise<void> {
    await this.inner.linkManifest(repo, link);
    await this.keeper.stored({ kind: 'manifest', repo, digest: link.digest });
  }
  getManifest(repo: RepositoryKey, digest: Digest): Promise<ManifestLink | undefined> {
    return this.inner.getManifest(repo, digest);
  }
  async setTag(repo: RepositoryKey, tag: Tag, link: TagLink): Promise<void> {
    await this.inner.setTag(repo, tag, link);
    await this.keeper.stored({ kind: 'tag', repo, tag, digest: link.digest });
  }
  getTag(repo: RepositoryKey, tag: Tag): Promise<TagLink | undefined> {
    return this.inner.getTag(repo, tag);
  }
  async deleteTag(repo: RepositoryKey, tag: Tag): Promise<void> {
    await this.inner.deleteTag(repo, tag);
    this.keeper.tagDeleted({ kind: 'tag', repo, tag });
  }
  listTags(repo: RepositoryKey): Promise<string[]> {
    return this.inner.listTags(repo);
  }
  listRepositories(upstream: string): Promise<string[]> {
    return this.inner.listRepositories(upstream);
  }
  listManifests(repo: RepositoryKey): Promise<{ digest: Digest; pulledAt: number }[]> {
    return this.inner.listManifests(repo);
  }
  listBlobLinks(repo: RepositoryKey): Promise<Digest[]> {
    return this.inner.listBlobLinks(repo);
  }
  listUpstream(upstream: string): Promise<Map<string, UpstreamRepository> | undefined> {
    return this.inner.listUpstream?.(upstream) ?? Promise.resolve(undefined);
  }
  manifestsPulled(
    repo: RepositoryKey,
    digests: readonly Digest[],
  ): Promise<{ digest: Digest; pulledAt: number }[]> {
    return this.inner.manifestsPulled(repo, digests);
  }
  markManifestPulled(repo: RepositoryKey, digest: Digest, at: number): Promise<void> {
    return this.inner.markManifestPulled(repo, digest, at);
  }
  unlinkManifest(repo: RepositoryKey, digest: Digest): Promise<void> {
    return this.inner.unlinkManifest(repo, digest);
  }
  unlinkBlob(repo: RepositoryKey, digest: Digest): Promise<void> {
    return this.inner.unlinkBlob(repo, digest);
  }
  prune(repo: RepositoryKey): Promise<void> {
    return this.inner.prune(repo);
  }
}

/** Blobs served to clients: each is a pull, and the blob is held while its bytes stream. */
export class TrackedBlobService implements BlobService {
  constructor(
    private readonly inner: BlobService,
    private readonly lifecycle: Lifecycle,
  ) {}

  async stat(repo: RepositoryKey, digest: Digest): Promise<StatResult> {
    const result = await this.inner.stat(repo, digest);
    if (result.found) this.lifecycle.pulled(repo, digest);
    return result;
  }

  async open(repo: RepositoryKey, digest: Digest, range?: ByteRange): Promise<OpenResult> {
    const release = this.lifecycle.serve(digest);
    let result: OpenResult;
    try {
      result = await this.inner.open(repo, digest, range);
    } catch (err) {
      release();
      throw err;
    }
    if (!result.found) {
      release();
      return result;
    }
    this.lifecycle.pulled(repo, digest);
    // Every way a stream is taken (sendTo, pipe, an export) destroys it at the end: 'close'.
    result.stream.once('close', release);
    return result;
  }

  /** A redirect to the storage is a pull too (the download itself is not seen here). */
  async locate(repo: RepositoryKey, digest: Digest): Promise<string | undefined> {
    const url = await this.inner.locate?.(repo, digest);
    if (url) this.lifecycle.pulled(repo, digest);
    return url;
  }
}

export class TrackedManifestService implements ManifestService {
  constructor(
    private readonly inner: ManifestService,
    private readonly lifecycle: Lifecycle,
  ) {}

  async stat(repo: RepositoryKey, digest: Digest): Promise<ManifestStat> {
    const result = await this.inner.stat(repo, digest);
    if (result.found) this.lifecycle.pulled(repo, digest, { manifest: true });
    return result;
  }
  async get(
    repo: RepositoryKey,
    digest: Digest,
    options?: { counted?: boolean },
  ): Promise<ManifestResult> {
    const result = await this.inner.get(repo, digest, options);
    if (result.found) this.lifecycle.pulled(repo, digest, { manifest: true });
    return result;
  }
  put(
    repo: RepositoryKey,
    bytes: Buffer,
    digest: Digest,
    mediaType: string,
  ): Promise<ManifestLink> {
    return this.inner.put(repo, bytes, digest, mediaType);
  }
}

export class TrackedTagService implements TagService {
  constructor(
    private readonly inner: TagService,
    private readonly lifecycle: Lifecycle,
  ) {}

  async resolve(repo: RepositoryKey, tag: Tag): Promise<TagResult> {
    const result = await this.inner.resolve(repo, tag);
    if (result.found) this.lifecycle.pulled(repo, result.digest, { manifest: true });
    return result;
  }
  tag(repo: RepositoryKey, tag: Tag, digest: Digest): Promise<void> {
    return this.inner.tag(repo, tag, digest);
  }
  list(repo: RepositoryKey): Promise<string[]> {
    return this.inner.list(repo);
  }
}
