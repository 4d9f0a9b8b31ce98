/**
 * bin/healthcheck, the image's HEALTHCHECK, run as the image runs it: with the environment and
 * config file that `bin/pullcache serve` gets, against a real pullcache process.
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { freePort, waitFor } from '../helpers/net.js';

interface Outcome {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs bin/healthcheck with only the given variables besides PATH (no stray PULLCACHE_*). */
function healthcheck(env: Record<string, string>): Promise<Outcome> {
  return new Promise((resolve) => {
    execFile(
      'bin/healthcheck',
      { env: { PATH: process.env.PATH ?? '', ...env }, timeout: 10_000 },
      (err, stdout, stderr) =>
        resolve({ code: err ? (typeof err.code === 'number' ? err.code : -1) : 0, stdout, stderr }),
    );
  });
}

describe('bin/healthcheck', () => {
  let dir: string;
  let port: number;
  let env: Record<string, string>;
  let server: ChildProcess | undefined;

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), 'pullcache-health-'));
    port = await freePort();
    const configFile = join(dir, 'config.yaml');
    // As in the image: a wildcard address, on a port that is not the default.
    writeFileSync(
      configFile,
      [
        'server:',
        `  listen: 0.0.0.0:${port}`,
        'storage:',
        '  filesystem:',
        `    root: ${join(dir, 'data')}`,
        'upstreams:',
        '  docker.io:',
        '    url: http://127.0.0.1:9',
        'log:',
        '  level: warn',
        '',
      ].join('\n'),
    );
    env = { PULLCACHE_CONFIG: configFile };
    server = spawn('bin/pullcache', ['serve'], {
      env: { PATH: process.env.PATH ?? '', ...env },
      stdio: 'ignore',
    });
    await waitFor(
      async () => (await fetch(`http://127.0.0.1:${port}/readyz`)).ok,
      `pullcache on port ${port}`,
    );
  });
  afterAll(async () => {
    const s = server;
    if (s && s.exitCode === null && s.signalCode === null) {
      await new Promise((resolve) => {
        s.once('exit', resolve);
        s.kill('SIGTERM');
      });
    }
    rmSync(dir, { recursive: true, force: true });
  });

  test('exits 0 for a ready pullcache on the port and wildcard address of its config file', async () => {
    const outcome = await healthcheck(env);
    expect(outcome).toMatchObject({ code: 0, stderr: '' });
    expect(outcome.stdout.trim()).toBe(`ready: http://127.0.0.1:${port}/readyz`);
  });

  test('follows the environment over the file, and exits 1 where nothing listens', async () => {
    const other = await freePort();
    const outcome = await healthcheck({ ...env, PULLCACHE_SERVER_LISTEN: `0.0.0.0:${other}` });
    expect(outcome.code).toBe(1);
    expect(outcome.stderr.trim()).toBe(`unhealthy: http://127.0.0.1:${other}/readyz: ECONNREFUSED`);
  });

  test('exits 1 naming the key of an invalid config', async () => {
    const outcome = await healthcheck({ ...env, PULLCACHE_SERVER_LISTEN: 'no-port' });
    expect(outcome.code).toBe(1);
    expect(outcome.stderr).toMatch(/^unhealthy: invalid configuration: .*server\.listen/);
  });

  test('exits 1 once the pullcache it checked has stopped', async () => {
    const s = server!;
    await new Promise((resolve) => {
      s.once('exit', resolve);
      s.kill('SIGTERM');
    });
    const outcome = await healthcheck(env);
    expect(outcome.code).toBe(1);
    expect(outcome.stderr.trim()).toBe(`unhealthy: http://127.0.0.1:${port}/readyz: ECONNREFUSED`);
  });
});
