/**
 * Contracts of the proxy layer's fetches: an upstream fetch made here (blob-fetch.ts), another
 * process's fetch followed from here (remote-fetch.ts), and the one that decides between the two
 * by a lease on the digest (fleet-fetch.ts) all look alike to ProxyBlobStore and to followers.
 */
import type { Readable } from 'node:stream';
import type { Descriptor } from '../oci/descriptor.js';
import type { Digest } from '../oci/digest.js';
import type { RangeStream, Sendable } from '../storage/file-range.js';
import type { RepositoryKey } from '../storage/types.js';

/** A stream of a blob that follows its fetch (blob-follower.ts's BlobFollower). */
export type FollowerStream = Readable & Sendable;

/**
 * `streamed`: verified and served whole, but not kept (larger than the whole budget).
 */
export type FetchState = 'starting' | 'running' | 'committed' | 'streamed' | 'failed';

/** A fetch of one blob, as ProxyBlobStore uses it. */
export interface UpstreamFetch {
  readonly digest: Digest;
  /** The repository the fetch is made for (with its scope), and linked to when kept. */
  readonly repo: RepositoryKey;
  /** The blob's size, once `ready` (undefined when the upstream gave none). */
  readonly size: number | undefined;
  readonly state: FetchState;
  readonly error: unknown;
  /** Resolves once the size is known (the upstream answered); rejects with the fetch's error. */
  readonly ready: Promise<void>;
  /** Resolves when the blob is verified (and kept); rejects when the fetch failed. */
  readonly done: Promise<Descriptor>;
  /**
   * A stream of bytes [start, end) of the blob that follows the fetch, its last byte held until
   * the digest is verified, destroyed with the fetch's error when it fails. Call after `ready`.
   */
  follow(start: number, end: number): FollowerStream;
}

/** What a follower reads: a fetch whose bytes are on disk as far as `written`. */
export interface FollowedFetch {
  readonly state: FetchState;
  readonly error: unknown;
  /** Bytes on disk, readable with `readWritten`. */
  readonly written: number;
  /** Bytes received (handed to live followers); `written` or more. */
  readonly received: number;
  /** True once the digest is verified: the last byte may go to the followers. */
  isCommitted(): boolean;
  /** Reads bytes already on disk: the upload while it runs, the blob once committed. */
  readWritten(offset: number, length: number): Promise<RangeStream>;
  unfollow(follower: FollowerStream): void;
}
