/**
 * Last-pulled times in storage (a file's modification time, see paths.ts) only move forward.
 *
 * Why: every process of a fleet writes the pulls it served every few seconds (lifecycle/pulls.ts),
 * and two of them may have served the same image: the one that writes last must not put back an
 * older time over a later one, or the image looks unused for longer than it is and an eviction
 * may pick it. (A stat then a write is not atomic: two writes within the same moment can still
 * cross, which costs at most one flush interval of recency.)
 */
import type { StorageDriver } from './types.js';
import { PathNotFoundError } from './errors.js';

/** Records a pull at `at` unless a later one is recorded already; nothing when `path` is gone. */
export async function recordPull(driver: StorageDriver, path: string, at: number): Promise<void> {
  const recorded = await driver.stat(path);
  if (!recorded || recorded.modTime.getTime() >= at) return;
  await driver.touch(path, new Date(at)).catch((err: unknown) => {
    if (!(err instanceof PathNotFoundError)) throw err;
  });
}
