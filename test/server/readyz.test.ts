/**
 * /readyz reports each component: storage is required (503 when it takes no write), the cache is
 * not (200, listed as degraded). Real parts: a real redis-server stopped under the server, a
 * tmpfs remounted read-only under it.
 */
import { execFile } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { expect, test } from 'vitest';
import { startPullcache } from '../helpers/pullcache.js';
import { startRedis } from '../helpers/redis.js';

const run = promisify(execFile);

async function readyz(url: string): Promise<{ status: number; body: unknown }> {
  const res = await fetch(`${url}/readyz`);
  return { status: res.status, body: await res.json() };
}

const allReady = {
  status: 'ready',
  failed: [],
  degraded: [],
  checks: { storage: { status: 'ok' }, cache: { status: 'ok' } },
};
const cacheDegraded = {
  status: 'ready',
  failed: [],
  degraded: ['cache: redis unreachable'],
  checks: { storage: { status: 'ok' }, cache: { status: 'degraded', detail: 'redis unreachable' } },
};

test('/readyz with an unreachable Redis is ready, names the cache as degraded, and answers within a probe timeout', async () => {
  const pc = await startPullcache({
    cache: { store: 'redis', redis: { url: 'redis://:s3cret@127.0.0.1:1' } },
  });
  try {
    const started = Date.now();
    expect(await readyz(pc.url)).toEqual({ status: 200, body: cacheDegraded });
    // Kubernetes' default probe timeout is 1 s.
    expect(Date.now() - started).toBeLessThan(800);
  } finally {
    await pc.stop();
  }
});

test('/readyz follows a real Redis: ready while it answers, degraded once it is gone', async () => {
  const redis = await startRedis();
  const pc = await startPullcache({ cache: { store: 'redis', redis: { url: redis.url } } });
  try {
    expect(await readyz(pc.url)).toEqual({ status: 200, body: allReady });
    await redis.stop();
    expect(await readyz(pc.url)).toEqual({ status: 200, body: cacheDegraded });
  } finally {
    await pc.stop();
    await redis.stop();
  }
});

test('/readyz is 503 naming storage once storage takes no write', async () => {
  const root = mkdtempSync(join(tmpdir(), 'pullcache-readyz-'));
  await run('mount', ['-t', 'tmpfs', '-o', 'size=1m', 'pullcache-test', root]);
  try {
    const pc = await startPullcache({}, root);
    try {
      expect(await readyz(pc.url)).toEqual({ status: 200, body: allReady });
      await run('mount', ['-o', 'remount,ro', root]);
      expect(await readyz(pc.url)).toEqual({
        status: 503,
        body: {
          status: 'not ready',
          failed: ['storage: read-only file system (EROFS)'],
          degraded: [],
          checks: {
            storage: { status: 'failed', detail: 'read-only file system (EROFS)' },
            cache: { status: 'ok' },
          },
        },
      });
    } finally {
      await pc.stop();
    }
  } finally {
    await run('umount', [root]);
    rmSync(root, { recursive: true, force: true });
  }
});
