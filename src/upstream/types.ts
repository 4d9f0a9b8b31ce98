import type { Readable } from 'node:stream';
import type { Digest } from '../oci/digest.js';
import type { ReferrerDescriptor } from '../oci/referrers.js';
import type { Repository } from '../oci/reference.js';
import type { RateLimitInfo } from './errors.js';
import type { HealthState } from './health.js';
import type { ReceiveSlabs } from './receive-slabs.js';

export interface ManifestHead {
  /**
   * The digest asked for (a HEAD by digest), else the upstream's Docker-Content-Digest; undefined
   * when a HEAD by tag was answered without one, which older versions of the distribution spec
   * allow: the manifest's GET then tells it.
   */
  digest: Digest | undefined;
  mediaType: string;
  size: number;
}

export interface FetchedManifest extends ManifestHead {
  /** Verified: the one asked for, else the upstream's Docker-Content-Digest, else the bytes'. */
  digest: Digest;
  /** The bytes exactly as the upstream sent them, verified against `digest`. */
  bytes: Buffer;
}

export interface BlobHead {
  /** The blob's length; undefined when the upstream's answer did not say (no Content-Length). */
  size: number | undefined;
}

export interface BlobStream {
  /** From Content-Length; undefined when the upstream did not say. */
  size: number | undefined;
  /**
   * One continuous stream of the whole blob: breaks are resumed with Range requests, and the
   * digest is checked at the end (the stream errors with UpstreamInvalidError on a mismatch).
   */
  stream: Readable;
  /**
   * The blob comes from another replica, which stores it (in its storage) before it sends the
   * last byte. Where the two share a storage (a bucket), the copy kept here is a spare, needed
   * only if the blob is not there by the time this fetch commits; replicas on disks of their own
   * (the same root on each) share the leases but not the storage, and each keeps its copy.
   */
  fromPeer?: boolean;
}

export interface FetchedReferrers {
  /** The descriptors of every page, in the upstream's order, each as the upstream sent it. */
  manifests: ReferrerDescriptor[];
  /** The filters the upstream says it applied (`OCI-Filters-Applied`); [] when none. */
  filtersApplied: string[];
}

/** What an upstream request was for, as the metrics name it. */
export type UpstreamRequestKind = 'manifest' | 'blob' | 'tags' | 'referrers' | 'token' | 'ping';

/**
 * Told of the client's traffic, for the metrics and the status page. Every method is cheap (it
 * runs per request, and per chunk for `received`) and never throws.
 */
export interface UpstreamObserver {
  /** One request answered with `status`, or given no answer (`error`), after `seconds`. */
  request(kind: UpstreamRequestKind, status: number | 'error', seconds: number): void;
  /** Body bytes received. */
  received(kind: UpstreamRequestKind, bytes: number): void;
  /**
   * A failure worth an operator's eye (not a 404): what was asked, why it failed, and the
   * repositories it was asked for ([] for none, such as the start-up greeting), which say who
   * may see it on the status page.
   */
  failed(what: string, reason: string, repositories: readonly string[]): void;
  /** The start-up greeting (`GET /v2/`): its answer and auth scheme, or why there was none. */
  greeted(result: { ok: true; status: number; auth: string } | { ok: false; reason: string }): void;
}

export interface RequestOptions {
  signal?: AbortSignal;
}

export interface BlobRequestOptions extends RequestOptions {
  /**
   * Where the body is received: the stream's chunks are views of these slabs, and the consumer
   * releases each when done with it so that its slab is read into again. Without it, each
   * chunk's memory is its own.
   */
  slabs?: ReceiveSlabs;
  /**
   * Settles when the caller is done with the blob: stored (committed) or given up. A source that
   * holds something for the fetch (a replica's lease on the digest) holds it until then, not
   * only until the body ends: the commit comes after the body (on S3, the upload's last part and
   * a copy), and the blob is in storage for the others only once it is done.
   */
  settled?: Promise<unknown>;
}

/**
 * The client of one upstream registry. Every method throws the typed errors of `errors.ts`:
 * UpstreamNotFoundError, UpstreamDeniedError, UpstreamRateLimitedError,
 * UpstreamUnavailableError, UpstreamInvalidError.
 */
export interface UpstreamClient {
  readonly name: string;
  /** At start-up: connect and learn the auth scheme ahead of the first pull; never throws. */
  warm?(): Promise<void>;
  /** GET by tag or digest; the body is capped and verified. */
  getManifest(
    repository: Repository,
    reference: string,
    options?: RequestOptions,
  ): Promise<FetchedManifest>;
  /**
   * HEAD by tag or digest: digest, media type and size, no body. A 2xx answer to a HEAD by tag
   * without Docker-Content-Digest gives an undefined digest, not an error; a malformed one is
   * UpstreamInvalidError.
   */
  headManifest(
    repository: Repository,
    reference: string,
    options?: RequestOptions,
  ): Promise<ManifestHead>;
  headBlob(repository: Repository, digest: Digest, options?: RequestOptions): Promise<BlobHead>;
  getBlob(
    repository: Repository,
    digest: Digest,
    options?: BlobRequestOptions,
  ): Promise<BlobStream>;
  /** Every tag, following `Link` pagination. */
  listTags(
    repository: Repository,
    options?: RequestOptions & { pageSize?: number },
  ): Promise<string[]>;
  /**
   * The referrers of `subject` (distribution-spec 1.1), every `Link` page joined, with the
   * `artifactType` filter passed on when given. An upstream without the referrers API answers
   * 404: that is UpstreamNotFoundError, as for a repository it does not know.
   */
  listReferrers(
    repository: Repository,
    subject: Digest,
    options?: RequestOptions & { artifactType?: string },
  ): Promise<FetchedReferrers>;
  readonly healthState: HealthState;
  /** True while the client fails fast (circuit open) or is configured offline. */
  readonly isDown: boolean;
  /** How it authenticates, once learned: `bearer`, `basic`, or `none`; undefined before. */
  readonly authScheme: string | undefined;
  /** The last rate-limit figures the upstream sent. */
  readonly rateLimit: RateLimitInfo | undefined;
  close(): Promise<void>;
}
