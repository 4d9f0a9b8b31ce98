/**
 * When the budget starts an eviction, with an evictor that only counts what it is asked for (the
 * evictions themselves, on real storage, are in budget.test.ts and disk-full.test.ts): a disk
 * that fills up while an eviction runs gets one of its own at once, not at the next trigger.
 */
import { expect, test } from 'vitest';
import { silentLogger } from '../../src/log/logger.js';
import { deferred } from '../../src/proxy/deferred.js';
import { Budget } from '../../src/lifecycle/budget.js';
import type { Evictor } from '../../src/lifecycle/eviction.js';
import type { ImageGraph } from '../../src/lifecycle/image-graph.js';
import type { RemovalReport } from '../../src/lifecycle/types.js';
import type { StorageDriver } from '../../src/storage/types.js';

test('a disk that fills up during an eviction is evicted for right after it', async () => {
  const asked: number[] = [];
  const running: ReturnType<typeof deferred<RemovalReport>>[] = [];
  const evictor = {
    evict: (_reason: string, need: number) => {
      asked.push(need);
      running.push(deferred<RemovalReport>());
      return running.at(-1)!.promise;
    },
  } as unknown as Evictor;
  const budget = new Budget({
    // No size limit and no minFree: only the disk's own ENOSPC asks for room.
    retention: { maxSize: 0, minFree: 0, lowWater: 0.8, unusedFor: 0, sweepInterval: 0 },
    driver: { space: async () => ({ free: 0, size: 1 }) } as unknown as StorageDriver,
    graph: () => ({ bytes: 0 }) as ImageGraph,
    ready: () => true,
    isOwner: () => true,
    serially: (work) => work(),
    evictor,
    log: silentLogger(),
    warn: (err) => {
      throw err;
    },
    now: Date.now,
  });
  const until = async (done: () => boolean) => {
    while (!done()) await new Promise((r) => setImmediate(r));
  };
  budget.diskFull(1000);
  await until(() => asked.length === 1);
  budget.diskFull(5000); // while the first eviction runs
  running[0]!.resolve({ dryRun: false, removed: [], bytes: 0, problems: [] });
  await until(() => asked.length === 2);
  expect(asked).toEqual([1000, 5000]);
  running[1]!.resolve({ dryRun: false, removed: [], bytes: 0, problems: [] });
  await budget.close();
});
