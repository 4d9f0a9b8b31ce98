/**
 * The lifecycle's lease in a real Redis: one holder at a time, renewal only by the holder, given
 * up at once on release, taken over after its expiry, and simply not held while Redis is away
 * (an owner then says so).
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, expect, test } from 'vitest';
import { LeaseRedis, RedisLease } from '../../src/lifecycle/lease.js';
import { Ownership } from '../../src/lifecycle/owner.js';
import { silentLogger } from '../../src/log/logger.js';
import { FilesystemDriver } from '../../src/storage/filesystem-driver.js';
import { freePort, waitFor } from '../helpers/net.js';
import { capturedLog } from '../helpers/pullcache.js';
import { startRedis, type TestRedis } from '../helpers/redis.js';

let redis: TestRedis;
beforeAll(async () => {
  redis = await startRedis();
});
afterAll(async () => {
  await redis?.stop();
});

test('one holder at a time; released, or expired, another takes it', async () => {
  const key = `test-lease-${Date.now()}`;
  // Two processes: a connection each.
  const [ra, rb] = [
    new LeaseRedis(redis.url, silentLogger()),
    new LeaseRedis(redis.url, silentLogger()),
  ];
  const [a, b] = [new RedisLease(ra, key), new RedisLease(rb, key)];
  try {
    expect(await a.acquire(30_000)).toBe(true);
    expect(await b.acquire(30_000)).toBe(false);
    expect(await a.acquire(30_000)).toBe(true); // renewed
    await b.release(); // not its to give up
    expect(await b.acquire(30_000)).toBe(false);
    await a.release();
    expect(await b.acquire(300)).toBe(true);
    await new Promise((r) => setTimeout(r, 400)); // b's lease expires (it died)
    expect(await a.acquire(30_000)).toBe(true);
    expect(await b.acquire(30_000)).toBe(false);
  } finally {
    await ra.close();
    await rb.close();
  }
});

test('a Redis that does not answer fails the acquisition within seconds', async () => {
  const redis = new LeaseRedis(`redis://127.0.0.1:${await freePort()}`, silentLogger());
  const started = Date.now();
  await expect(new RedisLease(redis, 'k').acquire(30_000)).rejects.toThrow();
  expect(Date.now() - started).toBeLessThan(5000);
  await redis.close();
});

test('an owner whose lease cannot be asked owns nothing, and says so once, and once more when it can again', async () => {
  const server = await startRedis({ port: await freePort() });
  const dir = mkdtempSync(join(tmpdir(), 'pullcache-owner-'));
  const { log, lines } = capturedLog('info');
  const conn = new LeaseRedis(server.url, silentLogger());
  const ownership = new Ownership(
    new FilesystemDriver(dir),
    new RedisLease(conn, `test-owner-${Date.now()}`),
    log,
  );
  try {
    expect(await ownership.acquire()).toBe(true);
    process.kill(server.pid!, 'SIGSTOP');
    try {
      // The first asks until the command timeout; the next fail at once (LeaseRedis).
      for (let i = 0; i < 3; i++) expect(await ownership.acquire()).toBe(false);
    } finally {
      process.kill(server.pid!, 'SIGCONT');
    }
    expect(ownership.isOwner).toBe(false);
    const told = () => lines.filter((l) => String(l.msg).includes('lifecycle lease'));
    expect(told().map((l) => l.level)).toEqual([40]);
    await waitFor(() => ownership.acquire(), 'the lease held again', 20_000);
    expect(told().map((l) => l.level)).toEqual([40, 30]);
  } finally {
    await ownership.release();
    await conn.close();
    await server.stop();
    rmSync(dir, { recursive: true, force: true });
  }
}, 40_000);
