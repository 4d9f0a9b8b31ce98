/**
 * The local services: blobs, manifests and tags from storage, with the metadata cache in front
 * (distribution's cached blob statter). Storage is the truth; the cache only saves I/O.
 */
import { LRUCache } from 'lru-cache';
import { keys } from '../metadata/keys.js';
import type { Digest } from '../oci/digest.js';
import type { Tag } from '../oci/reference.js';
import type { MetadataCache } from '../metadata/types.js';
import type {
  BlobService,
  BlobStore,
  ByteRange,
  ManifestLink,
  ManifestResult,
  ManifestService,
  ManifestStat,
  OpenResult,
  RepositoryKey,
  RepositoryStore,
  StatResult,
  TagResult,
  TagService,
} from './types.js';

export class LocalBlobService implements BlobService {
  constructor(
    private readonly blobs: BlobStore,
    private readonly cache: MetadataCache,
  ) {}

  async stat(_repo: RepositoryKey, digest: Digest): Promise<StatResult> {
    // Blob bytes are shared by digest across repositories and upstreams: verified content is
    // the same content whichever repository it was fetched for.
    const cached = await this.cache.getDescriptor(digest);
    if (cached) return { found: true, descriptor: cached };
    const stat = await this.blobs.stat(digest);
    if (stat.found) await this.cache.setDescriptor(stat.descriptor);
    return stat;
  }

  async open(_repo: RepositoryKey, digest: Digest, range?: ByteRange): Promise<OpenResult> {
    const result = await this.blobs.open(digest, range);
    if (!result.found) await this.cache.deleteDescriptor(digest);
    return result;
  }
}

/** Manifest bytes kept in memory, at most this much in all: hot manifests never touch the disk. */
const MANIFEST_MEMORY_BYTES = 64 * 1024 * 1024;

export class LocalManifestService implements ManifestService {
  private readonly hot = new LRUCache<string, { link: ManifestLink; bytes: Buffer }>({
    maxSize: MANIFEST_MEMORY_BYTES,
    sizeCalculation: (entry) => entry.bytes.length + 256,
  });

  constructor(
    private readonly blobs: BlobStore,
    private readonly repositories: RepositoryStore,
    private readonly cache: MetadataCache,
  ) {}

  async stat(repo: RepositoryKey, digest: Digest): Promise<ManifestStat> {
    const cached = await this.cache.getManifest(repo, digest);
    if (cached) return { found: true, link: cached };
    const link = await this.repositories.getManifest(repo, digest);
    if (!link) return { found: false };
    await this.cache.setManifest(repo, link);
    return { found: true, link };
  }

  async get(repo: RepositoryKey, digest: Digest): Promise<ManifestResult> {
    const key = keys.manifest(repo, digest);
    const hot = this.hot.get(key);
    if (hot) return { found: true, ...hot };
    const stat = await this.stat(repo, digest);
    if (!stat.found) return stat;
    const opened = await this.blobs.open(digest);
    if (!opened.found) return { found: false };
    const chunks: Buffer[] = [];
    for await (const chunk of opened.stream) chunks.push(chunk as Buffer);
    const entry = { link: stat.link, bytes: Buffer.concat(chunks) };
    this.hot.set(key, entry);
    return { found: true, ...entry };
  }

  /** Drops a manifest from memory (after it left storage). */
  forget(repo: RepositoryKey, digest: Digest): void {
    this.hot.delete(keys.manifest(repo, digest));
  }

  async put(
    repo: RepositoryKey,
    bytes: Buffer,
    digest: Digest,
    mediaType: string,
  ): Promise<ManifestLink> {
    await this.blobs.put(bytes, digest);
    const link: ManifestLink = { digest, mediaType, size: bytes.length };
    await this.repositories.linkManifest(repo, link);
    await this.cache.setManifest(repo, link);
    this.hot.set(keys.manifest(repo, digest), { link, bytes });
    return link;
  }
}

export class LocalTagService implements TagService {
  constructor(
    private readonly repositories: RepositoryStore,
    private readonly cache: MetadataCache,
    private readonly now: () => number = Date.now,
  ) {}

  async resolve(repo: RepositoryKey, tag: Tag): Promise<TagResult> {
    let link = await this.cache.getTag(repo, tag);
    if (!link) {
      link = await this.repositories.getTag(repo, tag);
      if (!link) return { found: false };
      await this.cache.setTag(repo, tag, link);
    }
    return { found: true, digest: link.digest, confirmedAt: link.confirmedAt };
  }

  async tag(repo: RepositoryKey, tag: Tag, digest: Digest): Promise<void> {
    const link = { digest, confirmedAt: this.now() };
    await this.repositories.setTag(repo, tag, link);
    await this.cache.setTag(repo, tag, link);
  }

  async list(repo: RepositoryKey): Promise<string[]> {
    return this.repositories.listTags(repo);
  }
}
