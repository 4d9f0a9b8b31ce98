/**
 * Spare buffers for the process, by size: the blob paths' big buffers (the receive slabs of an
 * upstream body, the two buffers a blob is sent to a client from) are taken from here and given
 * back when done, so that one blob after another allocates nothing.
 *
 * Why: each such buffer is external memory to V8, freed only when a collection finds its
 * wrapper dead, and src/memory.ts forces a full collection when external memory has grown
 * 16 MiB. 32 clients downloading warm layers took two new 256 KiB buffers per response, which
 * forced a full collection (20-36 ms of pause) every 2-3 s, and a manifest request that met one
 * waited for it (bench/fleet.ts, the manifest p99).
 *
 * Only a buffer nothing else holds may be given back: a socket write still under way, or a view
 * handed to a consumer, keeps it out (the callers say when that is).
 */
export class SparePool {
  private readonly bySize = new Map<number, Buffer[]>();
  private bytes = 0;

  constructor(private readonly maxBytes: number) {}

  /** A buffer of `size` bytes, spare or new; its contents are whatever they were. */
  take(size: number): Buffer {
    const spare = this.bySize.get(size)?.pop();
    if (!spare) return Buffer.allocUnsafeSlow(size);
    this.bytes -= size;
    return spare;
  }

  /** `buffer` is free for the next `take` of its size; dropped when the pool is full. */
  give(buffer: Buffer): void {
    if (this.bytes + buffer.length > this.maxBytes) return;
    const list = this.bySize.get(buffer.length) ?? [];
    list.push(buffer);
    this.bySize.set(buffer.length, list);
    this.bytes += buffer.length;
  }
}

/**
 * The process's spare buffers: at most 16 MiB held (what 32 clients' send buffers or a couple of
 * fetches' receive slabs take), so that a burst leaves no more than that resident.
 */
export const spareBuffers = new SparePool(16 * 1024 * 1024);
