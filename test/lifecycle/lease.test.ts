/**
 * The lifecycle's lease in a real Redis: one holder at a time, renewal only by the holder, given
 * up at once on release, taken over after its expiry, and simply not held while Redis is away.
 */
import { afterAll, beforeAll, expect, test } from 'vitest';
import { LeaseRedis, RedisLease } from '../../src/lifecycle/lease.js';
import { silentLogger } from '../../src/log/logger.js';
import { freePort } from '../helpers/net.js';
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
