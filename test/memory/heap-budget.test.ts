import { execFile } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { describe, expect, it } from 'vitest';

const run = promisify(execFile);
const memory = fileURLToPath(new URL('../../src/memory.ts', import.meta.url));

/**
 * In a node of its own with the launcher's flags: fills the old generation with 32 MiB of
 * objects, drops them, idles for half a second, and prints how much heap is still in use past
 * where it started. Idle, V8 itself would not collect for seconds (its memory reducer waits 8 s).
 */
async function garbageLeftAfterIdle(withBudget: boolean): Promise<number> {
  const script = `
    import { getHeapStatistics } from 'node:v8';
    import { keepHeapInBudget } from ${JSON.stringify(memory)};
    const used = () => getHeapStatistics().used_heap_size;
    gc();
    const start = used();
    const stop = ${withBudget} ? keepHeapInBudget({ budget: 4 * 1024 * 1024, everyMs: 50 }) : () => {};
    let held = [];
    while (used() - start < 32 * 1024 * 1024) held.push({ n: held.length, s: 'x'.repeat(64) + held.length });
    held = null;
    await new Promise((r) => setTimeout(r, 500));
    stop();
    process.stdout.write(String((used() - start) / 1024 / 1024));
  `;
  const { stdout } = await run(
    process.execPath,
    [
      '--expose-gc',
      '--max-semi-space-size=1',
      '--import',
      'tsx',
      '--input-type=module',
      '-e',
      script,
    ],
    { timeout: 30_000 },
  );
  return Number(stdout);
}

describe('heap budget', () => {
  it('collects garbage past the budget that V8 would leave in the heap while idle', async () => {
    const [without, withBudget] = await Promise.all([
      garbageLeftAfterIdle(false),
      garbageLeftAfterIdle(true),
    ]);
    expect(without).toBeGreaterThan(16);
    expect(withBudget).toBeLessThan(4);
  });
});
