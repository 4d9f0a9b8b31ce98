/**
 * The services a route uses, per repository: blobs, manifests, tags and referrers. The local
 * stores (storage/) and the proxy stores (proxy/) implement the same contracts, so a route does
 * not know which answers it. The storage contracts they stand on are in types.ts.
 */
import type { Digest } from '../oci/digest.js';
import type { Tag } from '../oci/reference.js';
import type { ByteRange, ManifestLink, OpenResult, RepositoryKey, StatResult } from './types.js';

/** `fromUpstream`: fetched from the upstream for this request (a cache miss). */
export type ManifestResult =
  { found: false } | { found: true; link: ManifestLink; bytes: Buffer; fromUpstream?: boolean };
export type ManifestStat =
  { found: false } | { found: true; link: ManifestLink; fromUpstream?: boolean };

/** Blobs as one repository sees them. */
export interface BlobService {
  /** `{found:false}` when the blob is not there; never throws for a missing blob. */
  stat(repo: RepositoryKey, digest: Digest): Promise<StatResult>;
  /** `{found:false}` when not there; throws RangeInvalidError for a range outside the blob. */
  open(repo: RepositoryKey, digest: Digest, range?: ByteRange): Promise<OpenResult>;
  /**
   * Where the client can fetch a stored blob of the repository from the storage itself (S3 with
   * `redirect`), a URL that carries no credential but its signature; undefined when it is to
   * be served here (not stored, not held by the repository, or no such storage).
   */
  locate?(repo: RepositoryKey, digest: Digest): Promise<string | undefined>;
}

export interface ManifestService {
  /** `{found:false}` when the repository holds no such manifest. */
  stat(repo: RepositoryKey, digest: Digest): Promise<ManifestStat>;
  /**
   * The bytes as they were stored, with their media type. `counted: false`: not a lookup of its
   * own in the metrics (the manifest a tag lookup has just fetched, or fetches for itself).
   */
  get(
    repo: RepositoryKey,
    digest: Digest,
    options?: { counted?: boolean },
  ): Promise<ManifestResult>;
  /** Stores verified manifest bytes and links them to the repository. */
  put(repo: RepositoryKey, bytes: Buffer, digest: Digest, mediaType: string): Promise<ManifestLink>;
}

/** `fromUpstream`: the manifest it names was fetched from the upstream for this request. */
export type TagResult =
  | { found: false }
  | {
      found: true;
      digest: Digest;
      confirmedAt: number;
      stale?: boolean;
      fromUpstream?: boolean;
    };

export interface TagService {
  /** `{found:false}` when the tag is unknown. */
  resolve(repo: RepositoryKey, tag: Tag): Promise<TagResult>;
  /** Records that `tag` points at `digest`, confirmed now. */
  tag(repo: RepositoryKey, tag: Tag, digest: Digest): Promise<void>;
  /** Tags of the repository, sorted. */
  list(repo: RepositoryKey): Promise<string[]>;
}

export interface ReferrersAnswer {
  /** An OCI image index of the referring manifests; empty when there are none. */
  index: Buffer;
  /** The filters applied (`artifactType`), for `OCI-Filters-Applied`; [] when none. */
  filtersApplied: string[];
  /** True when served past its freshness window because the upstream could not be asked. */
  stale?: boolean;
}

/** The referrers API (distribution-spec 1.1): manifests whose `subject` is a given digest. */
export interface ReferrersService {
  /**
   * The referrers of `subject` in the repository, only those of one of `artifactTypes` when any
   * are given ([] for all). Never "not found": no referrers is an empty index. Throws the
   * upstream's error (UNAVAILABLE...) when it cannot be asked and no answer is kept.
   */
  list(
    repo: RepositoryKey,
    subject: Digest,
    artifactTypes: readonly string[],
  ): Promise<ReferrersAnswer>;
}
