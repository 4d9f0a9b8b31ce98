/**
 * Blob bodies from the upstream come as one new 64 KiB buffer per socket read. V8 frees such
 * buffers only when it collects their (small) wrappers, and it counts their bytes toward a
 * collection only every 64 MB or so: left alone, each cold blob keeps up to 64 MB of dead
 * buffers in the process. A minor collection (a scavenge of the young generation, well under a
 * millisecond with the launcher's 1 MiB semi-space) every few MiB received frees them as they
 * die. Needs `--expose-gc` (bin/pullcache passes it); without it this does nothing.
 */
const gc = (globalThis as { gc?: (options?: { type: 'minor' | 'major' }) => void }).gc;

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
