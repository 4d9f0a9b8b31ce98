import { getHeapStatistics } from 'node:v8';

/**
 * Needs `--expose-gc` (bin/pullcache passes it); without it this does nothing. (Blob bodies, from
 * the upstream and from a peer, are received into reused slabs, upstream/receive-slabs.ts, and
 * make no garbage: the minor collection every 8 MiB of a blob that freed their per-read buffers
 * is gone with them.)
 */
const gc = (globalThis as { gc?: () => void }).gc;

/**
 * V8 decides when to mark the old generation from its growth, and it counts external memory
 * (the blob path's buffers) against that growth. Two ways this goes wrong for pullcache:
 * - Streaming a cold blob, the buffers in flight use up the few MB of headroom V8 gives a small
 *   heap, and it marked about 150 times per 1.5 GiB, one every 40 ms (1-1.7 CPU-s per 512 MiB
 *   on its marking threads, and more on the main one).
 * - Under a burst of small requests (30,000 manifests a second), the objects of requests in
 *   flight outlive the 1 MiB new space and are promoted, and V8 lets the old generation grow to
 *   about four times its live size before it marks: ~45 MB of garbage around ~19 MB of live heap.
 * So the launcher gives the old generation a 64 MB start (--initial-old-space-size=64: V8 then
 * leaves the cold path alone), and pullcache keeps the budget itself: when the heap has grown
 * more than HEAP_BUDGET, or its external memory more than EXTERNAL_BUDGET, past what the last
 * full collection left, it runs one (a pause of 5-30 ms). It looks on a timer twice a second:
 * one full collection every second or two under a burst of requests, none while idle. Without
 * it the largest process of the 32-client load peaked at 177 MB against 141 (docs/memory.md).
 * (Lowering V8's growing factor instead, --heap-growing-percent=50, shrank the headroom further
 * and cost the cold path a fifth of its speed.)
 */
const HEAP_BUDGET = 8 * 1024 * 1024;
const EXTERNAL_BUDGET = 16 * 1024 * 1024;
const HEAP_CHECK_MS = 500;
let heapBudget = Infinity;
let externalBudget = Infinity;
/** What the last full collection left (or less, when V8 collected by itself since). */
let floor = { heap: 0, external: 0 };

/**
 * The heap in use, and the bytes of live ArrayBuffers (node's count, which a collection lowers at
 * once; V8's `external_memory` learns of freed buffers only at the collection after).
 */
function inUse(): { heap: number; external: number } {
  return { heap: getHeapStatistics().used_heap_size, external: process.memoryUsage().arrayBuffers };
}

function checkBudget(): void {
  const now = inUse();
  if (now.heap - floor.heap <= heapBudget && now.external - floor.external <= externalBudget) {
    floor = {
      heap: Math.min(floor.heap, now.heap),
      external: Math.min(floor.external, now.external),
    };
    return;
  }
  gc!();
  floor = inUse();
}

/**
 * Starts keeping the heap budget; returns its stop. Does nothing without `--expose-gc`. The
 * budget is the process's: one server per process keeps it.
 */
export function keepHeapInBudget({
  heap = HEAP_BUDGET,
  external = EXTERNAL_BUDGET,
  everyMs = HEAP_CHECK_MS,
}: { heap?: number; external?: number; everyMs?: number } = {}): () => void {
  if (!gc) return () => {};
  heapBudget = heap;
  externalBudget = external;
  floor = inUse();
  const timer = setInterval(checkBudget, everyMs);
  timer.unref();
  return () => {
    clearInterval(timer);
    heapBudget = externalBudget = Infinity;
  };
}
