/**
 * Another process's fetch of a blob, followed from this one: its clients are BlobFollowers as for
 * a fetch made here, reading what the holder has written (on one host, its upload file in the
 * shared storage) as far as the holder says, the last byte held until the holder says the digest
 * is verified, and cut when it fails (a mismatch, its death) or says nothing for `idleTimeout`.
 */
import type { Descriptor } from '../oci/descriptor.js';
import type { Digest } from '../oci/digest.js';
import { COMMIT_WAIT_MS, type HeldFetch, type HolderEvent } from '../fleet/types.js';
import type { RangeStream } from '../storage/file-range.js';
import type { BlobStore, RepositoryKey } from '../storage/types.js';
import { BlobFollower, readWrittenOrStored } from './blob-follower.js';
import { deferred } from './deferred.js';
import type { FetchState, FollowedFetch, UpstreamFetch } from './types.js';

/** The holder said nothing for the idle timeout: this process fetches for itself. */
export class HolderStalledError extends Error {
  constructor(digest: Digest, ms: number) {
    super(`the process fetching ${digest} sent nothing for ${ms} ms`);
  }
}

/** The holder's fetch failed, or the holder is gone. */
export class HolderFailedError extends Error {}

/** How long a followed fetch with no follower left keeps watching the holder. */
const UNFOLLOWED_GRACE_MS = 1000;

export interface RemoteFetchOptions {
  digest: Digest;
  repo: RepositoryKey;
  holder: HeldFetch;
  blobs: BlobStore;
  /** How long the holder may say nothing before this process gives up on it (ms). */
  idleTimeout: number;
}

export class RemoteBlobFetch implements UpstreamFetch, FollowedFetch {
  readonly digest: Digest;
  readonly repo: RepositoryKey;
  size: number | undefined;
  written = 0;
  state: FetchState = 'starting';
  error: unknown;
  readonly ready: Promise<void>;
  readonly done: Promise<Descriptor>;
  private readonly followers = new Set<BlobFollower>();
  private idleTimer: NodeJS.Timeout | undefined;
  private unfollowedTimer: NodeJS.Timeout | undefined;
  private settle!: { ready: () => void; done: (d: Descriptor) => void; fail: (err: Error) => void };

  constructor(private readonly o: RemoteFetchOptions) {
    this.digest = o.digest;
    this.repo = o.repo;
    const ready = deferred<void>();
    const done = deferred<Descriptor>();
    this.ready = ready.promise;
    this.done = done.promise;
    this.settle = {
      ready: () => ready.resolve(),
      done: done.resolve,
      fail: (err) => {
        ready.reject(err);
        done.reject(err);
      },
    };
    this.armIdle();
    o.holder.watch((event) => this.on(event));
  }

  /**
   * Bytes received are never handed over from memory here: a Readable follower always waits for
   * the disk (`onWritten`), so this is as far as anything can be, not as far as it is.
   */
  get received(): number {
    return this.state === 'committed' ? this.written : Number.MAX_SAFE_INTEGER;
  }

  private on(event: HolderEvent): void {
    if (this.state === 'failed' || this.state === 'committed') return;
    this.armIdle(
      this.waitingOnCommit(event) ? Math.max(this.o.idleTimeout, COMMIT_WAIT_MS) : undefined,
    );
    switch (event.type) {
      case 'committing':
        return;
      case 'started':
        this.size = event.size;
        this.state = 'running';
        this.settle.ready();
        return;
      case 'progress':
        if (event.written <= this.written) return;
        this.written = event.written;
        for (const follower of this.followers) follower.onWritten();
        return;
      case 'committed':
        this.size = event.size;
        this.written = event.size;
        // A blob streamed and not kept by the holder is gone once the holder's clients are done:
        // followers that opened it read on; those that did not are told it failed.
        this.state = 'committed';
        this.stop();
        this.settle.ready();
        this.settle.done({ digest: this.digest, size: event.size });
        for (const follower of [...this.followers]) follower.onCommitted();
        return;
      case 'failed':
        this.fail(new HolderFailedError(event.reason));
        return;
    }
  }

  /** Cuts every follower with `err` and stops watching the holder. */
  fail(err: Error): void {
    if (this.state === 'failed' || this.state === 'committed') return;
    this.state = 'failed';
    this.error = err;
    this.stop();
    this.settle.fail(err);
    for (const follower of [...this.followers]) follower.destroy(err);
  }

  private stop(): void {
    clearTimeout(this.idleTimer);
    clearTimeout(this.unfollowedTimer);
    this.o.holder.close();
  }

  /**
   * Whether the holder has nothing left to do but commit: it says so, or it has written every
   * byte but the last (a holder following another replica gets that byte only once the other
   * has committed the blob).
   */
  private waitingOnCommit(event: HolderEvent): boolean {
    if (event.type === 'committing') return true;
    const size = event.type === 'started' ? event.size : this.size;
    const written = event.type === 'progress' ? event.written : this.written;
    return size !== undefined && size > 0 && written >= size - 1;
  }

  private armIdle(ms = this.o.idleTimeout): void {
    clearTimeout(this.idleTimer);
    this.idleTimer = setTimeout(() => this.fail(new HolderStalledError(this.digest, ms)), ms);
    this.idleTimer.unref();
  }

  follow(start: number, end: number): BlobFollower {
    const follower = new BlobFollower(this, start, end);
    if (this.state === 'failed') {
      process.nextTick(() => follower.destroy(this.error as Error));
      return follower;
    }
    this.followers.add(follower);
    clearTimeout(this.unfollowedTimer);
    return follower;
  }

  unfollow(follower: BlobFollower): void {
    this.followers.delete(follower);
    if (this.followers.size > 0 || this.state !== 'running') return;
    // Every client left: the holder goes on by itself; stop watching it (after a moment, so that
    // a request that has just found this fetch can still follow it).
    clearTimeout(this.unfollowedTimer);
    this.unfollowedTimer = setTimeout(() => {
      if (this.followers.size === 0) this.fail(new Error('no client follows the fetch'));
    }, UNFOLLOWED_GRACE_MS);
    this.unfollowedTimer.unref();
  }

  isCommitted(): boolean {
    return this.state === 'committed';
  }

  /** Clients following the fetch now. */
  get clients(): number {
    return this.followers.size;
  }

  readWritten(offset: number, length: number): Promise<RangeStream> {
    // The holder's upload while it runs; moved into place by its commit (its word follows).
    return readWrittenOrStored(
      this,
      this.o.blobs,
      this.state !== 'committed' ? () => this.o.holder.readWritten(offset, length) : undefined,
      offset,
      length,
    );
  }
}
