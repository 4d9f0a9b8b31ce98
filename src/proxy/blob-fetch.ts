/**
 * One upstream fetch of one blob, followed by every client that asks for it meanwhile.
 *
 * Chunks from the upstream go to a write pump that appends them to an upload session in batches
 * (`writev`). The fetch waits for the disk only when more than WRITE_QUEUE bytes are not yet
 * written, so it is paced by the upstream, not by any client.
 *
 * Client responses follow the fetch (blob-follower.ts): a client that keeps up is sent each chunk
 * as it arrives, one that falls behind reads the upload on disk. Memory is bounded (per client,
 * two buffers and at most a MiB of held chunks, in up to two slabs more than the fetch holds;
 * plus the write queue) and nothing is allocated per chunk, whatever the blob size and the
 * number of clients.
 *
 * The last byte of every response is held back until the digest is verified and the upload is
 * committed; on a mismatch every follower is destroyed, so no client can take the bytes of a
 * bad blob for a good one.
 */
import type { Logger } from '../log/logger.js';
import type { Digest } from '../oci/digest.js';
import type { RangeStream } from '../storage/file-range.js';
import type { Descriptor } from '../oci/descriptor.js';
import type { BlobStore, BlobWriter, RepositoryKey } from '../storage/types.js';
import { PathNotFoundError, SpoolError, StorageUnavailableError } from '../storage/errors.js';
import type { UpstreamClient } from '../upstream/types.js';
import { ReceiveSlabs } from '../upstream/receive-slabs.js';
import { UpstreamNotFoundError } from '../upstream/errors.js';
import type { StorageBudget } from '../lifecycle/types.js';
import type { Lease } from '../fleet/types.js';
import type { FetchState, FollowedFetch, UpstreamFetch } from './types.js';
import { BlobFollower, readWrittenOrStored } from './blob-follower.js';
import { deferred } from './deferred.js';

/**
 * Most bytes received but not yet written before the fetch waits for the disk (and the upstream
 * body, paused, for the fetch). 8 MiB when a body could not be paused; 4 MiB with the receive
 * slabs: `bench/cold.ts` peaked at 98-106 MB against 124-132, at the same CPU.
 */
const WRITE_QUEUE = 4 * 1024 * 1024;

/** A spool directory that cannot take blobs is logged once in this long (every fetch fails). */
const SPOOL_LOG_INTERVAL_MS = 30_000;
let spoolLoggedAt = 0;

export interface BlobFetchOptions {
  blobs: BlobStore;
  /** Where the bytes come from: the upstream's client, or one that may follow a peer first. */
  client: Pick<UpstreamClient, 'getBlob'>;
  repo: RepositoryKey;
  digest: Digest;
  log: Logger;
  /** How long the fetch may go on with no client following it. */
  orphanTimeout: number;
  onCommitted: (descriptor: Descriptor) => Promise<void>;
  onUpstreamBytes?: (bytes: number) => void;
  /** The storage budget: whether a blob of this size is kept, and where a full disk is told. */
  budget?: StorageBudget;
  /** The lease on the digest among processes (fleet/): told the upload, its progress, the end. */
  lease?: Lease;
}

export class BlobFetch implements UpstreamFetch, FollowedFetch {
  readonly digest: Digest;
  /** The repository the fetch is made for (with its scope), and linked to when kept. */
  readonly repo: RepositoryKey;
  size: number | undefined;
  /** Bytes received from the upstream (and handed to live followers). */
  received = 0;
  /** Bytes on disk in the upload session. */
  written = 0;
  /**
   * `streamed`: verified and served whole, but not kept (larger than the whole budget); the
   * upload is removed once its last follower is done.
   */
  state: FetchState = 'starting';
  error: unknown;
  /** The bytes come from the replica fetching the blob (fleet/peers.ts), not the upstream. */
  private fromPeer = false;
  /** Resolves once the upstream answered with the blob's headers; rejects with its error. */
  readonly ready: Promise<void>;
  /** Resolves when the blob is committed; rejects when the fetch failed. */
  readonly done: Promise<Descriptor>;
  private writer: BlobWriter | undefined;
  /** The upload session being made; `writer` once it is. */
  private session!: Promise<BlobWriter>;
  private readonly followers = new Set<BlobFollower>();
  private readonly abort = new AbortController();
  /**
   * The upstream body is received into these: each chunk is a view of them until the pump has
   * written it, then its slab is read into again (receive-slabs.ts).
   */
  private readonly slabs = new ReceiveSlabs();
  private orphanTimer: NodeJS.Timeout | undefined;
  /** Ends this fetch's count against the budget (StorageBudget.reserve). */
  private unreserve: (() => void) | undefined;
  private readonly started = Date.now();
  // The write pump.
  private queue: Buffer[] = [];
  private queuedBytes = 0;
  private pumping: Promise<void> | undefined;
  private writeError: unknown;
  private diskWaiters: (() => void)[] = [];
  /** Time the fetch spent waiting for the disk, for the log: a slow disk shows here. */
  private diskWaitMs = 0;
  /** Resolves when the fetch is over, committed or failed (before `done` settles). */
  private readonly settled = deferred<void>();

  constructor(private readonly options: BlobFetchOptions) {
    this.digest = options.digest;
    this.repo = options.repo;
    const ready = deferred<void>();
    this.ready = ready.promise;
    this.done = this.run(ready.resolve, ready.reject);
    // Callers await it when they care; an unobserved failure is logged, never unhandled.
    this.done.catch(() => {});
  }

  private async run(ready: () => void, notReady: (err: unknown) => void): Promise<Descriptor> {
    const { blobs, client, repo, digest, log } = this.options;
    // The upload session is made while the upstream is asked, and the body is taken into the
    // write queue at once, before the session is ready: the fetch need not wait for it. The
    // upstream client verifies the digest as the bytes stream (its stream errors on a
    // mismatch), so the session need not hash them a second time (see the commit below).
    this.session = blobs.create({ hash: false, digest });
    this.session.catch(() => {}); // its error, if any, is met by the pump or below
    try {
      const { size, stream, fromPeer } = await client.getBlob(repo.repository, digest, {
        signal: this.abort.signal,
        slabs: this.slabs,
        settled: this.settled.promise,
      });
      this.size = size;
      this.fromPeer = fromPeer === true;
      // The replica followed stores the blob in this storage before it sends the last byte: the
      // upload here is a spare, kept where the clients that fall behind read it (before the first
      // write, which waits for the same session).
      if (fromPeer)
        void this.session.then(
          (w) => w.expectStoredElsewhere(),
          () => {},
        );
      // The session is ready before any client is answered, so that one that could not be made
      // (S3's spool directory full or read-only, the store refusing) is a clean 503, not a
      // response cut after its headers. It was made while the upstream was asked: no wait here
      // in the usual case.
      this.writer = await this.session.catch((err: unknown) => {
        stream.destroy();
        throw err;
      });
      // Before the first write: the pump starts with the first chunk, below.
      if (size !== undefined) this.writer.expectSize(size);
      this.state = 'running';
      const keep = this.options.budget?.accepts(digest, size) ?? true;
      // Not kept: written only where its clients read it (S3: the spool file, no multipart
      // upload of a blob to be dropped).
      if (!keep) this.writer.expectStoredElsewhere();
      // Counted against the budget while it comes (a peer's blob is the holder's to count).
      if (keep && size !== undefined && !fromPeer)
        this.unreserve = this.options.budget?.reserve(size);
      const lease = this.options.lease;
      // Before the first write (the pump waits for the same session), so progress comes after.
      if (lease)
        void this.session.then(
          (w) => lease.started({ id: w.id, size }),
          () => {},
        );
      ready();
      for await (const raw of stream) {
        const chunk = raw as Buffer;
        const offset = this.received;
        this.received += chunk.length;
        this.options.onUpstreamBytes?.(chunk.length);
        for (const follower of this.followers) follower.onChunk(chunk, offset, this.slabs);
        this.enqueue(chunk);
        if (this.received - this.written > WRITE_QUEUE) await this.diskCatchUp();
      }
      const flushStarted = performance.now();
      while (this.pumping) await this.pumping;
      this.diskWaitMs += performance.now() - flushStarted;
      if (this.writeError) throw this.writeError;
      this.writer ??= await this.session;
      if (!keep) {
        // Verified (the stream ended without an error) and written for the followers to read:
        // release their last byte, and drop the upload when the last of them is done.
        this.state = 'streamed';
        log.info(
          { digest, bytes: this.received, clients: this.followers.size },
          'blob streamed, not kept',
        );
        for (const follower of [...this.followers]) follower.onCommitted();
        this.options.lease?.committed(this.received, false);
        this.dropIfUnfollowed();
        return { digest, size: this.received };
      }
      // The stream ended without an error, so the upstream client has checked every byte
      // against the digest (and the pump wrote exactly those bytes): commit need not read the
      // upload back to hash it again.
      this.options.lease?.committing();
      const descriptor = await this.writer.commit({
        digest,
        ...(size !== undefined ? { size } : {}),
        verified: true,
      });
      this.size = descriptor.size;
      // Counted as stored from here (onCommitted): no longer as being fetched.
      this.unreserve?.();
      await this.options.onCommitted(descriptor);
      this.state = 'committed';
      log.info(
        {
          digest,
          bytes: descriptor.size,
          durationMs: Date.now() - this.started,
          clients: this.followers.size,
          diskWaitMs: Math.round(this.diskWaitMs),
        },
        'blob fetched',
      );
      for (const follower of [...this.followers]) follower.onCommitted();
      this.options.lease?.committed(descriptor.size, true);
      return descriptor;
    } catch (err) {
      this.state = 'failed';
      this.error = err;
      notReady(err);
      this.options.lease?.failed((err as Error).message);
      // The budget hears of a full disk before the upload goes: once it is gone, an eviction
      // is under way (a test that waits for the upload's removal, then for the lifecycle to
      // settle, saw no eviction when the removal came first). Not of a full spool directory
      // (S3): evicting from the bucket frees nothing there.
      if (err instanceof SpoolError) {
        const now = Date.now();
        if (now - spoolLoggedAt >= SPOOL_LOG_INTERVAL_MS) {
          spoolLoggedAt = now;
          log.error(
            { spoolDir: err.dir, digest, err: err.message, cause: String(err.cause) },
            'spool directory cannot take blobs: fetches answer 503 (storage.s3.spoolDir)',
          );
        }
      } else if ((err as NodeJS.ErrnoException).code === 'ENOSPC')
        this.options.budget?.diskFull(Math.max(this.size ?? 0, this.received));
      this.wakeDiskWaiters();
      while (this.pumping) await this.pumping.catch(() => {});
      const writer = this.writer ?? (await this.session.catch(() => undefined));
      await writer?.cancel().catch(() => {});
      // A digest the upstream does not have is the client's business (a 404 it is told), not
      // the operator's: said at debug; the request line has it.
      if (!(err instanceof SpoolError))
        log[err instanceof UpstreamNotFoundError ? 'debug' : 'warn'](
          {
            digest,
            bytes: this.received,
            err: (err as Error).message,
            ...(err instanceof StorageUnavailableError ? err.logFields : {}),
          },
          'blob fetch failed, nothing kept',
        );
      for (const follower of [...this.followers]) follower.destroy(err as Error);
      throw err;
    } finally {
      this.unreserve?.(); // given up (or ended above)
      clearTimeout(this.orphanTimer);
      this.settled.resolve();
    }
  }

  private enqueue(chunk: Buffer): void {
    this.queue.push(chunk);
    this.queuedBytes += chunk.length;
    this.pumping ??= this.pump().finally(() => (this.pumping = undefined));
  }

  /** Writes queued chunks in batches until the queue is empty. */
  private async pump(): Promise<void> {
    while (this.queue.length > 0 && !this.writeError) {
      const batch = this.queue;
      const bytes = this.queuedBytes;
      this.queue = [];
      this.queuedBytes = 0;
      try {
        this.writer ??= await this.session;
        await this.writer.writev(batch);
      } catch (err) {
        this.writeError = err;
        break;
      }
      for (const chunk of batch) this.slabs.release(chunk);
      this.written += bytes;
      this.options.lease?.progress(this.written);
      for (const follower of this.followers) follower.onWritten();
      this.wakeDiskWaiters();
    }
    this.wakeDiskWaiters();
  }

  private async diskCatchUp(): Promise<void> {
    const started = performance.now();
    while (
      this.received - this.written > WRITE_QUEUE &&
      !this.writeError &&
      this.state !== 'failed'
    ) {
      await new Promise<void>((resolve) => this.diskWaiters.push(resolve));
    }
    this.diskWaitMs += performance.now() - started;
    if (this.writeError) throw this.writeError;
  }

  private wakeDiskWaiters(): void {
    const waiters = this.diskWaiters;
    this.diskWaiters = [];
    for (const wake of waiters) wake();
  }

  /** A stream of bytes [start, end) of the blob, following the fetch. Call after `ready`. */
  follow(start: number, end: number): BlobFollower {
    const follower = new BlobFollower(this, start, end);
    if (this.state === 'failed') {
      // Failed between the caller's `ready` and now: say so at once rather than wait for chunks.
      process.nextTick(() => follower.destroy(this.error as Error));
      return follower;
    }
    this.followers.add(follower);
    clearTimeout(this.orphanTimer);
    this.orphanTimer = undefined;
    return follower;
  }

  unfollow(follower: BlobFollower): void {
    this.followers.delete(follower);
    if (this.state === 'streamed') this.dropIfUnfollowed();
    if (this.followers.size === 0 && (this.state === 'running' || this.state === 'starting')) {
      // Every client left: the fetch goes on to fill the cache, but not forever.
      this.orphanTimer = setTimeout(() => {
        this.options.log.warn(
          { digest: this.digest, bytes: this.received },
          'blob fetch abandoned: no client and past the cache write timeout',
        );
        this.abort.abort(new Error('cache write timeout'));
      }, this.options.orphanTimeout);
      this.orphanTimer.unref();
    }
  }

  /**
   * Whether this process fetches the blob from the upstream: not while it follows another
   * replica's fetch, which that replica counts (`pullcache_fetches_in_flight`). Known once the
   * peer answered: until then (the holder's upstream answering it) a follower counts too.
   */
  get local(): boolean {
    return !this.fromPeer;
  }

  /** When the fetch started, ms since epoch. */
  get startedAt(): number {
    return this.started;
  }

  /** Clients following the fetch now. */
  get clients(): number {
    return this.followers.size;
  }

  /** True once the digest is verified: the last byte may go to the followers. */
  isCommitted(): boolean {
    return this.state === 'committed' || this.state === 'streamed';
  }

  /** A blob streamed and not kept: its upload goes once nobody reads it. */
  private dropIfUnfollowed(): void {
    if (this.followers.size > 0 || !this.writer) return;
    const writer = this.writer;
    this.writer = undefined;
    void writer.cancel().catch(() => {});
  }

  /** Reads bytes already on disk, from the upload while it runs and from the blob once committed. */
  async readWritten(offset: number, length: number): Promise<RangeStream> {
    if (this.state === 'streamed') {
      if (!this.writer) throw new PathNotFoundError(this.digest);
      return this.writer.readWritten(offset, length);
    }
    const writer = this.state !== 'committed' ? this.writer : undefined;
    return readWrittenOrStored(
      this,
      this.options.blobs,
      writer && (() => writer.readWritten(offset, length)),
      offset,
      length,
    );
  }
}
