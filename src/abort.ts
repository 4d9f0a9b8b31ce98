/**
 * Waiting for a promise or an abort, whichever comes first, without `Promise.race`.
 *
 * `Promise.race([p, failed])`, where `failed` is a promise that stays pending for as long as
 * the failure can come, adds a reaction to `failed` on every call, and the reaction is kept
 * until `failed` settles: about 310 bytes per race (300,000 races kept 93 MB in a plain
 * script). A blob sent in 256 KiB turns raced once per turn, so each of 32 clients downloading
 * a 392 MiB image kept about 500 KB until its response ended; promoted to the old generation,
 * that forced a full collection every 2-3 s under the load (bench/fleet.ts).
 */

/**
 * `promise`, or the signal's reason if it aborts first; nothing is left behind on `signal`.
 * `promise` is observed either way: its own failure after the abort is not an unhandled
 * rejection (the bundle export's next entry fails once its output has).
 */
export function unlessAborted<T>(promise: Promise<T>, signal: AbortSignal): Promise<T> {
  if (signal.aborted) {
    promise.catch(() => {});
    return Promise.reject(signal.reason as Error);
  }
  return new Promise<T>((resolve, reject) => {
    const onAbort = () => reject(signal.reason as Error);
    signal.addEventListener('abort', onAbort, { once: true });
    promise.then(
      (value) => {
        signal.removeEventListener('abort', onAbort);
        resolve(value);
      },
      (err: unknown) => {
        signal.removeEventListener('abort', onAbort);
        reject(err as Error);
      },
    );
  });
}

/** What `within` rejects with when the time is up. */
export class TimedOutError extends Error {}

/**
 * `promise`, unless `ms` pass first: then a TimedOutError with `message` (and `promise` is still
 * observed, as by `unlessAborted`). The timer goes as soon as `promise` settles: the metadata
 * cache waits this way on every Redis command, and a timer kept for the full `ms` after each
 * (AbortSignal.timeout's, which cannot be cleared) would keep thousands alive under load. It
 * does not keep the process alive either.
 *
 * When the time is up, an answer read from a socket in the same turn of the event loop still
 * counts: a process that could not run for `ms` (a long pause, a starved CPU) runs its expired
 * timers before it reads what arrived meanwhile, and would otherwise take an answer that came
 * in time for none (for Redis: the connection dropped and not asked for seconds).
 */
export function within<T>(promise: Promise<T>, ms: number, message: string): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    // The check phase comes after this turn's poll phase, where what arrived is read.
    const timer = setTimeout(() => setImmediate(() => reject(new TimedOutError(message))), ms);
    timer.unref();
    promise.then(
      (value) => {
        clearTimeout(timer);
        resolve(value);
      },
      (err: unknown) => {
        clearTimeout(timer);
        reject(err as Error);
      },
    );
  });
}
