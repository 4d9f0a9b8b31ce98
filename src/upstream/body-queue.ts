/**
 * Reads an undici response body in flowing mode into a bounded queue, so that undici's HTTP/1
 * parser is never paused by backpressure.
 *
 * Why: undici 7 crashes the process with an uncatchable `assert(!this.paused)` when a response
 * that says `Connection: close` ends (FIN) while its parser is paused
 * (https://github.com/nodejs/undici/issues/5360, fixed only in undici 8, which needs Node 22).
 * A blob consumer that awaits disk writes pauses the parser all the time. So the body always
 * flows; when the consumer falls more than `cap` bytes behind, the body is cut instead of paused,
 * and the caller continues with a Range request from where the consumer is.
 */
import type { Readable } from 'node:stream';

export type QueueEnd = { kind: 'end' } | { kind: 'overflow' } | { kind: 'error'; error: unknown };

export class BodyQueue {
  private readonly chunks: Buffer[] = [];
  private bytes = 0;
  private finished: QueueEnd | undefined;
  private wake: (() => void) | undefined;

  constructor(
    private readonly body: Readable,
    private readonly cap: number,
  ) {
    body.on('data', (chunk: Buffer) => {
      if (this.finished) return;
      this.chunks.push(chunk);
      this.bytes += chunk.length;
      if (this.bytes > this.cap) {
        this.finish({ kind: 'overflow' });
        body.destroy();
      }
      this.notify();
    });
    body.once('end', () => this.finish({ kind: 'end' }));
    body.once('error', (error) => this.finish({ kind: 'error', error }));
    body.once('close', () =>
      this.finish({
        kind: 'error',
        error: Object.assign(new Error('body closed early'), { code: 'UND_ERR_SOCKET' }),
      }),
    );
  }

  /**
   * Chunks in order, as the socket gave them; then returns how the body ended (an error is
   * returned, not thrown). Queued chunks are not joined: a joined 1 MiB buffer is a fresh mmap
   * of the allocator each time, and `bench/cold.ts` measured the same or less CPU without.
   */
  async *drain(): AsyncGenerator<Buffer, QueueEnd> {
    try {
      for (;;) {
        const chunk = this.chunks.shift();
        if (chunk) {
          this.bytes -= chunk.length;
          yield chunk;
          continue;
        }
        if (this.finished) return this.finished;
        await new Promise<void>((resolve) => (this.wake = resolve));
      }
    } finally {
      // The consumer stopped early (abort, error): let go of the connection.
      if (!this.finished) this.body.destroy();
    }
  }

  private finish(end: QueueEnd): void {
    this.finished ??= end;
    this.notify();
  }

  private notify(): void {
    const wake = this.wake;
    this.wake = undefined;
    wake?.();
  }
}
