/**
 * Contracts of the cache's lifecycle: the budget, last-pulled times, pins, eviction and garbage
 * collection, and what `ls`, `du`, `pin`, `rm` and `gc` (commands and admin API) see.
 */
import type { Digest } from '../oci/digest.js';
import type { Repository, Tag } from '../oci/reference.js';
import type { RepositoryKey } from '../storage/types.js';

export interface RetentionConfig {
  /** Most bytes of content kept; 0: no limit. */
  maxSize: number;
  /** Bytes to leave free on the file system holding storage; 0: no such rule. */
  minFree: number;
  /** An eviction frees down to this share (0..1] of maxSize (and of minFree's room). */
  lowWater: number;
  /** Images not pulled for this long (ms) are removed by the sweep; 0: never. */
  unusedFor: number;
  /**
   * How often (ms) the sweep (unusedFor and the collection) runs; 0 (tests only: the config
   * refuses it): never on its own.
   */
  sweepInterval: number;
}

/** An image as people name it, parsed by the caller's routing rules. */
export interface ImageRef {
  upstream: string;
  repository: Repository;
  tag?: Tag;
  digest?: Digest;
  /** As given, for messages: `docker.io/library/node:20`. */
  reference: string;
}

/** What a blob fetch asks of the budget. */
export interface StorageBudget {
  /** False for a blob larger than the whole budget: streamed to its clients, not kept. */
  accepts(digest: Digest, size: number | undefined): boolean;
  /** Storage ran out of space while `bytes` were being written: make room. */
  diskFull(bytes: number): void;
  /**
   * A blob of `bytes` is being fetched to be kept: counted against the budget from now, so
   * that room is made while it comes rather than after it is stored. The returned function
   * ends the count (once the blob is stored and counted, or given up).
   */
  reserve(bytes: number): () => void;
}

export type EvictionReason = 'size' | 'unused' | 'manual';

/** One cached image, as `ls --json` and the admin API print it; keep the fields stable. */
export interface ImageInfo {
  /** Full references: `docker.io/library/node:20`; the digest form when it has no tag. */
  references: string[];
  upstream: string;
  repository: string;
  digest: Digest;
  /** Bytes of the image: its own plus those it shares with other images. */
  size: number;
  ownBytes: number;
  sharedBytes: number;
  /** ISO 8601. */
  lastPulled: string;
  pinned: boolean;
}

/** What `du --json` and the admin API print; keep the fields stable. */
export interface Usage {
  /** Bytes of content kept (blobs and manifests). */
  bytes: number;
  blobs: number;
  images: number;
  /** Blobs no image holds (interrupted pulls, blobs fetched by digest). */
  orphanBlobs: number;
  /** 0: no limit. */
  maxSize: number;
  minFree: number;
  /** Free bytes on the file system holding storage; null where it has no such limit. */
  free: number | null;
  /** Bytes evicted since the process started. */
  evictedBytes: number;
  /** False until the start-up scan of storage has finished. */
  ready: boolean;
}

/** One thing removed (or that would be) by `rm`, `gc` or an eviction. */
export interface Removal {
  kind: 'image' | 'blob' | 'upload';
  /** The image's references, or the blob's digest, or the upload id. */
  name: string;
  /** Bytes that left storage with it. */
  bytes: number;
}

export interface RemovalReport {
  dryRun: boolean;
  removed: Removal[];
  bytes: number;
  /** References that named nothing cached, or what could not be removed and why. */
  problems: string[];
}

/**
 * What this process stored, as the lifecycle's hooks hear it: told to the other processes on the
 * same storage (fleet/forget.ts), whose graphs (and the owner's budget) then count it at once.
 */
export type StoredEvent =
  | { kind: 'blob'; digest: Digest; size: number }
  | { kind: 'link'; repo: RepositoryKey; digest: Digest }
  | { kind: 'manifest'; repo: RepositoryKey; digest: Digest }
  | { kind: 'tag'; repo: RepositoryKey; tag: Tag; digest: Digest };

/**
 * What this process removed from storage (removal.ts: `rm`, an eviction, the collection; a tag
 * the tag service deleted), told to the other processes the same way: their graphs drop it, each
 * once storage agrees that it is gone.
 */
export type RemovedEvent =
  | { kind: 'blob'; digest: Digest }
  | { kind: 'link'; repo: RepositoryKey; digest: Digest }
  | { kind: 'manifest'; repo: RepositoryKey; digest: Digest }
  | { kind: 'tag'; repo: RepositoryKey; tag: Tag };
