import { getHeapStatistics } from 'node:v8';

/**
 * Blob bodies from the upstream are received into reused slabs (upstream/receive-slabs.ts) and
 * make no garbage. A peer's (fleet/peers.ts, on undici) come as one new 64 KiB buffer per
 * socket read, and so did the upstream's before the slabs. V8 frees such
 * buffers only when it collects their (small) wrappers, and it counts their bytes toward a
 * collection only every 64 MB or so: left alone, each cold blob keeps up to 64 MB of dead
 * buffers in the process. A minor collection (a scavenge of the young generation, well under a
 * millisecond with the launcher's 1 MiB semi-space) every few MiB received frees them as they
 * die. Needs `--expose-gc` (bin/pullcache passes it); without it this does nothing.
 */
// (Node 20's V8 takes `{ type: 'minor' }`; any other argument is also a minor collection, and a
// full one is `gc()` without arguments.)
const gc = (globalThis as { gc?: (options?: { type: 'minor' }) => void }).gc;

/** Bytes received between two collections. */
const EVERY = 8 * 1024 * 1024;
let received = 0;

/**
 * Counts bytes that became garbage-to-be; collects the young generation every EVERY of them,
 * then looks at the heap budget (below).
 */
export function churned(bytes: number): void {
  if (!gc) return;
  received += bytes;
  if (received < EVERY) return;
  received = 0;
  gc({ type: 'minor' });
  checkBudget();
}

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
 * full collection left, it runs one (a pause of 5-30 ms). It looks after each minor collection
 * of a streaming blob and on a timer twice a second: about 10 full collections per 512 MiB of
 * cold blob, one every second or two under a burst of requests, none while idle. (Lowering
 * V8's growing factor instead, --heap-growing-percent=50, shrank the headroom further and cost
 * the cold path a fifth of its speed.)
 */
const HEAP_BUDGET = 8 * 1024 * 1024;
const EXTERNAL_BUDGET = 16 * 1024 * 1024;
const HEAP_CHECK_MS = 500;
let heapBudget = Infinity;
let externalBudget = Infinity;
/** What the last full collection left (or less, when V8 collected by itself since). */
let floor = { heap: 0, external: 0 };

function inUse(): { heap: number; external: number } {
  const stats = getHeapStatistics();
  return { heap: stats.used_heap_size, external: stats.external_memory };
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
