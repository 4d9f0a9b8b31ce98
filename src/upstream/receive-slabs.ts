import { spareBuffers } from '../buffer-pool.js';

/**
 * The buffers a blob body is received into: socket reads go straight into 1 MiB slabs, and the
 * body's chunks are views of them, lent to the consumer. A slab the consumer has released every
 * view of (the fetch, once the bytes are written) is read into again.
 *
 * Why: node otherwise allocates a new 64 KiB buffer for every socket read, and a cold GiB then
 * costs 16,384 allocations and the collections that free them: in plain scripts, receiving,
 * hashing and writing a GiB took 4.5-4.9 CPU-s through undici and 2.3 into reused slabs
 * (docs/benchmark.md).
 *
 * A view that is never released only keeps its slab from being reused: when no slab is free the
 * pool makes a new one, so a consumer that knows nothing of `release` gets fresh memory, never
 * bytes overwritten under it. Released slabs go to the process's spare buffers (buffer-pool.ts),
 * so that the next blob reads into them too: one fetch after another makes no garbage at all,
 * where slabs of a pool per fetch waited for a full collection (a run of `bench/cold.ts` peaked
 * 27 MB higher on its third blob).
 */
const SLAB = 1024 * 1024;
/** A read into less than this is not worth a read: the rest of the slab is left unused. */
const MIN_READ = 64 * 1024;

export class ReceiveSlabs {
  /** Views lent out per slab; the slab being read into counts one more. */
  private readonly lent = new Map<ArrayBufferLike, number>();
  private slab: Buffer | undefined;
  private fill = 0;
  /** Slabs read into (each time one is taken), for tests and diagnosis. */
  taken = 0;

  /** Where the next socket read goes. */
  space(): Buffer {
    if (!this.slab || this.slab.length - this.fill < MIN_READ) this.next();
    return this.slab!.subarray(this.fill);
  }

  /** The last `space()` received `n` bytes. */
  filled(n: number): void {
    this.fill += n;
  }

  /** `view` (of the space last filled) goes to the consumer, who releases it when done. */
  lend(view: Buffer): Buffer {
    const slab = view.buffer;
    const count = this.lent.get(slab);
    if (count !== undefined) this.lent.set(slab, count + 1);
    return view;
  }

  /** Slabs not yet back in the spare buffers (lent, or being read into). */
  get outstanding(): number {
    return this.lent.size;
  }

  /** True when `view` is lent by this pool and not yet released. */
  lends(view: Uint8Array): boolean {
    return this.lent.has(view.buffer);
  }

  /** The consumer is done with `view`; views not from this pool are ignored. */
  release(view: Uint8Array): void {
    const slab = view.buffer;
    const count = this.lent.get(slab);
    if (count === undefined) return;
    if (count > 1) this.lent.set(slab, count - 1);
    else this.retire(slab);
  }

  /**
   * The reader is done (the body has ended): the slab it was reading into goes back to the
   * spare buffers once the consumer has released its views. A later `space()` takes another.
   */
  done(): void {
    if (this.slab) this.release(this.slab);
    this.slab = undefined;
    this.fill = 0;
  }

  private next(): void {
    if (this.slab) this.release(this.slab); // the reader's own count
    this.slab = spareBuffers.take(SLAB);
    this.taken++;
    this.fill = 0;
    this.lent.set(this.slab.buffer, 1);
  }

  private retire(slab: ArrayBufferLike): void {
    this.lent.delete(slab);
    spareBuffers.give(Buffer.from(slab as ArrayBuffer, 0, SLAB));
  }
}
