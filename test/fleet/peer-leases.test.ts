/**
 * PeerLeases when Redis does not answer (a port nobody listens on): the first cold blob waits out
 * one connection timeout, the next ones are told at once and fetch alone.
 */
import { expect, test } from 'vitest';
import { PeerLeases } from '../../src/fleet/peers.js';
import { LeaseRedis } from '../../src/lifecycle/lease.js';
import { silentLogger } from '../../src/log/logger.js';
import type { Digest } from '../../src/oci/digest.js';
import { freePort } from '../helpers/net.js';

const DIGEST = `sha256:${'b'.repeat(64)}` as Digest;

test('a Redis that did not answer is not waited for again by the next claims', async () => {
  const redis = new LeaseRedis(`redis://127.0.0.1:${await freePort()}`, silentLogger());
  const leases = new PeerLeases({
    redis,
    advertise: 'http://127.0.0.1:1',
    prefix: 'pullcache:fetch-lease:test:',
    log: silentLogger(),
  });
  try {
    let started = performance.now();
    await expect(leases.claim(DIGEST)).rejects.toThrow(/redis did not answer/);
    expect(performance.now() - started).toBeGreaterThan(1000);
    for (let i = 0; i < 3; i++) {
      started = performance.now();
      await expect(leases.claim(DIGEST)).rejects.toThrow(/redis did not answer/);
      expect(performance.now() - started).toBeLessThan(200);
    }
  } finally {
    await redis.close();
  }
});
