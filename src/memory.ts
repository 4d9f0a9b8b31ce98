import { getHeapStatistics } from 'node:v8';

/**
 * Blob bodies from the upstream come as one new 64 KiB buffer per socket read. V8 frees such
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

/** Counts bytes that became garbage-to-be; collects the young generation every EVERY of them. */
export function churned(bytes: number): void {
  if (!gc) return;
  received += bytes;
  if (received < EVERY) return;
  received = 0;
  gc({ type: 'minor' });
}

/**
 * Under a burst of small requests (30,000 manifests a second) the objects of requests in flight
 * outlive the 1 MiB new space and are promoted, and V8 lets the old generation grow to about
 * four times its live size before it marks: ~45 MB of garbage in a process whose live heap is
 * ~19 MB. V8's own growing factor can be lowered (--heap-growing-percent), but that also lowers
 * the headroom the blob path's external buffers count against and costs the cold path a fifth
 * of its speed. Instead, a timer looks at the heap twice a second and collects it when it has
 * grown more than HEAP_BUDGET past what the last collection left: about one full collection
 * every few seconds under such a burst, none while idle or streaming blobs.
 */
const HEAP_BUDGET = 16 * 1024 * 1024;
const HEAP_CHECK_MS = 500;

/**
 * Starts the heap budget's timer; returns its stop. Does nothing without `--expose-gc`.
 * (A full collection of pullcache's ~20 MB heap takes a few milliseconds.)
 */
export function keepHeapInBudget({
  budget = HEAP_BUDGET,
  everyMs = HEAP_CHECK_MS,
}: { budget?: number; everyMs?: number } = {}): () => void {
  if (!gc) return () => {};
  const collect = gc;
  // What the heap came down to after the last collection, V8's own or ours.
  let floor = getHeapStatistics().used_heap_size;
  const timer = setInterval(() => {
    const used = getHeapStatistics().used_heap_size;
    if (used - floor <= budget) {
      floor = Math.min(floor, used);
      return;
    }
    collect();
    floor = getHeapStatistics().used_heap_size;
  }, everyMs);
  timer.unref();
  return () => clearInterval(timer);
}
