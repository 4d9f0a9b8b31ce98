/**
 * The host's status from its workers' (fleet/cluster-status.ts): what is summed, what is not, and
 * what a worker tells the primary of its traffic.
 */
import { afterEach, expect, test, vi } from 'vitest';
import { mergeStatuses, workerStatus } from '../../src/fleet/cluster-status.js';
import type { OwnTraffic } from '../../src/status/history.js';
import type { Status, UpstreamState } from '../../src/status/status.js';

const point = (t: number, hits: number, upstreamBytes = 0) => ({
  t,
  hits,
  misses: 0,
  hitBytes: hits * 10,
  missBytes: 0,
  upstreamBytes,
});

const upstream = (over: Partial<UpstreamState>): UpstreamState => ({
  name: 'docker.io',
  mode: 'cache',
  state: 'up',
  auth: 'bearer',
  latencyMs: 10,
  lastAnswer: '2026-12-02T10:00:00.000Z',
  rateLimit: null,
  lastFailure: null,
  ...over,
});

function status(over: {
  points: ReturnType<typeof point>[];
  storageBytes: number;
  upstream: UpstreamState;
  fetches?: Status['fetches'];
}): Status {
  const last = over.points.at(-1)!;
  return {
    version: '1',
    startedAt: new Date(over.points[0]!.t).toISOString(),
    now: new Date(last.t).toISOString(),
    traffic: {
      hits: last.hits,
      misses: 0,
      hitBytes: last.hitBytes,
      missBytes: 0,
      servedBytes: last.hitBytes,
      upstreamBytes: last.upstreamBytes,
      savedBytes: 0,
      hitRatio: { requests: 1, bytes: 1 },
    },
    history: { intervalSeconds: 10, points: over.points },
    storage: { bytes: over.storageBytes } as Status['storage'],
    upstreams: [over.upstream],
    fetches: over.fetches ?? [],
    recent: { upstreamFailures: [], refused: [] },
    viewer: { admin: false },
  };
}

test('traffic and its history are summed, point by point from now back; a younger worker adds nothing before its start', () => {
  const fetch = {
    digest: 'sha256:aa' as Status['fetches'][number]['digest'],
    upstream: 'docker.io',
    repository: 'library/a',
    size: 100,
    received: 40,
    bytesPerSecond: 4,
    clients: 2,
    startedAt: 5,
    // This worker follows the other's fetch.
    from: 'replica' as const,
  };
  const old = status({
    points: [point(0, 1), point(10_000, 3), point(20_000, 5, 50)],
    storageBytes: 900,
    upstream: upstream({ lastAnswer: '2026-12-02T10:00:05.000Z' }),
    fetches: [fetch],
  });
  const young = status({
    points: [point(12_000, 0), point(21_000, 7)],
    storageBytes: 300,
    upstream: upstream({
      state: 'down',
      lastAnswer: '2026-12-02T10:00:09.000Z',
      latencyMs: 99,
      rateLimit: {
        limit: 100,
        remaining: 42,
        windowSeconds: 21600,
        at: '2026-12-02T10:00:09.000Z',
      },
    }),
    fetches: [{ ...fetch, received: 70, clients: 1, startedAt: 7, from: 'upstream' }],
  });
  const host = mergeStatuses(young, [old, young]);
  expect(host.traffic.hits).toBe(12);
  expect(host.traffic.hitBytes).toBe(120);
  expect(host.traffic.upstreamBytes).toBe(50);
  expect(host.history.points.map((p) => p.hits)).toEqual([1, 3, 12]);
  expect(host.history.points.map((p) => p.t)).toEqual([0, 10_000, 21_000]);
  expect(host.startedAt).toBe(new Date(0).toISOString());
  // The worker that scanned the storage knows it best.
  expect(host.storage.bytes).toBe(900);
  // Down when any worker finds it so; the latest news of it otherwise.
  expect(host.upstreams[0]).toMatchObject({
    state: 'down',
    latencyMs: 99,
    lastAnswer: '2026-12-02T10:00:09.000Z',
    rateLimit: { remaining: 42 },
  });
  // One fetch followed by two workers: once, with every client and the most bytes seen, from
  // where the worker fetching it gets it.
  expect(host.fetches).toEqual([
    { ...fetch, received: 70, clients: 3, startedAt: 5, from: 'upstream' },
  ]);
});

/**
 * A worker's side in this process, on fake timers: what it sends the primary is kept in `sent`
 * instead; its traffic of now has `hits` (one more for each `served`), and `made` counts the
 * statuses it made (each counts storage).
 */
function aWorker() {
  vi.useFakeTimers({ now: 10_000 });
  const sent: Record<string, unknown>[] = [];
  vi.spyOn(process, 'connected', 'get').mockReturnValue(true);
  vi.spyOn(process, 'send').mockImplementation((message: unknown) => {
    sent.push(message as Record<string, unknown>);
    return true;
  });
  let hits = 1;
  const traffic = (): OwnTraffic => ({
    startedAt: new Date(0).toISOString(),
    points: [point(0, 0), point(Date.now(), hits)],
  });
  let made = 0;
  const own = (_viewer: { admin: boolean }, t = traffic()) => {
    made++;
    return Promise.resolve(status({ points: t.points, storageBytes: 0, upstream: upstream({}) }));
  };
  const host = workerStatus(own, traffic);
  return { sent, host, made: () => made, served: () => hits++ };
}

afterEach(() => {
  vi.useRealTimers();
  vi.restoreAllMocks();
});

test("a worker's report every 5 s tells its traffic without making its status (no storage count)", async () => {
  const worker = aWorker();
  worker.served();
  await vi.advanceTimersByTimeAsync(5000);
  expect(worker.made()).toBe(0);
  expect(worker.sent).toEqual([
    expect.objectContaining({
      pullcache: 'status',
      t: 'traffic',
      points: [point(0, 0), point(15_000, 2)],
    }),
  ]);
});

test("the worker asked for the host's status tells the primary, before its collect, the traffic it shows", async () => {
  const worker = aWorker();
  worker.served();
  const shown = worker.host({ admin: false });
  // What the primary hears of this worker before the collect: its traffic as shown.
  expect(worker.sent.map((m) => m.t)).toEqual(['traffic', 'collect']);
  const told = worker.sent[0]!.points as OwnTraffic['points'];
  worker.served();
  // The primary's answer: no other worker.
  const all = { pullcache: 'status', t: 'all', token: worker.sent[1]!.token, statuses: [] };
  process.emit('message', all, undefined);
  const host = await shown;
  expect(told.at(-1)!.hits).toBe(2);
  expect(host.traffic.hits).toBe(told.at(-1)!.hits);
  expect(host.history.points.at(-1)).toEqual(told.at(-1));
});
