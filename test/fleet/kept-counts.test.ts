/**
 * What the primary keeps of the workers gone (fleet/kept-counts.ts), and how the host's metrics
 * and status count it: a worker's counts stay after it dies, its gauges do not.
 */
import { AggregatorRegistry } from 'prom-client';
import { expect, test } from 'vitest';
import { mergeStatuses } from '../../src/fleet/cluster-status.js';
import {
  keepCounters,
  keepTraffic,
  keptTotals,
  type MetricJson,
} from '../../src/fleet/kept-counts.js';
import type { Status } from '../../src/status/status.js';
import type { TrafficPoint } from '../../src/status/history.js';

/** A worker's registry: a counter, a histogram of one observation of `n`, a gauge. */
const registry = (n: number): MetricJson[] => [
  {
    name: 'served_total',
    help: 'served',
    type: 'counter',
    aggregator: 'sum',
    values: [{ value: n, labels: { kind: 'blob', status: 200 } }],
  },
  {
    name: 'took_seconds',
    help: 'took',
    type: 'histogram',
    aggregator: 'sum',
    values: [
      { value: n, labels: { le: 1, kind: 'blob' }, metricName: 'took_seconds_bucket' },
      { value: n, labels: { le: '+Inf', kind: 'blob' }, metricName: 'took_seconds_bucket' },
      { value: n / 2, labels: { kind: 'blob' }, metricName: 'took_seconds_sum' },
      { value: n, labels: { kind: 'blob' }, metricName: 'took_seconds_count' },
    ],
  },
  {
    name: 'memory_bytes',
    help: 'memory',
    type: 'gauge',
    aggregator: 'sum',
    values: [{ value: 7, labels: {} }],
  },
];

test("the workers gone keep their counters and histograms in the host's sum, not their gauges", async () => {
  let kept = keepCounters([], registry(3));
  kept = keepCounters(kept, registry(4));
  const text = await AggregatorRegistry.aggregate([registry(1), kept]).metrics();
  expect(text).toMatch(/^served_total\{kind="blob",status="200"\} 8$/m);
  expect(text).toMatch(/^took_seconds_bucket\{le="1",kind="blob"\} 8$/m);
  expect(text).toMatch(/^took_seconds_sum\{kind="blob"\} 4$/m);
  expect(text).toMatch(/^took_seconds_count\{kind="blob"\} 8$/m);
  // The live worker's gauge only: the others' told of processes that are gone.
  expect(text).toMatch(/^memory_bytes 7$/m);
  // A worker replaced again and again: still one series each.
  for (let i = 0; i < 1000; i++) kept = keepCounters(kept, registry(1));
  expect(kept.map((m) => [m.name, m.values.length])).toEqual([
    ['served_total', 1],
    ['took_seconds', 4],
  ]);
});

const point = (t: number, hits: number): TrafficPoint => ({
  t,
  hits,
  misses: 0,
  hitBytes: hits * 10,
  missBytes: 0,
  upstreamBytes: 0,
});

/** A live worker's status with this history (now last); only the traffic counts here. */
function status(points: TrafficPoint[]): Status {
  const last = points.at(-1)!;
  return {
    startedAt: new Date(points[0]!.t).toISOString(),
    traffic: {
      hits: last.hits,
      misses: 0,
      hitBytes: last.hitBytes,
      missBytes: 0,
      upstreamBytes: 0,
    },
    history: { intervalSeconds: 10, points },
    storage: { bytes: 0 },
    upstreams: [],
    fetches: [],
    recent: { upstreamFailures: [], refused: [] },
  } as unknown as Status;
}

test('the traffic of a worker gone stays in the totals, and in the history as it had it then', () => {
  // Sampled at 0, 10 and 20 s, last heard of at 25 s; then killed.
  const kept = keepTraffic(undefined, {
    startedAt: new Date(0).toISOString(),
    points: [point(0, 0), point(10_000, 2), point(20_000, 5), point(25_000, 6)],
  });
  // The worker left sampled a second later each time; now is 35 s.
  const live = status([
    point(1000, 0),
    point(11_000, 1),
    point(21_000, 1),
    point(31_000, 2),
    point(35_000, 4),
  ]);
  const host = mergeStatuses(live, [live], kept);
  expect(host.traffic.hits).toBe(10);
  expect(host.traffic.hitBytes).toBe(100);
  expect(host.history.points.map((p) => [p.t, p.hits])).toEqual([
    [1000, 0],
    [11_000, 3],
    [21_000, 6],
    [31_000, 8],
    [35_000, 10],
  ]);
  expect(host.startedAt).toBe(new Date(0).toISOString());
});

test('the history reaches back as far as the workers gone, when every live one is younger', () => {
  const kept = keepTraffic(undefined, {
    startedAt: new Date(0).toISOString(),
    points: [point(0, 0), point(10_000, 2), point(20_000, 5), point(25_000, 6)],
  });
  const live = status([point(40_000, 1), point(45_000, 3)]);
  const host = mergeStatuses(live, [live], kept);
  expect(host.history.points.map((p) => [p.t, p.hits])).toEqual([
    [0, 0],
    [10_000, 2],
    [20_000, 5],
    [30_000, 6],
    [40_000, 7],
    [45_000, 9],
  ]);
});

test('a worker replaced again and again: the traffic kept holds an hour, and every count', () => {
  let kept;
  // A worker every 5 s for about 3 hours, each serving one hit.
  for (let i = 0; i < 2000; i++) {
    const start = i * 5000;
    kept = keepTraffic(kept, {
      startedAt: new Date(start).toISOString(),
      points: [point(start, 0), point(start + 4000, 1)],
    });
  }
  expect(kept!.totals.length).toBeLessThanOrEqual(3_600_000 / 10_000 + 4);
  expect(keptTotals(kept!).hits).toBe(2000);
  expect(kept!.startedAt).toBe(new Date(0).toISOString());
  const now = 2000 * 5000;
  const live = status([point(now - 1000, 0), point(now, 0)]);
  const host = mergeStatuses(live, [live], kept);
  expect(host.history.points.at(-1)!.hits).toBe(2000);
  // An hour of it, by ten seconds, rising two a point.
  const points = host.history.points;
  expect(points.length).toBeGreaterThan(360);
  expect(points.at(-3)!.hits - points.at(-4)!.hits).toBe(2);
});
