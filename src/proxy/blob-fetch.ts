/**
 * One upstream fetch of one blob, followed by every client that asks for it meanwhile.
 *
 * Chunks from the upstream go to a write pump that appends them to an upload session in batches
 * (`writev`). The fetch waits for the disk only when more than WRITE_QUEUE bytes are not yet
 * written, so it is paced by the upstream, not by any client.
 *
 * Client responses take the blob with `BlobFollower.sendTo`. A client that keeps up is sent each
 * chunk as it arrives, the very bytes received (a view of the receive slab, held until its socket
 * has taken them): no copy and no read back. One that falls behind (or joins late) is sent the
 * rest from the upload on disk (the page cache, right behind the writes), read into two reused
 * buffers, at its own pace, and goes back to the chunks once it has caught up. Memory is bounded
 * (per client, two buffers and at most FOLLOWER_BUFFER of held chunks, in up to two slabs more
 * than the fetch holds; plus the write queue) and nothing is allocated per chunk, whatever the
 * blob size and the number of clients.
 * A follower used as a Readable instead (an export, a test) takes chunks straight from memory
 * while it keeps up ("live"), falls back to the disk when its consumer pushes back, and rejoins
 * the live chunks once it has caught up with everything received.
 *
 * The last byte of every response is held back until the digest is verified and the upload is
 * committed; on a mismatch every follower is destroyed, so no client can take the bytes of a
 * bad blob for a good one.
 */
import { Readable, type Writable } from 'node:stream';
import type { Logger } from '../log/logger.js';
import type { Digest } from '../oci/digest.js';
import { canReadInto, sendFilled, type RangeStream, type Sendable } from '../storage/file-range.js';
import type { Descriptor } from '../oci/descriptor.js';
import {
  PathNotFoundError,
  type BlobStore,
  type BlobWriter,
  type RepositoryKey,
} from '../storage/types.js';
import type { UpstreamClient } from '../upstream/types.js';
import { ReceiveSlabs } from '../upstream/receive-slabs.js';
import type { StorageBudget } from '../lifecycle/types.js';
import type { Lease } from '../fleet/types.js';
import type { FetchState, FollowedFetch, UpstreamFetch } from './types.js';
import { deferred } from './deferred.js';

/** Most bytes read from disk at once for a follower that fell behind. */
const DISK_READ = 1024 * 1024;
/** What a follower's socket may hold (of live chunks) before it falls back to disk. */
const FOLLOWER_BUFFER = 1024 * 1024;
/** Each of the two buffers a client served by `sendTo` reads the disk into. */
const SEND_READ = 512 * 1024;
/**
 * Most bytes received but not yet written before the fetch waits for the disk (and the upstream
 * body, paused, for the fetch). 8 MiB when a body could not be paused; 4 MiB with the receive
 * slabs: `bench/cold.ts` peaked at 98-106 MB against 124-132, at the same CPU.
 */
const WRITE_QUEUE = 4 * 1024 * 1024;

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
    this.session = blobs.create({ hash: false });
    this.session.catch(() => {}); // its error, if any, is met by the pump or below
    try {
      const { size, stream } = await client.getBlob(repo.repository, digest, {
        signal: this.abort.signal,
        slabs: this.slabs,
        settled: this.settled.promise,
      });
      this.size = size;
      this.state = 'running';
      const keep = this.options.budget?.accepts(digest, size) ?? true;
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
      const descriptor = await this.writer.commit({
        digest,
        ...(size !== undefined ? { size } : {}),
        verified: true,
      });
      this.size = descriptor.size;
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
      // settle, saw no eviction when the removal came first).
      if ((err as NodeJS.ErrnoException).code === 'ENOSPC')
        this.options.budget?.diskFull(Math.max(this.size ?? 0, this.received));
      this.wakeDiskWaiters();
      while (this.pumping) await this.pumping.catch(() => {});
      const writer = this.writer ?? (await this.session.catch(() => undefined));
      await writer?.cancel().catch(() => {});
      log.warn(
        { digest, bytes: this.received, err: (err as Error).message },
        'blob fetch failed, nothing kept',
      );
      for (const follower of [...this.followers]) follower.destroy(err as Error);
      throw err;
    } finally {
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

/**
 * Bytes a fetch has written: read by `fromUpload` while it runs, from the stored blob once it is
 * committed. An upload gone (PathNotFoundError) was just moved into place by the commit, or
 * removed by a failure: the fetch settles right after, and then the blob is read where it now
 * is, or the failure is the answer.
 */
export async function readWrittenOrStored(
  fetch: Pick<FollowedFetch, 'isCommitted'> & {
    digest: Digest;
    done: Promise<unknown>;
    error: unknown;
  },
  blobs: BlobStore,
  fromUpload: (() => Promise<RangeStream>) | undefined,
  offset: number,
  length: number,
): Promise<RangeStream> {
  if (fromUpload) {
    try {
      return await fromUpload();
    } catch (err) {
      if (!(err instanceof PathNotFoundError)) throw err;
      await fetch.done.catch(() => {});
      if (!fetch.isCommitted()) throw fetch.error ?? err;
    }
  }
  const opened = await blobs.open(fetch.digest, { start: offset, end: offset + length - 1 });
  if (!opened.found) throw new PathNotFoundError(fetch.digest);
  if (!canReadInto(opened.stream)) throw new Error('storage reader cannot read into buffers');
  return opened.stream;
}

/** Every follower alive, for diagnosis (`PULLCACHE_TEST_FOLLOWERS`); empty otherwise. */
export const liveFollowers = new Set<BlobFollower>();

export class BlobFollower extends Readable implements Sendable {
  private pos: number;
  /** Taking chunks from memory as they arrive. */
  private live: boolean;
  private reading = false;
  /** Caught up with the disk, but not with what was received: wait for the next write. */
  private waitingForDisk = false;
  /** Who takes the bytes: nobody yet, a Readable consumer, or `sendTo`. */
  private consumer: 'none' | 'readable' | 'sendTo' = 'none';
  /** Wakes `sendTo` waiting for the fetch to write more, commit or fail. */
  private wakeSender: (() => void) | undefined;
  /** Where `sendTo`, caught up with everything received, sends the chunks as they arrive. */
  private liveDest: Writable | undefined;

  constructor(
    private readonly fetch: FollowedFetch,
    start: number,
    private readonly end: number,
  ) {
    super({ highWaterMark: FOLLOWER_BUFFER });
    if (process.env.PULLCACHE_TEST_FOLLOWERS) liveFollowers.add(this);
    this.pos = start;
    // Live (chunks from memory) only once a Readable consumer has asked and caught up with the
    // disk: until then nothing is pushed, so `sendTo` can still take over from `start`.
    this.live = false;
  }

  onChunk(chunk: Buffer, offset: number, slabs: ReceiveSlabs): void {
    if (this.destroyed) return;
    if (this.liveDest) {
      this.sendLive(this.liveDest, chunk, offset, slabs);
      return;
    }
    if (!this.live) return;
    const [from, to] = this.liveSpan(chunk, offset);
    if (from < 0 || to <= from) return;
    this.pos += to - from;
    // A copy: the chunk's slab is read into again once the fetch has written it.
    if (!this.push(Buffer.from(chunk.subarray(from, to)))) this.live = false; // the socket pushes back: read from disk from now on
  }

  /**
   * `sendTo` at the live edge: the chunk goes to the response as it is, its slab lent until the
   * socket has taken it (then the fetch may read into it again). A chunk that would take the
   * response past FOLLOWER_BUFFER comes from the disk instead, with the rest. Never the last byte
   * (the digest).
   */
  private sendLive(dest: Writable, chunk: Buffer, offset: number, slabs: ReceiveSlabs): void {
    const [from, to] = this.liveSpan(chunk, offset);
    if (from !== 0) {
      // Not the next bytes (cannot happen: live starts where everything received was sent).
      this.leaveLive();
      return;
    }
    if (to <= 0) return;
    // A response whose socket is gone may never call back: its slab would stay lent.
    const socket = (dest as { socket?: { destroyed: boolean } | null }).socket;
    if (dest.writableLength + to > FOLLOWER_BUFFER || dest.destroyed || socket?.destroyed) {
      this.leaveLive(); // these bytes come from the disk, if at all
      return;
    }
    const view = slabs.lend(chunk.subarray(0, to));
    this.pos += to;
    dest.write(view, () => slabs.release(view));
  }

  /** The part of a chunk at `offset` this follower takes next: from `pos`, never the last byte. */
  private liveSpan(chunk: Buffer, offset: number): [from: number, to: number] {
    return [this.pos - offset, Math.min(chunk.length, this.end - 1 - offset)];
  }

  /** How far the disk may be read: all but the last byte until the digest is verified. */
  private readLimit(committed: boolean): number {
    return committed ? this.end : Math.min(this.fetch.written, this.end - 1);
  }

  private leaveLive(): void {
    this.liveDest = undefined;
    this.wake();
  }

  onWritten(): void {
    if (this.consumer === 'sendTo') this.wake();
    else if (this.waitingForDisk && !this.reading) void this.readDisk();
  }

  onCommitted(): void {
    this.live = false;
    this.liveDest = undefined;
    if (this.consumer === 'sendTo') this.wake();
    else if (this.consumer === 'readable' && !this.reading) void this.readDisk();
  }

  /**
   * How a client response takes the blob: the chunks as they arrive while it keeps up
   * (`sendLive`), else from the disk (the page cache, right behind the fetch's writes), read into
   * two reused buffers by `sendFilled`. No buffer per chunk, so 16 clients on one cold blob make
   * no garbage; the last byte still waits for the digest.
   */
  async sendTo(dest: Writable): Promise<void> {
    if (this.consumer !== 'none') throw new Error('sendTo on a follower already being read');
    this.consumer = 'sendTo';
    // A failed fetch destroys its followers with its error; this one reports it by rejecting
    // (its fill throws the fetch's error), so the stream's own 'error' has nobody else to tell.
    this.on('error', () => {});
    let file: RangeStream | undefined;
    /** Where `file` reads next. */
    let fileAt = 0;
    try {
      let wakeOnGone = false;
      await sendFilled(dest, SEND_READ, async (buffer, gone) => {
        for (;;) {
          gone.throwIfAborted();
          if (this.fetch.state === 'failed') throw this.fetch.error;
          if (this.destroyed) throw new Error('blob follower destroyed');
          const committed = this.fetch.isCommitted();
          const limit = this.readLimit(committed);
          if (this.pos < limit) {
            this.liveDest = undefined;
            // Chunks sent live since the last read: read on from where they ended.
            if (file?.seek) file.seek(this.pos);
            else if (file && fileAt !== this.pos) {
              file.destroy();
              file = undefined;
            }
            // One open file for the whole response: it stays readable when the commit renames it.
            file ??= await this.fetch.readWritten(this.pos, this.end - this.pos);
            const n = await file.readInto(buffer, Math.min(buffer.length, limit - this.pos));
            if (n === 0) throw new Error(`blob file ended at ${this.pos} of ${this.end} bytes`);
            this.pos += n;
            fileAt = this.pos;
            return n;
          }
          if (committed) return 0;
          // Opened as soon as there is an upload, for what live chunks do not carry (the last
          // byte, what the client missed while behind): not the stored blob after the commit.
          if (!file && this.fetch.written > 0) {
            // Live chunks may move `pos` while this waits.
            const at = this.pos;
            file = await this.fetch.readWritten(at, this.end - at);
            fileAt = at;
            continue;
          }
          // Caught up with every byte received, and the response is taking them: the next
          // chunks go to it as they come. (sendFilled wrote every buffer filled before this.)
          if (
            this.pos === this.fetch.received &&
            this.pos < this.end - 1 &&
            dest.writableLength <= FOLLOWER_BUFFER
          )
            this.liveDest = dest;
          if (!wakeOnGone) {
            gone.addEventListener('abort', () => this.wake(), { once: true });
            wakeOnGone = true;
          }
          await new Promise<void>((resolve) => (this.wakeSender = resolve));
        }
      });
    } finally {
      file?.destroy();
      this.destroy();
    }
  }

  private wake(): void {
    const wake = this.wakeSender;
    this.wakeSender = undefined;
    wake?.();
  }

  override _read(): void {
    if (this.consumer === 'sendTo') return;
    this.consumer = 'readable';
    if (!this.live && !this.reading && !this.waitingForDisk) void this.readDisk();
  }

  /** The follower's state, for diagnosis. */
  describe(): Record<string, unknown> {
    return {
      pos: this.pos,
      end: this.end,
      consumer: this.consumer,
      live: this.live,
      sendingLive: this.liveDest !== undefined,
      reading: this.reading,
      waitingForDisk: this.waitingForDisk,
      buffered: this.readableLength,
      flowing: this.readableFlowing,
      ended: this.readableEnded,
      received: this.fetch.received,
      written: this.fetch.written,
      state: this.fetch.state,
    };
  }

  override _destroy(err: Error | null, callback: (error?: Error | null) => void): void {
    liveFollowers.delete(this);
    this.liveDest = undefined;
    this.fetch.unfollow(this);
    this.wake();
    callback(err);
  }

  private async readDisk(): Promise<void> {
    this.reading = true;
    this.waitingForDisk = false;
    try {
      for (;;) {
        if (this.destroyed) return;
        if (this.fetch.state === 'failed') {
          this.destroy(this.fetch.error as Error);
          return;
        }
        const committed = this.fetch.isCommitted();
        const limit = this.readLimit(committed);
        if (this.pos >= limit) {
          if (committed) this.push(null);
          else if (this.pos >= Math.min(this.fetch.received, this.end - 1))
            this.live = true; // caught up: chunks from memory again
          else this.waitingForDisk = true; // received bytes are still on their way to disk
          return;
        }
        const stream = await this.fetch.readWritten(
          this.pos,
          Math.min(limit - this.pos, DISK_READ),
        );
        for await (const chunk of stream) {
          if (this.destroyed) {
            stream.destroy();
            return;
          }
          this.pos += (chunk as Buffer).length;
          this.push(chunk);
        }
        // Stop only while the buffer is still full: then no _read has come since the last push,
        // and one will come when the socket drains. (Deciding on the last push's answer instead
        // hung a client now and then: the socket drained while the file stream was ending, and
        // that _read was ignored because this loop was still running.)
        if (this.readableLength >= this.readableHighWaterMark) return;
      }
    } catch (err) {
      this.destroy(this.fetch.state === 'failed' ? (this.fetch.error as Error) : (err as Error));
    } finally {
      this.reading = false;
    }
  }
}
