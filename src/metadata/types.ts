import type { Digest } from '../oci/digest.js';
import type { Descriptor } from '../oci/descriptor.js';
import type { Tag } from '../oci/reference.js';
import type { ManifestLink, RepositoryKey, TagLink } from '../storage/types.js';

/**
 * The metadata cache in front of storage, after distribution's blob-descriptor cache. It is only
 * a cache: every method resolves (to undefined on a miss or when the backend fails) and never
 * throws, because losing it loses nothing but speed.
 */
export interface MetadataCache {
  getDescriptor(digest: Digest): Promise<Descriptor | undefined>;
  setDescriptor(descriptor: Descriptor): Promise<void>;
  getRepositoryDescriptor(repo: RepositoryKey, digest: Digest): Promise<Descriptor | undefined>;
  setRepositoryDescriptor(repo: RepositoryKey, descriptor: Descriptor): Promise<void>;
  getManifest(repo: RepositoryKey, digest: Digest): Promise<ManifestLink | undefined>;
  setManifest(repo: RepositoryKey, link: ManifestLink): Promise<void>;
  getTag(repo: RepositoryKey, tag: Tag): Promise<TagLink | undefined>;
  setTag(repo: RepositoryKey, tag: Tag, link: TagLink): Promise<void>;
  deleteTag(repo: RepositoryKey, tag: Tag): Promise<void>;
  /** Forgets a blob everywhere it is known globally (after a delete). */
  deleteDescriptor(digest: Digest): Promise<void>;
  /** Forgets that a repository holds a blob (after its link is removed). */
  deleteRepositoryDescriptor(repo: RepositoryKey, digest: Digest): Promise<void>;
  /** Forgets a repository's manifest link (after it is removed). */
  deleteManifest(repo: RepositoryKey, digest: Digest): Promise<void>;
  /**
   * Forgets everything it holds, in memory and in its store, here and (through `onClear`) in
   * the other processes' memory: storage changed beneath it in ways not told key by key (an
   * import beside the server moved a tag). Never throws; a store that cannot be cleared now is
   * not read until it has been.
   */
  clear(): Promise<void>;
  close(): Promise<void>;
}
