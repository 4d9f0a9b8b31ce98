/**
 * Progress for long work (prefetch, export, import). On a terminal: a live line per image with a
 * bar, bytes and layers done. Otherwise: one line per finished layer and per finished image, so
 * CI logs stay readable. Always: a summary at the end.
 */
import { formatBytes } from '../config/units.js';

/**
 * What became of one blob: prefetch `fetched` it from its upstream or found it `cached`; export
 * `exported` it from storage; import `added` it to storage or found it `present` already.
 */
export type BlobOutcome = 'fetched' | 'cached' | 'exported' | 'added' | 'present';

export interface ItemProgress {
  /** Bytes expected in all; 0 when not known (an import, until it is done). */
  total: number;
  done: number;
  layers: number;
  layersDone: number;
  state: 'running' | 'done' | 'failed';
}

export class Progress {
  private readonly items = new Map<string, ItemProgress>();
  private timer: NodeJS.Timeout | undefined;
  private drawnLines = 0;
  private stopped = false;
  private readonly bytesBy = new Map<BlobOutcome, number>();

  constructor(
    private readonly out: NodeJS.WriteStream = process.stderr,
    private readonly live = Boolean(out.isTTY) && process.env.TERM !== 'dumb',
  ) {
    if (this.live) {
      this.timer = setInterval(() => this.draw(), 120);
      this.timer.unref();
    }
  }

  start(name: string): ItemProgress {
    const item: ItemProgress = { total: 0, done: 0, layers: 0, layersDone: 0, state: 'running' };
    this.items.set(name, item);
    return item;
  }

  /** A layer (or other blob) of `name` is complete. */
  layerDone(name: string, digest: string, bytes: number, outcome: BlobOutcome): void {
    const item = this.items.get(name);
    if (item) item.layersDone++;
    this.bytesBy.set(outcome, this.bytes(outcome) + bytes);
    if (!this.live)
      this.line(
        `  ${outcome.padEnd(7)} ${digest.slice(0, 19)}  ${formatBytes(bytes).padStart(10)}  ${name}`,
      );
  }

  /** Bytes of every blob finished with this outcome so far. */
  bytes(outcome: BlobOutcome): number {
    return this.bytesBy.get(outcome) ?? 0;
  }

  /**
   * `name` is complete; or, with `error`, failed, and the line says why (for work that goes on
   * with the next item, like prefetch).
   */
  finish(name: string, error?: unknown): void {
    const item = this.items.get(name);
    if (item) item.state = error ? 'failed' : 'done';
    if (!this.live) {
      this.line(
        error
          ? `FAILED  ${name}: ${(error as Error).message}`
          : `done    ${name}  ${item ? `${item.layersDone} blobs, ${formatBytes(item.done)}` : ''}`,
      );
    }
  }

  /** `name` failed, and the caller reports why (once, as the command's error). */
  failed(name: string): void {
    const item = this.items.get(name);
    if (item) item.state = 'failed';
  }

  /** Plain text above the live lines. */
  line(text: string): void {
    this.clear();
    this.out.write(`${text}\n`);
    if (this.live) this.draw();
  }

  /**
   * Draws the lines a last time and stops redrawing them. Once: what is written below them after
   * (the command's summary) is never cleared by a later call.
   */
  stop(): void {
    if (this.stopped) return;
    this.stopped = true;
    clearInterval(this.timer);
    if (this.live) this.draw();
  }

  private clear(): void {
    if (this.live && this.drawnLines > 0) {
      this.out.write(`\x1b[${this.drawnLines}A\x1b[J`);
      this.drawnLines = 0;
    }
  }

  private draw(): void {
    this.clear();
    const width = 24;
    const lines: string[] = [];
    for (const [name, item] of this.items) {
      const ratio =
        item.total > 0 ? Math.min(1, item.done / item.total) : item.state === 'done' ? 1 : 0;
      const filled = Math.round(ratio * width);
      const mark =
        item.state === 'done'
          ? 'done'
          : item.state === 'failed'
            ? 'FAIL'
            : item.total > 0
              ? `${String(Math.floor(ratio * 100)).padStart(3)}%`
              : ' ...';
      // An import knows no total before its end: the bytes and blobs so far.
      const bytes =
        item.total > 0
          ? `${formatBytes(item.done)} / ${formatBytes(item.total)}`
          : formatBytes(item.done);
      const blobs = item.layers > 0 ? `${item.layersDone}/${item.layers}` : `${item.layersDone}`;
      lines.push(
        `${mark} [${'#'.repeat(filled)}${'-'.repeat(width - filled)}] ${bytes}  ${blobs} blobs  ${name}`,
      );
    }
    if (lines.length > 0) this.out.write(`${lines.join('\n')}\n`);
    this.drawnLines = lines.length;
  }
}
