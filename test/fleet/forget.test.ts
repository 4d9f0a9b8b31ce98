/**
 * What one process removes from storage, the others drop from memory (fleet/forget.ts): through a
 * real Redis for processes that share one (here: one transport per "process", each with its own
 * connections), and the batching and retrying of what could not be sent.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import {
  decodeChange,
  encodeChange,
  Forgetting,
  type Change,
  type ForgetTransport,
  type Forgotten,
} from '../../src/fleet/forget.js';
import { RedisForgetTransport } from '../../src/fleet/forget-transports.js';
import type { RemovedEvent, StoredEvent } from '../../src/lifecycle/types.js';
import { parseDigest } from '../../src/oci/digest.js';
import { parseRepository, parseTag } from '../../src/oci/reference.js';
import { LeaseRedis } from '../../src/lifecycle/lease.js';
import { silentLogger } from '../../src/log/logger.js';
import { freePort, waitFor } from '../helpers/net.js';
import { startRedis, type TestRedis } from '../helpers/redis.js';

const log = silentLogger();
const DIGEST = parseDigest(`sha256:${'ab'.repeat(32)}`).digest;
const REPO = { upstream: 'docker.io', repository: parseRepository('library/alpine') };
const BLOB: StoredEvent = { kind: 'blob', digest: DIGEST, size: 1234 };
const TAG: StoredEvent = { kind: 'tag', repo: REPO, tag: parseTag('3.20'), digest: DIGEST };
const GONE: RemovedEvent = { kind: 'manifest', repo: REPO, digest: DIGEST };

/** A process's side: its transport on `channel`, and every message it was told. */
function member(url: string, channel: string, ping?: { everyMs: number; timeoutMs: number }) {
  const redis = new LeaseRedis(url, log);
  const forgetting = new Forgetting(
    [new RedisForgetTransport(redis, url, channel, log, ping)],
    log,
  );
  const heard: Forgotten[] = [];
  const stored: StoredEvent[] = [];
  const removed: RemovedEvent[] = [];
  let misses = 0;
  forgetting.listen({
    forget: (keys) => heard.push([...keys]),
    forgetAll: () => heard.push('all'),
    changed: (changes) => {
      for (const change of changes)
        if ('stored' in change) stored.push(change.stored);
        else if ('removed' in change) removed.push(change.removed);
    },
    missed: () => misses++,
  });
  const keys = () => heard.flatMap((m) => (m === 'all' ? [] : m));
  const alls = () => heard.filter((m) => m === 'all').length;
  return {
    forgetting,
    heard,
    stored,
    removed,
    /** How many times it was told it may have missed what the others stored and removed. */
    misses: () => misses,
    keys,
    alls,
    /** Subscribed (and so told to drop everything once). */
    ready: () => waitFor(async () => alls() > 0, 'subscribed'),
    async close() {
      await forgetting.close();
      await redis.close();
    },
  };
}

type M = ReturnType<typeof member>;

/**
 * Once Redis answers again, a key `a` announces reaches `b`: announced again until it does, since
 * b's subscription may be renewed a moment after its connection is ready.
 */
function reachesAgain(a: M, b: M): Promise<void> {
  return waitFor(
    async () => {
      a.forgetting.announce('after');
      await new Promise((r) => setTimeout(r, 100));
      return b.keys().includes('after');
    },
    'a key announced once Redis answers again',
    20_000,
  );
}

describe('through Redis', () => {
  let redis: TestRedis;
  let port: number;
  beforeAll(async () => {
    port = await freePort();
    redis = await startRedis({ port });
  });
  afterAll(async () => {
    await redis?.stop();
  });
  /** Two processes on one channel of their own, both subscribed; closed after `body`. */
  async function twoMembers(name: string, body: (a: M, b: M) => Promise<void>): Promise<void> {
    const channel = `pullcache:forget:${name}-${Date.now()}`;
    const [a, b] = [member(redis.url, channel), member(redis.url, channel)];
    try {
      await Promise.all([a.ready(), b.ready()]);
      await body(a, b);
    } finally {
      await a.close();
      await b.close();
    }
  }

  test('a key one process announces reaches every other on its storage, in one message, and not itself', async () => {
    const channel = `pullcache:forget:test-${Date.now()}`;
    const [a, b, c] = [1, 2, 3].map(() => member(redis.url, channel)) as [M, M, M];
    const elsewhere = member(redis.url, `${channel}-another-storage`);
    const members = [a, b, c, elsewhere];
    try {
      await Promise.all(members.map((m) => m.ready()));
      a.forgetting.announce('manifest-1');
      a.forgetting.announce('tag-1');
      a.forgetting.announce('manifest-1');
      for (const m of [b, c]) {
        await waitFor(async () => m.keys().length > 0, 'the keys heard');
        expect(m.heard.filter((h) => h !== 'all')).toEqual([['manifest-1', 'tag-1']]);
      }
      await new Promise((r) => setTimeout(r, 100));
      expect(a.keys()).toEqual([]); // its own message comes back, and is passed over
      expect(elsewhere.keys()).toEqual([]); // another storage's channel
    } finally {
      await Promise.all(members.map((m) => m.close()));
    }
  });

  test('past 10,000 keys at once, the others are told everything, and that they may have missed events', async () => {
    await twoMembers('many', async (a, b) => {
      const allsBefore = b.alls();
      for (let i = 0; i <= 10_000; i++) a.forgetting.announce(`key-${i}`);
      await waitFor(async () => b.alls() > allsBefore, 'the message saying everything');
      expect(b.keys()).toEqual([]);
      expect(b.misses()).toBe(1);
    });
  });

  test('what one process stored or removed reaches the others as events, apart from the keys to forget', async () => {
    await twoMembers('stored', async (a, b) => {
      a.forgetting.announceChange({ stored: BLOB });
      a.forgetting.announceChange({ stored: TAG });
      a.forgetting.announceChange({ removed: GONE });
      a.forgetting.announce('manifest-2');
      await waitFor(
        async () => b.stored.length === 2 && b.removed.length === 1 && b.keys().length === 1,
        'all heard',
      );
      expect(b.stored).toEqual([BLOB, TAG]);
      expect(b.removed).toEqual([GONE]);
      expect(b.keys()).toEqual(['manifest-2']);
      expect([a.stored, a.removed]).toEqual([[], []]);
    });
  });

  test('Redis restarting: the others drop everything once subscribed again, and what is announced reaches them again', async () => {
    await twoMembers('restart', async (a, b) => {
      // The publisher's connection is made (it is made at its first use).
      a.forgetting.announce('before');
      await waitFor(async () => b.keys().includes('before'), 'the first key');
      // A first subscription missed nothing.
      expect(b.misses()).toBe(0);
      const allsBefore = b.alls();
      await redis.stop();
      // Not sent while Redis is down: tried again every second (the test below, without Redis).
      // Once Redis is back it may be published before b has subscribed again, and then b never
      // hears it: b drops everything when it is subscribed again, which covers it.
      a.forgetting.announce('while-down');
      await new Promise((r) => setTimeout(r, 1500));
      redis = await startRedis({ port });
      await waitFor(async () => b.alls() > allsBefore, 'b subscribed again', 20_000);
      expect(b.alls()).toBe(allsBefore + 1);
      // It may have missed what a stored and removed meanwhile: told so (it then counts storage).
      expect(b.misses()).toBe(1);
      // Both connections are back: a key announced now reaches b.
      await reachesAgain(a, b);
    });
  }, 30_000);
});

test('a Redis that stops answering on the open connection: the subscriber is made anew, told it may have missed events, and hears keys again', async () => {
  const server = await startRedis({ port: await freePort() });
  const channel = `pullcache:forget:silent-${Date.now()}`;
  const [a, b] = [
    member(server.url, channel),
    member(server.url, channel, { everyMs: 200, timeoutMs: 300 }),
  ];
  try {
    await Promise.all([a.ready(), b.ready()]);
    a.forgetting.announce('before');
    await waitFor(async () => b.keys().includes('before'), 'the first key');
    const allsBefore = b.alls();
    // A stopped process stands in for a lost host: the connection stays open, nothing answers.
    process.kill(server.pid!, 'SIGSTOP');
    await new Promise((r) => setTimeout(r, 1000));
    process.kill(server.pid!, 'SIGCONT');
    await waitFor(async () => b.alls() > allsBefore, 'b subscribed anew', 20_000);
    expect(b.misses()).toBe(1);
    await reachesAgain(a, b);
  } finally {
    await a.close();
    await b.close();
    await server.stop();
  }
}, 40_000);

/** A transport that fails until told otherwise, and records what it sent. */
class FlakyTransport implements ForgetTransport {
  readonly name = 'flaky';
  up = false;
  readonly sent: Forgotten[] = [];
  send(keys: Forgotten): Promise<void> {
    if (!this.up) return Promise.reject(new Error('down'));
    this.sent.push(keys);
    return Promise.resolve();
  }
  listen(): void {}
  close(): Promise<void> {
    return Promise.resolve();
  }
}

test('keys that could not be sent are sent again; past 10,000 of them, one message says everything', async () => {
  const few = new FlakyTransport();
  const many = new FlakyTransport();
  const [f1, f2] = [new Forgetting([few], log), new Forgetting([many], log)];
  try {
    f1.announce('a');
    f1.announce('b');
    for (let i = 0; i <= 10_000; i++) f2.announce(`key-${i}`);
    await new Promise((r) => setTimeout(r, 50));
    expect(few.sent).toEqual([]);
    few.up = true;
    many.up = true;
    await waitFor(async () => few.sent.length > 0 && many.sent.length > 0, 'a retry');
    expect(few.sent).toEqual([['a', 'b']]);
    expect(many.sent).toEqual(['all']);
  } finally {
    await f1.close();
    await f2.close();
  }
});

test('a stored or removed event (or a full disk) survives its encoding, and a malformed one is passed over', () => {
  const changes: Change[] = [
    { stored: BLOB },
    { stored: { kind: 'link', repo: REPO, digest: DIGEST } },
    { stored: { kind: 'manifest', repo: REPO, digest: DIGEST } },
    { stored: TAG },
    { removed: { kind: 'blob', digest: DIGEST } },
    { removed: { kind: 'link', repo: REPO, digest: DIGEST } },
    { removed: GONE },
    { removed: { kind: 'tag', repo: REPO, tag: parseTag('3.20') } },
    { full: 67_108_864 },
  ];
  for (const change of changes) expect(decodeChange(encodeChange(change))).toEqual(change);
  for (const bad of [
    '+blob sha256:nothex 12',
    `+blob ${DIGEST} -1`,
    `+blob ${DIGEST} 1.5`,
    `+blob ${DIGEST} `,
    `+blob ${DIGEST} 0x10`,
    `+blob ${DIGEST} 1e3`,
    `+blob ${DIGEST}`,
    `-blob ${DIGEST} 12`,
    `+link docker.io ../etc ${DIGEST}`,
    `-link docker.io ../etc ${DIGEST}`,
    `+manifest docker.io Library/Upper ${DIGEST}`,
    `-manifest docker.io library/alpine sha256:short`,
    `+tag docker.io library/alpine bad:tag ${DIGEST}`,
    `+tag docker.io library/alpine ${DIGEST}`,
    `-tag docker.io library/alpine 3.20 ${DIGEST}`,
    `-tag docker.io library/alpine bad:tag`,
    `+unknown ${DIGEST}`,
    '+full',
    '+full -1',
    '+full 1 2',
    '-full 1',
    `*blob ${DIGEST}`,
    'manifest-key',
  ])
    expect(decodeChange(bad)).toBeUndefined();
});
