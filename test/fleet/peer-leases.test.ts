/**
 * PeerLeases, the replicas' leases on digests: when Redis does not answer (a port nobody listens
 * on), the first cold blob waits out one connection timeout and the next ones are told at once;
 * in a real Redis, a lease left by an earlier life of the replica is taken over.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { Readable } from 'node:stream';
import { PeerLeases } from '../../src/fleet/peer-leases.js';
import { PeeredBlobSource } from '../../src/fleet/peers.js';
import { COMMAND_TIMEOUT_MS, LeaseRedis } from '../../src/lifecycle/lease.js';
import { silentLogger } from '../../src/log/logger.js';
import type { Digest } from '../../src/oci/digest.js';
import type { Repository } from '../../src/oci/reference.js';
import { deferred } from '../../src/proxy/deferred.js';
import type { BlobStream } from '../../src/upstream/types.js';
import { freePort, waitFor } from '../helpers/net.js';
import { startRedis, type TestRedis } from '../helpers/redis.js';

const DIGEST = `sha256:${'b'.repeat(64)}` as Digest;
/** What the fetches here are for. */
const SCOPE = 'upstream/library/x';

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
    await expect(leases.claim(DIGEST, SCOPE)).rejects.toThrow(/redis did not answer/);
    expect(performance.now() - started).toBeGreaterThan(1000);
    for (let i = 0; i < 3; i++) {
      started = performance.now();
      await expect(leases.claim(DIGEST, SCOPE)).rejects.toThrow(/redis did not answer/);
      expect(performance.now() - started).toBeLessThan(200);
    }
  } finally {
    await redis.close();
  }
});

test('a Redis that stops answering mid-run fails a claim within the command timeout, the next ones at once, and is used again once back', async () => {
  // A server of its own, stopped (SIGSTOP) as a lost host or a failover looks: the connection
  // stays open, nothing answers.
  const server = await startRedis({ port: await freePort() });
  const redis = new LeaseRedis(server.url, silentLogger());
  const leases = new PeerLeases({
    redis,
    advertise: 'http://127.0.0.1:1',
    prefix: `pullcache:fetch-lease:stopped-${Date.now()}:`,
    log: silentLogger(),
  });
  try {
    expect((await leases.claim(DIGEST, SCOPE)).held).toBe(true);
    process.kill(server.pid!, 'SIGSTOP');
    try {
      const started = performance.now();
      await expect(leases.claim(`sha256:${'c'.repeat(64)}` as Digest, SCOPE)).rejects.toThrow();
      const waited = performance.now() - started;
      expect(waited).toBeGreaterThanOrEqual(COMMAND_TIMEOUT_MS - 100);
      expect(waited).toBeLessThan(COMMAND_TIMEOUT_MS + 1500);
      // Taken for unreachable: the next cold blob does not wait again.
      const next = performance.now();
      await expect(leases.claim(`sha256:${'e'.repeat(64)}` as Digest, SCOPE)).rejects.toThrow();
      expect(performance.now() - next).toBeLessThan(200);
    } finally {
      process.kill(server.pid!, 'SIGCONT');
    }
    await waitFor(
      () =>
        leases.claim(`sha256:${'d'.repeat(64)}` as Digest, SCOPE).then(
          (c) => c.held,
          () => false,
        ),
      'claims answered again',
      20_000,
    );
  } finally {
    await redis.close();
    await server.stop();
  }
}, 40_000);

test('a held lease is renewed through the new connection once a silent one was dropped', async () => {
  const server = await startRedis();
  const redis = new LeaseRedis(server.url, silentLogger(), { commandTimeoutMs: 300, retryMs: 300 });
  const prefix = `pullcache:fetch-lease:renewed-${Date.now()}:`;
  const leases = new PeerLeases({
    redis,
    advertise: 'http://127.0.0.1:1',
    prefix,
    log: silentLogger(),
    ttlMs: 3000, // renewed every second
  });
  try {
    const claim = await leases.claim(DIGEST, SCOPE);
    expect(claim.held).toBe(true);
    // A use of the connection that gets no answer in time (a blocking pop stands in for a silent
    // Redis): the connection is dropped, and made again 300 ms later.
    await expect(
      redis.run((c) =>
        (c as unknown as { sendCommand(args: string[]): Promise<unknown> }).sendCommand([
          'BLPOP',
          `${prefix}nothing`,
          '5',
        ]),
      ),
    ).rejects.toThrow(/did not answer/);
    // The renewal after it (within a second) goes through the new connection.
    await new Promise((r) => setTimeout(r, 1500));
    const client = await redis.connect();
    const pttl = Number(
      await (client as unknown as { sendCommand(args: string[]): Promise<unknown> }).sendCommand([
        'PTTL',
        `${prefix}${DIGEST}`,
      ]),
    );
    expect(pttl).toBeGreaterThan(2000);
    if (claim.held) claim.release();
  } finally {
    await redis.close();
    await server.stop();
  }
});

describe('in a real Redis', () => {
  let redis: TestRedis;
  let conn: LeaseRedis;
  beforeAll(async () => {
    redis = await startRedis();
    conn = new LeaseRedis(redis.url, silentLogger());
  });
  afterAll(async () => {
    await conn?.close();
    await redis?.stop();
  });

  const leasesOf = (advertise: string, prefix: string) =>
    new PeerLeases({ redis: conn, advertise, prefix, log: silentLogger() });

  test("a lease of this replica's earlier life is taken over; another replica's is followed", async () => {
    const prefix = `test-peer-${Date.now()}:`;
    const key = `${prefix}${DIGEST}`;
    const client = await conn.connect();
    // An earlier life of http://a:1 (another random part) left its lease behind.
    await client.set(key, 'http://a:1 earlier', { NX: true, PX: 30_000 });
    const a = leasesOf('http://a:1', prefix);
    const claim = await a.claim(DIGEST, SCOPE);
    expect(claim.held).toBe(true);
    const value = await client.get(key);
    expect(value).toMatch(/^http:\/\/a:1 /);
    expect(value).not.toBe('http://a:1 earlier');
    // Another replica asking now follows this one, and is told what it fetches for.
    expect(await leasesOf('http://b:1', prefix).claim(DIGEST, 'upstream/other')).toEqual({
      held: false,
      holder: 'http://a:1',
      scope: SCOPE,
    });
    if (claim.held) claim.release();
    await waitFor(async () => (await client.get(key)) === null, 'the lease released');
    // A replica that does not say what it fetches for (an older version): the scope is unknown.
    await client.set(key, 'http://c:1 older', { NX: true, PX: 30_000 });
    expect(await a.claim(DIGEST, SCOPE)).toEqual({
      held: false,
      holder: 'http://c:1',
      scope: undefined,
    });
  });

  test('a fetch holds its lease until it is stored, not only until its body ends', async () => {
    const prefix = `test-peer-settled-${Date.now()}:`;
    const key = `${prefix}${DIGEST}`;
    const client = await conn.connect();
    const upstream = {
      name: 'upstream',
      getBlob: async (): Promise<BlobStream> => ({
        size: 3,
        stream: Readable.from([Buffer.from('abc')]),
      }),
      headBlob: () => Promise.reject(new Error('not asked: the same repository')),
    };
    const source = new PeeredBlobSource(upstream, {
      leases: leasesOf('http://a:1', prefix),
      secret: 'secret',
      idleTimeout: 5_000,
      log: silentLogger(),
    });
    try {
      const stored = deferred<void>();
      const blob = await source.getBlob('library/x' as Repository, DIGEST, {
        settled: stored.promise,
      });
      for await (const chunk of blob.stream) expect(chunk).toBeDefined();
      await new Promise((r) => setTimeout(r, 100)); // the body is over: its stream closed
      // Not stored yet (a commit under way): another replica asking follows this one.
      expect(await leasesOf('http://b:1', prefix).claim(DIGEST, SCOPE)).toEqual({
        held: false,
        holder: 'http://a:1',
        scope: SCOPE,
      });
      stored.resolve();
      await waitFor(async () => (await client.get(key)) === null, 'the lease released');
    } finally {
      source.close();
    }
  });

  test('a lease that expired while Redis could not be asked is taken again when free, and left to a replica that took it', async () => {
    const prefix = `test-peer-retaken-${Date.now()}:`;
    const key = `${prefix}${DIGEST}`;
    const client = await conn.connect();
    const a = new PeerLeases({
      redis: conn,
      advertise: 'http://a:1',
      prefix,
      log: silentLogger(),
      ttlMs: 600, // renewed every 200 ms
    });
    const claim = await a.claim(DIGEST, SCOPE);
    expect(claim.held).toBe(true);
    const mine = await client.get(key);
    // Gone as it would after its lifetime without renewals.
    await client.eval(`return redis.call('del', KEYS[1])`, { keys: [key], arguments: [] });
    await waitFor(async () => (await client.get(key)) === mine, 'the lease taken again');
    // Taken by another replica meanwhile: left to it, not renewed over it.
    await client.eval(`return redis.call('set', KEYS[1], ARGV[1], 'PX', 1000)`, {
      keys: [key],
      arguments: ['http://b:1 other upstream/library/x'],
    });
    await new Promise((r) => setTimeout(r, 1_200));
    expect(await client.get(key)).toBeNull(); // expired on its own: no longer renewed by a
    if (claim.held) claim.release();
  });
});
