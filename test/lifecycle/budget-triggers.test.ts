/**
 * When the budget starts an eviction, with an evictor that only counts what it is asked for (the
 * evictions themselves, on real storage, are in budget.test.ts and disk-full.test.ts): a disk
 * that fills up while an eviction runs gets one of its own at once, not at the next trigger; a
 * process that does not own the storage does not spin on it; none starts after close.
 */
import { expect, test } from 'vitest';
import { silentLogger } from '../../src/log/logger.js';
import { deferred } from '../../src/proxy/deferred.js';
import { Budget } from '../../src/lifecycle/budget.js';
import type { Evictor } from '../../src/lifecycle/eviction.js';
import type { ImageGraph } from '../../src/lifecycle/image-graph.js';
import type { RemovalReport } from '../../src/lifecycle/types.js';
import type { StorageDriver } from '../../src/storage/types.js';

const NOTHING: RemovalReport = { dryRun: false, removed: [], bytes: 0, problems: [] };

/** A budget with no size limit and no minFree (only ENOSPC asks for room), and its evictor. */
function budgetWith(isOwner: () => boolean, maxSize = 0, onFull?: (bytes: number) => void) {
  const asked: number[] = [];
  const running: ReturnType<typeof deferred<RemovalReport>>[] = [];
  let rounds = 0;
  const evictor = {
    evict: (_reason: string, need: number) => {
      asked.push(need);
      running.push(deferred<RemovalReport>());
      return running.at(-1)!.promise;
    },
  } as unknown as Evictor;
  const budget = new Budget({
    retention: { maxSize, minFree: 0, lowWater: 1, unusedFor: 0, sweepInterval: 0 },
    driver: { space: async () => ({ free: 0, size: 1 }) } as unknown as StorageDriver,
    graph: () => ({ bytes: 0 }) as ImageGraph,
    ready: () => true,
    isOwner,
    serially: (work) => {
      rounds++;
      return work();
    },
    evictor,
    log: silentLogger(),
    warn: (err) => {
      throw err;
    },
    now: Date.now,
    onFull,
  });
  return { budget, asked, running, rounds: () => rounds };
}

const turns = async (n: number) => {
  for (let i = 0; i < n; i++) await new Promise((r) => setImmediate(r));
};
const until = async (done: () => boolean) => {
  while (!done()) await turns(1);
};

test('a disk that fills up during an eviction is evicted for right after it', async () => {
  const { budget, asked, running } = budgetWith(() => true);
  budget.diskFull(1000);
  await until(() => asked.length === 1);
  budget.diskFull(5000); // while the first eviction runs
  running[0]!.resolve(NOTHING);
  await until(() => asked.length === 2);
  expect(asked).toEqual([1000, 5000]);
  running[1]!.resolve(NOTHING);
  await budget.close();
});

test('a process that does not own the storage tries once per disk-full, and does not spin', async () => {
  const { budget, asked, rounds } = budgetWith(() => false);
  budget.diskFull(1000);
  await turns(50);
  expect(rounds()).toBe(1);
  expect(asked).toEqual([]);
  await budget.close();
});

test('no eviction starts after close, even for a disk that filled up during the last', async () => {
  const { budget, asked, running, rounds } = budgetWith(() => true);
  budget.diskFull(1000);
  await until(() => asked.length === 1);
  budget.diskFull(5000);
  const closed = budget.close();
  running[0]!.resolve(NOTHING);
  await closed;
  budget.diskFull(7000);
  await turns(20);
  expect(rounds()).toBe(1);
  expect(asked).toEqual([1000]);
});

test('a blob reserved while an eviction runs is measured again once it ends, even if it freed nothing', async () => {
  const { budget, asked, running } = budgetWith(() => true, 1000);
  const first = budget.reserve(1500); // over the budget: an eviction
  await until(() => asked.length === 1);
  expect(asked).toEqual([500]);
  const second = budget.reserve(700); // while it runs
  running[0]!.resolve(NOTHING);
  await until(() => asked.length === 2);
  expect(asked).toEqual([500, 1200]);
  running[1]!.resolve(NOTHING);
  first();
  second();
  await budget.close();
});

test('a process that does not own the storage tells the owner once a second, the most it was asked for', async () => {
  const told: number[] = [];
  const { budget } = budgetWith(
    () => false,
    0,
    (bytes) => told.push(bytes),
  );
  budget.diskFull(1000);
  expect(told).toEqual([1000]); // at once
  budget.diskFull(3000); // within the second: held, the largest kept
  budget.diskFull(2000);
  expect(told).toEqual([1000]);
  await until(() => told.length === 2);
  expect(told).toEqual([1000, 3000]);
  budget.diskFull(500);
  await budget.close(); // nothing told after close
  await new Promise((r) => setTimeout(r, 1100));
  expect(told).toEqual([1000, 3000]);
});
