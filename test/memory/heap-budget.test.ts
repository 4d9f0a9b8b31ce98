import { execFile } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { describe, expect, it } from 'vitest';

const run = promisify(execFile);
const memory = fileURLToPath(new URL('../../src/memory.ts', import.meta.url));

/**
 * In a node of its own with the launcher's flags: fills the heap with 32 MiB of objects (or of
 * 64 KiB buffers, external memory), drops them, idles for half a second, and prints how much of
 * the heap and of live ArrayBuffers is still in use past where it started. Idle, V8 itself would
 * not collect for seconds (its memory reducer waits 8 s). `how` picks who may collect: nobody, or
 * the budget's timer.
 */
async function garbageLeft(what: 'objects' | 'buffers', how: 'none' | 'timer'): Promise<number> {
  const script = `
    import { getHeapStatistics } from 'node:v8';
    import { keepHeapInBudget } from ${JSON.stringify(memory)};
    const inUse = () => getHeapStatistics().used_heap_size + process.memoryUsage().arrayBuffers;
    gc();
    const start = inUse();
    const stop = ${JSON.stringify(how)} === 'none' ? () => {} : keepHeapInBudget({
      heap: 4 * 1024 * 1024,
      external: 4 * 1024 * 1024,
      everyMs: 50,
    });
    let held = [];
    while (inUse() - start < 32 * 1024 * 1024)
      held.push(${JSON.stringify(what)} === 'objects' ? { n: held.length, s: 'x'.repeat(64) + held.length } : Buffer.alloc(65536, held.length));
    held = null;
    await new Promise((r) => setTimeout(r, 500));
    stop();
    process.stdout.write(String((inUse() - start) / 1024 / 1024));
  `;
  const { stdout } = await run(
    process.execPath,
    [
      '--expose-gc',
      '--max-semi-space-size=1',
      '--initial-old-space-size=64',
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
    const [none, timer] = await Promise.all([
      garbageLeft('objects', 'none'),
      garbageLeft('objects', 'timer'),
    ]);
    expect(none).toBeGreaterThan(16);
    expect(timer).toBeLessThan(4);
  });

  it('counts dead buffers (external memory) too', async () => {
    const [none, timer] = await Promise.all([
      garbageLeft('buffers', 'none'),
      garbageLeft('buffers', 'timer'),
    ]);
    expect(none).toBeGreaterThan(16);
    expect(timer).toBeLessThan(4);
  });
});
