/**
 * The body of a blob path response (raw-get.ts) as its connection (raw-connection.ts) reads it:
 * views of the receive slabs, queued in order for one consumer, the next bytes of a slab joined
 * to the view before them. The body is paused, not cut, when its consumer falls behind: past
 * BODY_PAUSE bytes queued, the connection stops reading until the consumer has taken some.
 */
import { codedError } from './errors.js';
import type { ReceiveSlabs } from './receive-slabs.js';

/** How a body ended: an error is returned, not thrown. */
export type QueueEnd = { kind: 'end' } | { kind: 'error'; error: unknown };

/** How far the body's consumer may fall behind before the socket is paused. */
const BODY_PAUSE = 2 * 1024 * 1024;

/** The request a body answers, as its connection knows it (raw-connection.ts's Exchange). */
export interface BodyExchange {
  /** Where the body is read into. */
  readonly slabs: ReceiveSlabs;
}

/** What a body asks of its connection (raw-connection.ts's Connection). */
export interface BodyConnection {
  /** Reads again after a pause, if `exchange` is still the connection's request. */
  resumeFor(exchange: BodyExchange): void;
  /** Ends the connection, and the body with it, with `err`. */
  fail(err: Error): void;
}

/**
 * A response body as views of the receive slabs, in order. The consumer releases each view to
 * the slabs when done with it (`ReceiveSlabs.release`).
 */
export class RawBody {
  /** Bytes pushed and not yet taken. */
  queued = 0;
  private readonly views: Buffer[] = [];
  private finished: QueueEnd | undefined;
  private wake: (() => void) | undefined;
  private taken = false;
  private waking: NodeJS.Immediate | undefined;

  constructor(
    private readonly connection: BodyConnection,
    private readonly exchange: BodyExchange,
    readonly keepAlive: boolean,
  ) {}

  /** How the body ended, once it has (after `drain` is done: a `for await` drops its result). */
  get ended(): QueueEnd | undefined {
    return this.finished;
  }

  /** True while the socket waits for the consumer. */
  get paused(): boolean {
    return this.queued > BODY_PAUSE;
  }

  push(view: Buffer): void {
    if (this.finished) return;
    const last = this.views.at(-1);
    if (
      last &&
      last.buffer === view.buffer &&
      last.byteOffset + last.length === view.byteOffset &&
      this.exchange.slabs.lends(view)
    ) {
      // The next bytes of the same slab, not yet taken: one view, lent once. TLS hands a body
      // out a record (16 KiB) at a time; the consumer takes what a turn of the loop read.
      this.views[this.views.length - 1] = Buffer.from(
        last.buffer,
        last.byteOffset,
        last.length + view.length,
      );
      this.exchange.slabs.release(view);
    } else this.views.push(view);
    this.queued += view.length;
    this.notifySoon();
  }

  finish(end: QueueEnd): void {
    this.finished ??= end;
    this.notifySoon();
  }

  /**
   * The views in order, then how the body ended (an error is returned, not thrown). A consumer
   * that stops early (`return`, as `for await` does on a break or a throw) cuts the connection.
   */
  async *drain(): AsyncGenerator<Buffer, QueueEnd> {
    if (this.taken) throw new Error('body already read');
    this.taken = true;
    try {
      for (;;) {
        const view = this.views.shift();
        if (view) {
          const wasPaused = this.paused;
          this.queued -= view.length;
          if (wasPaused && !this.paused) this.connection.resumeFor(this.exchange);
          yield view;
          continue;
        }
        if (this.finished) return this.finished;
        await new Promise<void>((resolve) => (this.wake = resolve));
      }
    } finally {
      if (!this.finished) this.destroy();
    }
  }

  /**
   * Skips the rest of the body (a 401's, a redirect's). One that has ended leaves its connection
   * kept; one still coming is cut: read to its end, it would go on filling the fetch's slabs
   * while the next request, on another connection, reads into them too.
   */
  resume(): void {
    for (const view of this.views.splice(0)) this.exchange.slabs.release(view);
    this.queued = 0;
    this.destroy();
  }

  destroy(): void {
    if (this.finished) return;
    this.connection.fail(codedError('UND_ERR_ABORTED', 'body not read to its end'));
  }

  /**
   * Wakes the consumer after the reads at hand: the pieces that the socket's other reads (and
   * TLS records) of this turn of the event loop push meanwhile join the queue first.
   */
  private notifySoon(): void {
    if (!this.wake || this.waking) return;
    this.waking = setImmediate(() => {
      this.waking = undefined;
      const wake = this.wake;
      this.wake = undefined;
      wake?.();
    });
  }
}
