/**
 * A byte range of an object as a Readable that can also read into a caller's buffer (the
 * RangeStream contract that FileRange keeps for files), over an HTTP response body, or over any
 * Readable (byte-ranges.ts reads a fetch's follower through it).
 */
import { Readable } from 'node:stream';
import { READ_CHUNK } from './file-range.js';

export class ObjectRange extends Readable {
  private leftover: Buffer | undefined;
  private finished = false;

  constructor(private readonly body: Readable) {
    super({ highWaterMark: READ_CHUNK });
    body.once('end', () => {
      this.finished = true;
    });
    body.once('error', (err) => this.destroy(err));
  }

  /** The next chunk of the body, null at its end; the body stays paused between calls. */
  private async next(): Promise<Buffer | null> {
    if (this.leftover) {
      const chunk = this.leftover;
      this.leftover = undefined;
      return chunk;
    }
    for (;;) {
      const chunk = this.body.read() as Buffer | null;
      if (chunk) return chunk;
      if (this.finished || this.body.readableEnded) return null;
      if (this.body.destroyed) throw this.body.errored ?? new Error('object stream closed');
      await new Promise<void>((resolve) => {
        const done = () => {
          this.body.off('readable', done);
          this.body.off('end', done);
          this.body.off('close', done);
          resolve();
        };
        this.body.on('readable', done);
        this.body.on('end', done);
        this.body.on('close', done);
      });
    }
  }

  override _read(): void {
    this.next().then(
      (chunk) => this.push(chunk),
      (err: Error) => this.destroy(err),
    );
  }

  /** Reads up to `length` bytes into `buffer`; 0 at the end of the range. */
  async readInto(buffer: Uint8Array, length: number): Promise<number> {
    const want = Math.min(length, buffer.length);
    if (want <= 0) return 0;
    const chunk = await this.next();
    if (!chunk) return 0;
    const n = Math.min(want, chunk.length);
    buffer.set(chunk.subarray(0, n));
    if (n < chunk.length) this.leftover = chunk.subarray(n);
    return n;
  }

  override _destroy(err: Error | null, callback: (error?: Error | null) => void): void {
    this.body.destroy();
    callback(err);
  }
}
