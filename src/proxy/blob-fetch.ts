/**
 * One upstream fetch of one blob, followed by every client that asks for it meanwhile.
 *
 * The fetch writes each chunk to an upload session as it arrives and is paced only by the
 * upstream and the disk. Each client is a `BlobFollower`: while it keeps up it is handed the
 * chunks from memory; when its socket pushes back it falls behind to reading the upload from
 * disk, and rejoins the live chunks once it catches up. So memory stays bounded (about one
 * read buffer per client), whatever the blob size and however slow a client is, and a late
 * joiner starts from the beginning of what is already written.
 *
 * The last byte of every response is held back until the digest is verified and the upload is
 * committed; on a mismatch every follower is destroyed, so no client can take the bytes of a
 * bad blob for a good one.
 */
import { Readable } from 'node:stream';
import type { Logger } from '../log/logger.js';
import type { Digest } from '../oci/digest.js';
import type { Descriptor } from '../oci/descriptor.js';
import {
  PathNotFoundError,
  type BlobStore,
  type BlobWriter,
  type RepositoryKey,
} from '../storage/types.js';
import type { UpstreamClient } from '../upstream/types.js';

const DISK_READ = 1024 * 1024;
const FOLLOWER_BUFFER = 1024 * 1024;

export interface BlobFetchOptions {
  blobs: BlobStore;
  client: UpstreamClient;
  repo: RepositoryKey;
  digest: Digest;
  log: Logger;
  /** How long the fetch may go on with no client following it. */
  orphanTimeout: number;
  onCommitted: (descriptor: Descriptor) => Promise<void>;
  onUpstreamBytes?: (bytes: number) => void;
}

export class BlobFetch {
  readonly digest: Digest;
  size: number | undefined;
  written = 0;
  state: 'starting' | 'running' | 'committed' | 'failed' = 'starting';
  error: unknown;
  /** Resolves once the upstream answered with the blob's headers; rejects with its error. */
  readonly ready: Promise<void>;
  /** Resolves when the blob is committed; rejects when the fetch failed. */
  readonly done: Promise<Descriptor>;
  private writer: BlobWriter | undefined;
  private readonly followers = new Set<BlobFollower>();
  private readonly abort = new AbortController();
  private orphanTimer: NodeJS.Timeout | undefined;
  private readonly started = Date.now();

  constructor(private readonly options: BlobFetchOptions) {
    this.digest = options.digest;
    let ready!: () => void;
    let notReady!: (err: unknown) => void;
    this.ready = new Promise((resolve, reject) => {
      ready = resolve;
      notReady = reject;
    });
    this.done = this.run(ready, notReady);
    // Callers await these when they care; an unobserved failure is logged, never unhandled.
    this.ready.catch(() => {});
    this.done.catch(() => {});
  }

  private async run(ready: () => void, notReady: (err: unknown) => void): Promise<Descriptor> {
    const { blobs, client, repo, digest, log } = this.options;
    try {
      const { size, stream } = await client.getBlob(repo.repository, digest, {
        signal: this.abort.signal,
      });
      this.size = size;
      this.writer = await blobs.create();
      this.state = 'running';
      ready();
      for await (const raw of stream) {
        const chunk = raw as Buffer;
        await this.writer.write(chunk);
        const offset = this.written;
        this.written += chunk.length;
        this.options.onUpstreamBytes?.(chunk.length);
        for (const follower of this.followers) follower.onChunk(chunk, offset);
      }
      const descriptor = await this.writer.commit({
        digest,
        ...(size !== undefined ? { size } : {}),
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
        },
        'blob fetched',
      );
      for (const follower of [...this.followers]) follower.onCommitted();
      return descriptor;
    } catch (err) {
      this.state = 'failed';
      this.error = err;
      notReady(err);
      await this.writer?.cancel().catch(() => {});
      log.warn(
        { digest, bytes: this.written, err: (err as Error).message },
        'blob fetch failed, nothing kept',
      );
      for (const follower of [...this.followers]) follower.destroy(err as Error);
      throw err;
    } finally {
      clearTimeout(this.orphanTimer);
    }
  }

  /** A stream of bytes [start, end) of the blob, following the fetch. Call after `ready`. */
  follow(start: number, end: number): Readable {
    const follower = new BlobFollower(this, this.options.blobs, start, end);
    this.followers.add(follower);
    clearTimeout(this.orphanTimer);
    this.orphanTimer = undefined;
    return follower;
  }

  unfollow(follower: BlobFollower): void {
    this.followers.delete(follower);
    if (this.followers.size === 0 && (this.state === 'running' || this.state === 'starting')) {
      // Every client left: the fetch goes on to fill the cache, but not forever.
      this.orphanTimer = setTimeout(() => {
        this.options.log.warn(
          { digest: this.digest, bytes: this.written },
          'blob fetch abandoned: no client and past the cache write timeout',
        );
        this.abort.abort(new Error('cache write timeout'));
      }, this.options.orphanTimeout);
      this.orphanTimer.unref();
    }
  }

  isCommitted(): boolean {
    return this.state === 'committed';
  }

  /** Reads bytes already written, from the upload while it runs and from the blob once committed. */
  async readWritten(offset: number, length: number): Promise<Readable> {
    if (this.state !== 'committed' && this.writer) {
      try {
        return await this.writer.readWritten(offset, length);
      } catch (err) {
        // Committed (moved into place) between the check and the read.
        if (!(err instanceof PathNotFoundError) || !this.isCommitted())
          throw this.state === 'failed' ? this.error : err;
      }
    }
    const opened = await this.options.blobs.open(this.digest, {
      start: offset,
      end: offset + length - 1,
    });
    if (!opened.found) throw new PathNotFoundError(this.digest);
    return opened.stream;
  }
}

class BlobFollower extends Readable {
  private pos: number;
  private live: boolean;
  private reading = false;

  constructor(
    private readonly fetch: BlobFetch,
    _blobs: BlobStore,
    start: number,
    private readonly end: number,
  ) {
    super({ highWaterMark: FOLLOWER_BUFFER });
    this.pos = start;
    this.live = start >= fetch.written && fetch.state !== 'committed';
  }

  /** The last byte this follower may deliver now (exclusive): all of it only once committed. */
  private limit(): number {
    if (this.fetch.state === 'committed') return this.end;
    return Math.min(this.fetch.written, this.end - 1);
  }

  onChunk(chunk: Buffer, offset: number): void {
    if (!this.live || this.destroyed) return;
    const from = this.pos - offset;
    const to = Math.min(chunk.length, this.end - 1 - offset);
    if (from < 0 || to <= from) return;
    this.pos += to - from;
    if (!this.push(chunk.subarray(from, to))) this.live = false; // the socket pushes back: read from disk from now on
  }

  onCommitted(): void {
    this.live = false;
    if (!this.reading) void this.readDisk();
  }

  override _read(): void {
    if (!this.live && !this.reading) void this.readDisk();
  }

  override _destroy(err: Error | null, callback: (error?: Error | null) => void): void {
    this.fetch.unfollow(this);
    callback(err);
  }

  private async readDisk(): Promise<void> {
    this.reading = true;
    try {
      for (;;) {
        if (this.destroyed) return;
        if (this.fetch.state === 'failed') {
          this.destroy(this.fetch.error as Error);
          return;
        }
        const limit = this.limit();
        if (this.pos >= limit) {
          if (this.fetch.state === 'committed') {
            this.push(null);
          } else {
            this.live = true; // caught up: take chunks from memory again
          }
          return;
        }
        const length = Math.min(limit - this.pos, DISK_READ);
        const stream = await this.fetch.readWritten(this.pos, length);
        let more = true;
        for await (const chunk of stream) {
          if (this.destroyed) {
            stream.destroy();
            return;
          }
          this.pos += (chunk as Buffer).length;
          more = this.push(chunk);
        }
        if (!more) return; // _read will call again when the socket drains
      }
    } catch (err) {
      this.destroy(this.fetch.state === 'failed' ? (this.fetch.error as Error) : (err as Error));
    } finally {
      this.reading = false;
    }
  }
}
