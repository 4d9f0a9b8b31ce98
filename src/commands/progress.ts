/**
 * Progress for long work (prefetch, export, import). On a terminal: a live line per image with a
 * bar, bytes and layers done. Otherwise: one line per finished layer and per finished image, so
 * CI logs stay readable. Always: a summary at the end.
 */
import { formatBytes } from '../config/units.js';

export interface ItemProgress {
  /** Bytes expected in all, when known. */
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
  fetchedBytes = 0;
  cachedBytes = 0;

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
  layerDone(name: string, digest: string, bytes: number, cached: boolean): void {
    const item = this.items.get(name);
    if (item) item.layersDone++;
    if (cached) this.cachedBytes += bytes;
    else this.fetchedBytes += bytes;
    if (!this.live)
      this.line(
        `  ${cached ? 'cached ' : 'fetched'} ${digest.slice(0, 19)}  ${formatBytes(bytes).padStart(10)}  ${name}`,
      );
  }

  finish(name: string, error?: unknown): void {
    const item = this.items.get(name);
    if (item) item.state = error ? 'failed' : 'done';
    if (!this.live) {
      this.line(
        error
          ? `FAILED  ${name}: ${(error as Error).message}`
          : `done    ${name}  ${item ? `${item.layersDone} blobs, ${formatBytes(item.total)}` : ''}`,
      );
    }
  }

  /** Plain text above the live lines. */
  line(text: string): void {
    this.clear();
    this.out.write(`${text}\n`);
    if (this.live) this.draw();
  }

  stop(): void {
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
            : `${String(Math.floor(ratio * 100)).padStart(3)}%`;
      lines.push(
        `${mark} [${'#'.repeat(filled)}${'-'.repeat(width - filled)}] ${formatBytes(item.done)} / ${formatBytes(item.total)}  ${item.layersDone}/${item.layers} blobs  ${name}`,
      );
    }
    if (lines.length > 0) this.out.write(`${lines.join('\n')}\n`);
    this.drawnLines = lines.length;
  }
}
