/** One contract, run against both metadata cache backends: memory and a real redis-server. */
import { spawn, type ChildProcess } from 'node:child_process';
import type { EventEmitter } from 'node:events';
import { randomUUID } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { KeyvMetadataCache } from '../../src/metadata/keyv-cache.js';
import { silentLogger } from '../../src/log/logger.js';
import { digestOf } from '../../src/oci/digest.js';
import { parseRepository, parseTag } from '../../src/oci/reference.js';
import { within } from '../../src/abort.js';
import { freePort, waitFor } from '../helpers/net.js';
import { capturedLog } from '../helpers/pullcache.js';
import { startRedis, type TestRedis } from '../helpers/redis.js';

let redis: TestRedis;
beforeAll(async () => {
  redis = await startRedis();
});
afterAll(async () => redis?.stop());

const backends = [
  ['memory', () => new KeyvMetadataCache({ store: 'memory', log: silentLogger() })],
  // No in-process LRU here, so that every call reaches Redis.
  [
    'redis',
    () =>
      new KeyvMetadataCache({
        store: 'redis',
        redisUrl: redis.url,
        log: silentLogger(),
        memoryEntries: 0,
      }),
  ],
] as const;

describe.each(backends)('metadata cache on %s', (_name, make) => {
  // A fresh repository per test keeps runs against a shared Redis independent.
  const repo = () => ({
    upstream: 'docker.io',
    repository: parseRepository(`t/${randomUUID().slice(0, 8)}`),
  });

  test('descriptors by digest, globally and per repository', async () => {
    const cache = make();
    const r = repo();
    const descriptor = {
      digest: digestOf(randomUUID()),
      size: 42,
      mediaType: 'application/octet-stream',
    };
    expect(await cache.getDescriptor(descriptor.digest)).toBeUndefined();
    await cache.setDescriptor(descriptor);
    expect(await cache.getDescriptor(descriptor.digest)).toEqual(descriptor);
    expect(await cache.getRepositoryDescriptor(r, descriptor.digest)).toBeUndefined();
    await cache.setRepositoryDescriptor(r, descriptor);
    expect(await cache.getRepositoryDescriptor(r, descriptor.digest)).toEqual(descriptor);
    await cache.deleteDescriptor(descriptor.digest);
    expect(await cache.getDescriptor(descriptor.digest)).toBeUndefined();
    await cache.close();
  });

  test('manifests and tags per upstream and repository', async () => {
    const cache = make();
    const r = repo();
    const other = { upstream: 'ghcr.io', repository: r.repository };
    const digest = digestOf(randomUUID());
    await cache.setManifest(r, {
      digest,
      mediaType: 'application/vnd.oci.image.index.v1+json',
      size: 7,
    });
    expect(await cache.getManifest(r, digest)).toEqual({
      digest,
      mediaType: 'application/vnd.oci.image.index.v1+json',
      size: 7,
    });
    expect(await cache.getManifest(other, digest)).toBeUndefined();
    await cache.setTag(r, parseTag('v1'), { digest, confirmedAt: 99 });
    expect(await cache.getTag(r, parseTag('v1'))).toEqual({ digest, confirmedAt: 99 });
    expect(await cache.getTag(other, parseTag('v1'))).toBeUndefined();
    await cache.deleteTag(r, parseTag('v1'));
    expect(await cache.getTag(r, parseTag('v1'))).toBeUndefined();
    await cache.close();
  });
  test('clear forgets every entry, in memory and in the store', async () => {
    const cache = make();
    const r = repo();
    const digest = digestOf(randomUUID());
    await cache.setDescriptor({ digest, size: 1 });
    await cache.setManifest(r, {
      digest,
      mediaType: 'application/vnd.oci.image.index.v1+json',
      size: 7,
    });
    await cache.setTag(r, parseTag('v1'), { digest, confirmedAt: 99 });
    expect(await cache.getTag(r, parseTag('v1'))).toEqual({ digest, confirmedAt: 99 });
    await cache.clear();
    expect(await cache.getDescriptor(digest)).toBeUndefined();
    expect(await cache.getManifest(r, digest)).toBeUndefined();
    expect(await cache.getTag(r, parseTag('v1'))).toBeUndefined();
    await cache.close();
  });
});

test('a clear empties the Redis the processes share, and tells the others to drop their memory', async () => {
  let told = 0;
  const a = new KeyvMetadataCache({
    store: 'redis',
    redisUrl: redis.url,
    log: silentLogger(),
    onClear: () => told++,
  });
  const b = new KeyvMetadataCache({ store: 'redis', redisUrl: redis.url, log: silentLogger() });
  const r = { upstream: 'docker.io', repository: parseRepository(`t/${randomUUID().slice(0, 8)}`) };
  const digest = digestOf(randomUUID());
  await b.setTag(r, parseTag('v1'), { digest, confirmedAt: 99 });
  expect(await a.getTag(r, parseTag('v1'))).toEqual({ digest, confirmedAt: 99 });
  await a.clear();
  expect(told).toBe(1);
  expect(await a.getTag(r, parseTag('v1'))).toBeUndefined();
  // b's own memory is dropped when it is told (fleet/forget.ts); Redis holds nothing.
  b.forgetAllInMemory();
  expect(await b.getTag(r, parseTag('v1'))).toBeUndefined();
  await a.close();
  await b.close();
});

test('two processes share what one of them cached in Redis', async () => {
  const a = new KeyvMetadataCache({ store: 'redis', redisUrl: redis.url, log: silentLogger() });
  const b = new KeyvMetadataCache({
    store: 'redis',
    redisUrl: redis.url,
    log: silentLogger(),
    memoryEntries: 0,
  });
  const descriptor = { digest: digestOf(randomUUID()), size: 1 };
  await a.setDescriptor(descriptor);
  expect(await b.getDescriptor(descriptor.digest)).toEqual(descriptor);
  await a.close();
  await b.close();
});

/** A cache on a Redis nobody listens on, with `memoryEntries` in its in-process LRU. */
function unreachableRedis(memoryEntries: number): KeyvMetadataCache {
  return new KeyvMetadataCache({
    store: 'redis',
    redisUrl: 'redis://127.0.0.1:1',
    log: silentLogger(),
    memoryEntries,
  });
}

test('the in-process LRU answers without Redis, and forgets deleted tags', async () => {
  const cache = unreachableRedis(10);
  const repo = { upstream: 'docker.io', repository: parseRepository('lru/test') };
  const digest = digestOf('lru');
  await cache.setTag(repo, parseTag('v1'), { digest, confirmedAt: 1 });
  expect(await cache.getTag(repo, parseTag('v1'))).toEqual({ digest, confirmedAt: 1 });
  await cache.deleteTag(repo, parseTag('v1'));
  expect(await cache.getTag(repo, parseTag('v1'))).toBeUndefined();
  await cache.close();
});

test('in memory, memoryEntries bounds the whole cache (0: none)', async () => {
  // It bounded only the LRU in front of keyv, whose own Map kept every entry ever set.
  const cache = new KeyvMetadataCache({ store: 'memory', log: silentLogger(), memoryEntries: 100 });
  const digests = Array.from({ length: 300 }, (_, i) => digestOf(`bounded ${i}`));
  for (const digest of digests) await cache.setDescriptor({ digest, size: 1 });
  expect(await cache.getDescriptor(digests[0]!)).toBeUndefined();
  expect(await cache.getDescriptor(digests[299]!)).toEqual({ digest: digests[299], size: 1 });
  const none = new KeyvMetadataCache({ store: 'memory', log: silentLogger(), memoryEntries: 0 });
  await none.setDescriptor({ digest: digests[0]!, size: 1 });
  expect(await none.getDescriptor(digests[0]!)).toBeUndefined();
});

test('a Redis that stays away: no listeners pile up on its client, however often it is tried', async () => {
  const cache = unreachableRedis(0);
  const client = (await cache['redis'])!.client as unknown as EventEmitter;
  const attempt = async () => {
    cache['skipUntil'] = 0; // as after the pause that follows a failure
    expect((await cache.reachable(300)).ok).toBe(false);
    cache['skipUntil'] = 0;
    expect(await cache.getDescriptor(digestOf('away'))).toBeUndefined();
  };
  await attempt();
  const listeners = client.eventNames().map((name) => client.listenerCount(name));
  for (let i = 0; i < 4; i++) await attempt();
  // Each attempt of KeyvRedis's own to connect added four (error, connect, disconnect,
  // reconnecting): one set every few seconds for as long as Redis was away.
  expect(client.eventNames().map((name) => client.listenerCount(name))).toEqual(listeners);
  // Closed, it stops trying (it would for ever, and keep the process alive).
  await cache.close();
  expect((client as unknown as { isOpen: boolean }).isOpen).toBe(false);
}, 30_000);

test('a Redis that goes away is said once by the requests that meet it, and again when it answers', async () => {
  const port = await freePort();
  let own = await startRedis({ port });
  const { log, lines } = capturedLog('info');
  const cache = new KeyvMetadataCache({ store: 'redis', redisUrl: own.url, log, memoryEntries: 0 });
  const said = (msg: string) => lines.filter((l) => l.msg === msg);
  try {
    const digest = digestOf('gone');
    await cache.setDescriptor({ digest, size: 3 });
    await own.stop();
    // Requests meet it every 100 ms for 6 s: a line every 5 s before (each attempt of the
    // client to reconnect is not a line either).
    for (const until = Date.now() + 6000; Date.now() < until;) {
      expect(await cache.getDescriptor(digest)).toBeUndefined();
      await new Promise((r) => setTimeout(r, 100));
    }
    expect(said('metadata cache unavailable, serving from storage')).toHaveLength(1);
    own = await startRedis({ port });
    await waitFor(async () => {
      await cache.setDescriptor({ digest, size: 3 });
      return (await cache.getDescriptor(digest)) !== undefined;
    }, 'Redis again');
    expect(said('metadata cache answers again')).toHaveLength(1);
  } finally {
    await cache.close();
    await own.stop();
  }
}, 30_000);

test('an unreachable Redis is a miss, not a failure', async () => {
  const cache = unreachableRedis(0);
  const digest = digestOf('x');
  await cache.setDescriptor({ digest, size: 1 });
  expect(await cache.getDescriptor(digest)).toBeUndefined();
  await cache.close();
});

test('a Redis that stops answering (its connection kept open) is a miss within a second or so, and used again once it answers', async () => {
  const own = await startRedis({ port: await freePort() });
  const cache = new KeyvMetadataCache({
    store: 'redis',
    redisUrl: own.url,
    log: silentLogger(),
    memoryEntries: 0,
  });
  try {
    const digest = digestOf('paused');
    await cache.setDescriptor({ digest, size: 7 });
    expect(await cache.getDescriptor(digest)).toEqual({ digest, size: 7 });
    process.kill(own.pid!, 'SIGSTOP');
    try {
      // Without a timeout of its own this waited for as long as Redis was stopped.
      const got = await within(cache.getDescriptor(digest), 10_000, 'the cache never answered');
      expect(got).toBeUndefined();
      // Skipped meanwhile: a miss at once, not another wait.
      const started = Date.now();
      expect(await cache.getDescriptor(digest)).toBeUndefined();
      expect(Date.now() - started).toBeLessThan(500);
    } finally {
      process.kill(own.pid!, 'SIGCONT');
    }
    expect((await cache.reachable()).ok).toBe(true);
    expect(await cache.getDescriptor(digest)).toEqual({ digest, size: 7 });
  } finally {
    await cache.close();
    await own.stop();
  }
}, 30_000);

test('a delete made while Redis is away is made once it is back, and meanwhile reads as deleted', async () => {
  // A Redis that keeps its data on disk, restarted: what was deleted meanwhile would be back.
  const dir = mkdtempSync(join(tmpdir(), 'pullcache-redis-'));
  const port = await freePort();
  const start = async () => {
    const child = spawn(
      'redis-server',
      ['--port', String(port), '--bind', '127.0.0.1', '--dir', dir, '--appendonly', 'yes'],
      { stdio: 'ignore' },
    );
    await waitFor(async () => (await probe(port)) === true, 'redis-server');
    return child;
  };
  let server = await start();
  const url = `redis://127.0.0.1:${port}`;
  const make = () =>
    new KeyvMetadataCache({ store: 'redis', redisUrl: url, log: silentLogger(), memoryEntries: 0 });
  const [here, there] = [make(), make()]; // two processes sharing the Redis
  const repo = { upstream: 'docker.io', repository: parseRepository('team/removed') };
  const digest = digestOf('removed manifest');
  const link = { digest, mediaType: 'application/vnd.oci.image.manifest.v1+json', size: 10 };
  try {
    await here.setManifest(repo, link);
    expect(await there.getManifest(repo, digest)).toEqual(link);
    await stop(server);
    await here.deleteManifest(repo, digest); // an `rm` while Redis is away
    expect(await here.getManifest(repo, digest)).toBeUndefined();
    server = await start();
    await waitFor(async () => (await here.reachable()).ok, 'Redis reachable again');
    // Sent once Redis is back: the other process no longer reads the removed manifest.
    await waitFor(async () => (await there.getManifest(repo, digest)) === undefined, 'the delete');
    expect(await here.getManifest(repo, digest)).toBeUndefined();

    // More deletes than are kept one by one (a large gc while Redis is away): the cache's keys
    // are cleared once it is back, and until then nothing is read from Redis.
    const kept = digestOf('kept before');
    await here.setManifest(repo, { ...link, digest: kept });
    await stop(server);
    for (let i = 0; i < 10_001; i++) await here.deleteDescriptor(digestOf(`gone ${i}`));
    server = await start();
    await waitFor(async () => (await there.reachable()).ok, 'Redis reachable again');
    expect(await there.getManifest(repo, kept)).toEqual({ ...link, digest: kept });
    await waitFor(async () => (await here.reachable()).ok, 'Redis reachable again');
    await waitFor(async () => (await there.getManifest(repo, kept)) === undefined, 'the clear');
    await waitFor(async () => {
      await here.setManifest(repo, link);
      return (await here.getManifest(repo, digest)) !== undefined;
    }, 'Redis used again');
    expect(await there.getManifest(repo, digest)).toEqual(link);
  } finally {
    await here.close();
    await there.close();
    await stop(server);
    rmSync(dir, { recursive: true, force: true });
  }
}, 60_000);

function probe(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect(port, '127.0.0.1', () => {
      s.end();
      resolve(true);
    });
    s.on('error', () => resolve(false));
  });
}

function stop(child: ChildProcess): Promise<void> {
  return new Promise((resolve) => {
    if (child.exitCode !== null || child.signalCode !== null) return resolve();
    child.once('exit', () => resolve());
    child.kill('SIGTERM');
  });
}
