/**
 * What start-up checks before it listens: storage that takes a write (else exit 2 naming
 * storage.filesystem.root, its path and the reason, on one line), and the cache (a Redis that
 * does not answer is one warning, not a failure). Tests run as root, which ignores mode bits, so
 * "not writable" is a read-only tmpfs.
 */
import { execFile } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { ConfigError } from '../../src/config/load.js';
import { capturedLog, startPullcache } from '../helpers/pullcache.js';

const run = promisify(execFile);
const tmp = () => mkdtempSync(join(tmpdir(), 'pullcache-startup-'));

/** `pullcache serve` on a free port with this storage root; it is expected to stop. */
async function serve(root: string): Promise<{ code: number; stderr: string }> {
  try {
    const { stderr } = await run(
      'npx',
      ['tsx', 'src/cli.ts', 'serve', '--listen', '127.0.0.1:0', '--storage-root', root],
      { timeout: 30_000 },
    );
    return { code: 0, stderr };
  } catch (err) {
    const e = err as { code: number; stderr: string };
    return { code: e.code, stderr: e.stderr };
  }
}

function expectOneLine(stderr: string, line: string): void {
  expect(stderr).toBe(`pullcache: cannot start: ${line}\n`);
}

async function startProblems(root: string): Promise<string[]> {
  const err = await startPullcache({}, root).then(
    async (pc) => {
      await pc.stop();
      throw new Error('started');
    },
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(ConfigError);
  return (err as ConfigError).problems;
}

describe('storage at start-up', () => {
  let readOnly: string;

  beforeAll(async () => {
    readOnly = tmp();
    await run('mount', ['-t', 'tmpfs', '-o', 'ro,size=1m', 'pullcache-test', readOnly]);
  });
  afterAll(async () => {
    await run('umount', [readOnly]);
    rmSync(readOnly, { recursive: true, force: true });
  });

  test('a storage root that is a file stops start-up with exit 2, its path and the reason', async () => {
    const file = join(tmp(), 'data');
    writeFileSync(file, 'not a directory');
    const { code, stderr } = await serve(file);
    expect(code).toBe(2);
    expectOneLine(
      stderr,
      `storage.filesystem.root: cannot use "${file}": it is a file, not a directory`,
    );
  });

  test('a storage root on a read-only file system stops start-up with exit 2', async () => {
    const { code, stderr } = await serve(join(readOnly, 'data'));
    expect(code).toBe(2);
    expectOneLine(
      stderr,
      `storage.filesystem.root: cannot use "${join(readOnly, 'data')}": read-only file system (EROFS)`,
    );
    expect(await startProblems(readOnly)).toEqual([
      `storage.filesystem.root: cannot use "${readOnly}": read-only file system (EROFS)`,
    ]);
  });

  test('a storage root under a file is refused naming why', async () => {
    const file = join(tmp(), 'file');
    writeFileSync(file, '');
    expect(await startProblems(join(file, 'data'))).toEqual([
      `storage.filesystem.root: cannot use "${join(file, 'data')}": part of the path is a file, not a directory (ENOTDIR)`,
    ]);
  });

  test('a missing storage root is made, and start-up goes on', async () => {
    const parent = tmp();
    const root = join(parent, 'a', 'b');
    const pc = await startPullcache({}, root);
    try {
      expect(statSync(root).isDirectory()).toBe(true);
      expect((await fetch(`${pc.url}/readyz`)).status).toBe(200);
    } finally {
      await pc.stop();
      rmSync(parent, { recursive: true, force: true });
    }
  });
});

describe('cache at start-up', () => {
  test('an unreachable Redis is one warning naming its URL without the password, not a failure', async () => {
    const { log, lines } = capturedLog('info');
    const pc = await startPullcache(
      { cache: { store: 'redis', redis: { url: 'redis://:s3cret@127.0.0.1:1' } } },
      undefined,
      { log },
    );
    try {
      const listening = lines.findIndex((l) => l.msg === 'pullcache listening');
      expect(listening).toBeGreaterThan(-1);
      const warnings = lines.slice(0, listening).filter((l) => (l.level as number) >= 40);
      expect(warnings).toEqual([
        expect.objectContaining({
          level: 40,
          cache: 'redis',
          url: 'redis://[redacted]@127.0.0.1:1',
          msg: 'metadata cache unreachable; serving from storage until it answers',
        }),
      ]);
      expect(warnings[0]!.reason).toMatch(/timed out|ECONNREFUSED/);
      expect(JSON.stringify(lines)).not.toContain('s3cret');
      expect(existsSync(pc.root)).toBe(true);
    } finally {
      await pc.stop();
    }
  });
});
