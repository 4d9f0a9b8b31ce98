/**
 * Contracts of the fleet: which process fetches a cold blob when several serve one storage, and
 * how the others follow that fetch.
 *
 * One fetch per digest: a process asked for a blob it does not hold takes a lease on the digest.
 * The holder fetches it from the upstream and tells its followers how far it got; every other
 * process asked for it meanwhile follows the holder (`HeldFetch`), from byte 0 and at once,
 * holding back the last byte until the holder says the digest is verified. On one host the
 * leases live in the primary process (fleet/lease-table.ts, over the cluster's IPC) and a
 * follower reads the holder's upload file in the shared storage; across hosts a lease in Redis
 * and a peer endpoint can take the same two roles behind the same interfaces.
 */
import type { Digest } from '../oci/digest.js';
import type { RangeStream } from '../storage/file-range.js';

/** Leases on digests among the processes that share a storage. */
export interface DigestLeases {
  /**
   * Takes the lease on `digest` when nobody holds it; otherwise resolves to the holder's fetch,
   * to be followed. `scope` names what the caller fetches for (`upstream/repository`): a holder
   * tells its followers. Rejects only when the leases cannot be asked at all (the primary is
   * gone): the caller then fetches alone.
   */
  acquire(digest: Digest, scope: string): Promise<LeaseResult>;
  /**
   * Takes the lease from `stalled`, a holder followed here that sent nothing for too long: its
   * other followers are cut, and what it says from now on is ignored. When another follower
   * took it over first, resolves to that one's fetch, to be followed instead (one fetch, not
   * one per follower that timed out). Rejects like `acquire`.
   */
  takeOver(digest: Digest, stalled: HeldFetch, scope: string): Promise<LeaseResult>;
}

/** What a fetch is for, as leases name it: `upstream/repository`. */
export const fetchScope = (repo: { upstream: string; repository: string }): string =>
  `${repo.upstream}/${repo.repository}`;

export type LeaseResult = { held: true; lease: Lease } | { held: false; holder: HeldFetch };

/** What the holder of a lease tells its followers. Each call is cheap; progress is coalesced. */
export interface Lease {
  /** The upload session the blob is being written to, and its size when the upstream gave one. */
  started(upload: { id: string; size: number | undefined }): void;
  /** Bytes of the upload on disk (readable by a follower) so far. */
  progress(written: number): void;
  /**
   * Every byte is written and the digest verified; the commit is under way (on S3 the
   * completion of the upload, which for a blob of several GB can outlast a follower's idle
   * timeout).
   */
  committing(): void;
  /** The digest is verified and the blob committed (or, `kept: false`, verified only). */
  committed(size: number, kept: boolean): void;
  /** The fetch failed: every follower is cut. Ends the lease, so the next ask fetches afresh. */
  failed(reason: string): void;
}

/** Another process's fetch as one follower process sees it. */
export interface HeldFetch {
  /**
   * The upstream and repository the holder fetches for (`upstream/repository`, the `scope` it
   * asked with). Its bytes are another repository's only once the upstream confirms that one
   * has the blob too: a process following it for another repository asks first.
   */
  readonly scope: string;
  /** Called with each change of the holder's state, in order, until `failed` or `committed`. */
  watch(listener: (event: HolderEvent) => void): void;
  /**
   * Reads `length` bytes of what the holder has written, from `offset`: the upload while it runs
   * (throws PathNotFoundError once it has been moved into place), for bytes the holder has said
   * are written.
   */
  readWritten(offset: number, length: number): Promise<RangeStream>;
  /** Stops following (the follower is done or gave up). */
  close(): void;
}

/**
 * How long a follower waits on a holder that is committing (every byte written and verified)
 * before it gives up on it: a commit to S3 sends the last parts and completes the multipart
 * upload, which S3 says may take minutes for a large object. A holder that dies meanwhile is
 * known at once (its worker's exit, its connection closing); this bounds one that hangs.
 */
export const COMMIT_WAIT_MS = 5 * 60_000;

export type HolderEvent =
  | { type: 'started'; size: number | undefined }
  | { type: 'progress'; written: number }
  | { type: 'committing' }
  | { type: 'committed'; size: number; kept: boolean }
  | { type: 'failed'; reason: string };
