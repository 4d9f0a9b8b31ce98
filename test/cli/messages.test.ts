/**
 * What the commands say, as a newcomer reads it: unpin says what it did as pin does, a count of
 * one is singular, every help lists the command's own options before the common ones, and
 * `serve` logs its drain time as the config gives it and a last line once it has stopped.
 */
import { rmSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { cli, configFile, tmp } from '../helpers/cli.js';
import { makeImage, pushImage, type Image } from '../helpers/images.js';
import { TestRegistry } from '../helpers/registry.js';
import { startWorkers } from '../helpers/workers.js';

let registry: TestRegistry;
let a: Image;
/** The same manifest and blobs as `a`, in another repository: removing it frees no blob. */
let twin: Image;

beforeAll(async () => {
  registry = await TestRegistry.start();
  a = makeImage('org/a', 'v1', 'oci', [20_000]);
  twin = { ...a, repository: 'org/twin' };
  for (const image of [a, twin]) await pushImage(registry, image);
});
afterAll(async () => {
  await registry?.close();
});

describe('the cache commands', () => {
  let root: string;
  let config: string;
  beforeAll(async () => {
    root = tmp('root');
    config = configFile(root, { 'docker.io': { url: registry.url } });
    const r = await cli('prefetch', '-c', config, 'org/a:v1', 'org/twin:v1');
    expect(r.code, r.stderr).toBe(0);
  });
  afterAll(() => rmSync(root, { recursive: true, force: true }));

  test('unpin says what it unpinned, as pin says what is pinned', async () => {
    const pin = await cli('pin', '-c', config, 'org/a:v1');
    expect(pin.stdout.toString()).toBe('pinned: org/a:v1\n');
    const unpin = await cli('unpin', '-c', config, 'org/a:v1', 'org/a:v1');
    expect(unpin.stderr).toBe('');
    expect(unpin.code).toBe(0);
    expect(unpin.stdout.toString()).toBe('unpinned: org/a:v1\n');
    // Nothing unpinned: nothing on stdout, the reason on stderr.
    const again = await cli('unpin', '-c', config, 'org/a:v1');
    expect(again.code).toBe(1);
    expect(again.stdout.toString()).toBe('');
    expect(again.stderr).toBe('pullcache: org/a:v1 was not pinned with pullcache pin\n');
  });

  test('rm --dry-run counts one entry in the singular', async () => {
    const dry = await cli('rm', '-c', config, '--dry-run', 'org/twin:v1');
    expect(dry.code, dry.stderr).toBe(0);
    expect(dry.stdout.toString()).toMatch(/^rm: would remove 1 entry, \d/m);
    const both = await cli('rm', '-c', config, '--dry-run', 'org/twin:v1', 'org/a:v1');
    expect(both.code, both.stderr).toBe(0);
    expect(both.stdout.toString()).toMatch(/^rm: would remove \d+ entries, \d/m);
  });
});

test("every command's help lists its own options before the common ones", async () => {
  const commands = ['serve', 'config', 'prefetch', 'export', 'import'];
  commands.push('ls', 'du', 'pin', 'unpin', 'rm', 'gc', 'status');
  // Each its own process: all at once.
  const helps = await Promise.all(commands.map((command) => cli(command, '--help')));
  helps.forEach((r, i) => {
    const help = r.stdout.toString();
    const own = help.indexOf('\nOptions:\n');
    expect(own, commands[i]).toBeGreaterThan(0);
    expect(own, commands[i]).toBeLessThan(help.indexOf('\nCommon options:\n'));
  });
});

describe('serve', () => {
  test('logs the drain time as the config gives it, and a last line once stopped', async () => {
    for (const workers of [1, 2]) {
      const pc = await startWorkers({ upstream: registry.url, workers });
      try {
        pc.primary.kill('SIGTERM');
        expect(await pc.exited(), String(workers)).toBe(0);
        const shutting = pc.lines.filter((l) => l.msg === 'shutting down');
        expect(shutting.length, String(workers)).toBe(workers);
        for (const line of shutting) expect(line.drainTimeout).toBe('20s');
        // The last line: the process (the primary, with workers) has stopped.
        const last = pc.lines.at(-1)!;
        expect(last, String(workers)).toMatchObject({ level: 30, msg: 'stopped' });
        expect(last.worker).toBeUndefined();
      } finally {
        await pc.stop();
      }
    }
  });
});
