/**
 * A client of a blob fetch (blob-fetch.ts here, remote-fetch.ts for another process's): a
 * stream of bytes [start, end) that follows the fetch.
 *
 * `sendTo` takes a client response. While the client keeps up it is sent each chunk as it
 * arrives, the very bytes received (a view of the receive slab, held until its socket has taken
 * them): no copy and no read back. One that falls behind (or joins late) is sent the rest from
 * the upload on disk (the page cache, right behind the writes), read into two reused buffers, at
 * its own pace, and goes back to the chunks once it has caught up. Memory is bounded (two
 * buffers and at most FOLLOWER_BUFFER of held chunks per client) and nothing is allocated per
 * chunk. A follower used as a Readable instead (an export, a test) takes chunks straight from
 * memory while it keeps up ("live"), falls back to the disk when its consumer pushes back, and
 * rejoins the live chunks once it has caught up with everything received.
 *
 * Never the last byte before the fetch is committed (its digest verified); destroyed with the
 * fetch's error when it fails.
 */
import { Readable, type Writable } from 'node:stream';
import type { Digest } from '../oci/digest.js';
import { canReadInto, sendFilled, type RangeStream, type Sendable } from '../storage/file-range.js';
import type { BlobStore } from '../storage/types.js';
import { PathNotFoundError } from '../storage/errors.js';
import type { ReceiveSlabs } from '../upstream/receive-slabs.js';
import type { FollowedFetch } from './types.js';

/** Most bytes read from disk at once for a follower that fell behind. */
const DISK_READ = 1024 * 1024;
/** What a follower's socket may hold (of live chunks) before it falls back to disk. */
const FOLLOWER_BUFFER = 1024 * 1024;
/** Each of the two buffers a client served by `sendTo` reads the disk into. */
const SEND_READ = 512 * 1024;

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
