/**
 * The local services: blobs, manifests and tags from storage, with the metadata cache in front
 * (distribution's cached blob statter). Storage is the truth; the cache only saves I/O.
 */
import { LRUCache } from 'lru-cache';
import { keys } from '../metadata/keys.js';
import type { Logger } from '../log/logger.js';
import { digestOf, parseDigest, type Digest } from '../oci/digest.js';
import type { Descriptor } from '../oci/descriptor.js';
import type { Tag } from '../oci/reference.js';
import type { MetadataCache } from '../metadata/types.js';
import type {
  BlobStore,
  ByteRange,
  ManifestLink,
  OpenResult,
  RepositoryKey,
  RepositoryStore,
  StatResult,
} from './types.js';
import type {
  BlobService,
  ManifestResult,
  ManifestService,
  ManifestStat,
  TagResult,
  TagService,
} from './services.js';

/**
 * Blobs as one repository holds them. The bytes are shared by digest across repositories and
 * upstreams, but a blob is served for a repository only when that repository holds it: a layer
 * link (it was fetched, imported or confirmed for it), or a manifest revision link (a manifest's
 * own bytes asked for as a blob). Never because another repository holds the same digest: a
 * private image's layers are not to be read by naming their digests under a public repository.
 * Whether the upstream has it for a repository that does not hold it is ProxyBlobStore's to ask.
 *
 * The warm path answers from memory (the metadata cache's LRU: the repository's descriptor);
 * storage's links are read only on a miss, and a removed link leaves the cache with it
 * (`deleteRepositoryDescriptor`, see lifecycle/removal.ts).
 */
export class LocalBlobService implements BlobService {
  constructor(
    private readonly blobs: BlobStore,
    private readonly repositories: RepositoryStore,
    private readonly cache: MetadataCache,
  ) {}

  /** `{found:false}` when the repository does not hold the blob, or its bytes are not stored. */
  async stat(repo: RepositoryKey, digest: Digest): Promise<StatResult> {
    const held = await this.cache.getRepositoryDescriptor(repo, digest);
    if (held) return { found: true, descriptor: held };
    const manifest = await this.cache.getManifest(repo, digest);
    if (manifest) return { found: true, descriptor: manifestDescriptor(manifest) };
    if (await this.repositories.hasBlob(repo, digest)) {
      const stored = await this.stored(digest);
      if (stored.found) await this.cache.setRepositoryDescriptor(repo, stored.descriptor);
      return stored;
    }
    // A manifest's link is cached as the manifest (removed with it), not as a layer link.
    const link = await this.repositories.getManifest(repo, digest);
    if (!link) return { found: false };
    const stored = await this.stored(digest);
    if (stored.found) await this.cache.setManifest(repo, link);
    return stored.found ? { found: true, descriptor: manifestDescriptor(link) } : stored;
  }

  async open(repo: RepositoryKey, digest: Digest, range?: ByteRange): Promise<OpenResult> {
    const held = await this.stat(repo, digest);
    if (!held.found) return held;
    const result = await this.blobs.open(digest, range);
    if (!result.found) {
      // Linked, but its bytes are gone (removed by another process): forget both.
      await this.cache.deleteDescriptor(digest);
      await this.cache.deleteRepositoryDescriptor(repo, digest);
    }
    return result;
  }

  /**
   * Records that the repository holds a stored blob (fetched for it, or confirmed by its
   * upstream): a layer link through the repository store (the lifecycle sees it), then memory.
   */
  async link(repo: RepositoryKey, descriptor: Descriptor): Promise<void> {
    await this.repositories.linkBlob(repo, descriptor);
    await this.cache.setRepositoryDescriptor(repo, descriptor);
    await this.cache.setDescriptor(descriptor);
  }

  /** Whether the bytes are stored at all, for any repository: never a reason to serve them. */
  async stored(digest: Digest): Promise<StatResult> {
    const cached = await this.cache.getDescriptor(digest);
    if (cached) return { found: true, descriptor: cached };
    const stat = await this.blobs.stat(digest);
    if (stat.found) await this.cache.setDescriptor(stat.descriptor);
    return stat;
  }
}

const manifestDescriptor = (link: ManifestLink): Descriptor => ({
  digest: link.digest,
  size: link.size,
  mediaType: link.mediaType,
});

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
    private readonly log?: Logger,
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
    const bytes = await this.read(digest);
    if (bytes === undefined) return { found: false };
    // Read whole, so checked whole: a power loss can leave a manifest's file torn at its name
    // (empty, or zeros; blob data is not flushed). Such bytes are never served: they leave
    // storage, and the manifest is fetched again (missing while offline) and stored whole.
    const algorithm = parseDigest(digest).algorithm;
    const actual = digestOf(bytes, algorithm);
    if (actual !== digest) {
      // Read once more first: another request may have fetched and stored it whole meanwhile,
      // which is not to be removed.
      const again = await this.read(digest);
      const whole = again !== undefined && digestOf(again, algorithm) === digest;
      if (again !== undefined && !whole) {
        this.log?.error(
          { repository: repo.repository, digest, actual, size: bytes.length },
          'a stored manifest does not match its digest (torn by a crash?): removed, not served',
        );
        await this.cache.deleteDescriptor(digest);
        await this.blobs.remove(digest);
      }
      if (!whole) return { found: false };
      const entry = { link: stat.link, bytes: again };
      this.hot.set(key, entry);
      return { found: true, ...entry };
    }
    const entry = { link: stat.link, bytes };
    this.hot.set(key, entry);
    return { found: true, ...entry };
  }

  /** A stored manifest's bytes, whole; undefined when it is not stored. */
  private async read(digest: Digest): Promise<Buffer | undefined> {
    const opened = await this.blobs.open(digest);
    if (!opened.found) return undefined;
    const chunks: Buffer[] = [];
    for await (const chunk of opened.stream) chunks.push(chunk as Buffer);
    return Buffer.concat(chunks);
  }

  /** Drops a manifest from memory (after it left storage). */
  forget(repo: RepositoryKey, digest: Digest): void {
    this.hot.delete(keys.manifest(repo, digest));
  }

  /**
   * Drops manifests from memory by their metadata keys (`keys.manifest`): another process removed
   * them. Keys of anything else are passed over.
   */
  forgetKeys(forgotten: readonly string[]): void {
    for (const key of forgotten) this.hot.delete(key);
  }

  /** Drops every manifest held in memory. */
  forgetAll(): void {
    this.hot.clear();
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
