/**
 * What the primary keeps of the workers that are gone, so that the host's counts never go down
 * while it lives (cluster-metrics.ts, cluster-status.ts). A worker's counts died with it: a scrape
 * after a worker was replaced summed the live workers only, and Prometheus reads a counter that
 * drops for a reset, so rate() and increase() counted the surviving workers' totals a second
 * time; the status page's traffic fell back the same way, and its past points were rewritten.
 *
 * The primary holds what each live worker last told it, and when a worker is gone adds that to
 * one set for all the workers gone: a worker replaced again and again grows it by no more than
 * the series (or the hour of history) it had. Of a gone worker's metrics only the counters and
 * histograms are kept: its gauges told of the live process (its memory, its fetches in flight).
 */
import type { MetricType } from 'prom-client';
import type { TrafficTotals } from '../metrics.js';
import { HISTORY_INTERVAL_MS, type OwnTraffic } from '../status/history.js';

/** A metric as a worker's registry gives it (prom-client's `getMetricsAsJSON`). */
export interface MetricJson {
  name: string;
  help: string;
  /** `counter`, `gauge`, `histogram`, `summary` (prom-client's types say an enum). */
  type: MetricType | string;
  aggregator?: string;
  values: {
    value: number;
    labels: Partial<Record<string, string | number>>;
    metricName?: string;
  }[];
}

/** One series: a histogram's buckets, sum and count are each one. */
const seriesKey = (v: MetricJson['values'][number]) =>
  `${v.metricName ?? ''}{${Object.entries(v.labels)
    .map(([k, l]) => `${k}=${String(l)}`)
    .sort()
    .join(',')}}`;

/** `kept` with the counters and histograms of `gone` added, series by series. */
export function keepCounters(
  kept: readonly MetricJson[],
  gone: readonly MetricJson[],
): MetricJson[] {
  const byName = new Map<
    string,
    { metric: MetricJson; values: Map<string, MetricJson['values'][number]> }
  >();
  for (const metric of [...kept, ...gone]) {
    if (metric.type !== 'counter' && metric.type !== 'histogram') continue;
    let entry = byName.get(metric.name);
    if (!entry) byName.set(metric.name, (entry = { metric, values: new Map() }));
    for (const v of metric.values) {
      const key = seriesKey(v);
      const seen = entry.values.get(key);
      entry.values.set(key, seen ? { ...seen, value: seen.value + v.value } : { ...v });
    }
  }
  return [...byName.values()].map(({ metric, values }) => ({
    name: metric.name,
    help: metric.help,
    type: metric.type,
    // Added to the live workers' by the aggregation, whatever the first of them says.
    aggregator: 'sum',
    values: [...values.values()],
  }));
}

/** A worker's traffic as it tells it (StatusReporter.traffic): history points, now last. */
export type WorkerTraffic = OwnTraffic;

/**
 * The traffic of the workers gone, summed: at the start of each HISTORY_INTERVAL_MS (`bucket`,
 * the time divided by it) from `from` on, the totals they had by then. Before `from` they had
 * nothing, unless `from` is over an hour before `at` (older buckets are dropped: the history
 * shows an hour).
 */
export interface KeptTraffic {
  /** When the first of them started (ISO 8601). */
  startedAt: string;
  /** The time (ms) of the newest figures kept: from then on, the last of `totals`. */
  at: number;
  from: number;
  totals: TrafficTotals[];
}

/** Buckets kept: the hour of history, and a few more that the workers' clocks may need. */
const KEPT_BUCKETS = 3_600_000 / HISTORY_INTERVAL_MS + 4;

const ZERO: TrafficTotals = { hits: 0, misses: 0, hitBytes: 0, missBytes: 0, upstreamBytes: 0 };

const add = (a: TrafficTotals, b: TrafficTotals): TrafficTotals => ({
  hits: a.hits + b.hits,
  misses: a.misses + b.misses,
  hitBytes: a.hitBytes + b.hitBytes,
  missBytes: a.missBytes + b.missBytes,
  upstreamBytes: a.upstreamBytes + b.upstreamBytes,
});

const bucket = (t: number) => Math.floor(t / HISTORY_INTERVAL_MS);

/** The totals the workers gone had at `t`: never counts made after it. */
export function trafficAt(kept: KeptTraffic, t: number): TrafficTotals {
  const last = kept.totals.at(-1) ?? ZERO;
  if (t >= kept.at) return last;
  const i = bucket(t) - kept.from;
  return i < 0 ? ZERO : (kept.totals[i] ?? last);
}

/** The totals the workers gone had when they were last heard of. */
export const keptTotals = (kept: KeptTraffic): TrafficTotals => kept.totals.at(-1) ?? ZERO;

/** `kept` with the traffic of the worker gone, `gone`, added (`gone`'s points by time). */
export function keepTraffic(
  kept: KeptTraffic | undefined,
  gone: WorkerTraffic,
): KeptTraffic | undefined {
  const { points } = gone;
  if (points.length === 0) return kept;
  const at = points.at(-1)!.t;
  // The bucket after its last point's: by its start, every count of it is in.
  const hi = Math.max(bucket(at) + 1, kept ? kept.from + kept.totals.length - 1 : -Infinity);
  const lo = Math.max(hi - KEPT_BUCKETS + 1, Math.min(bucket(points[0]!.t), kept?.from ?? hi));
  const totals: TrafficTotals[] = [];
  let j = -1; // its last point at or before the bucket's start
  for (let b = lo; b <= hi; b++) {
    const start = b * HISTORY_INTERVAL_MS;
    while (j + 1 < points.length && points[j + 1]!.t <= start) j++;
    // (add takes the totals only, not the point's time.)
    totals.push(add(j >= 0 ? points[j]! : ZERO, kept ? trafficAt(kept, start) : ZERO));
  }
  return {
    startedAt: kept && kept.startedAt < gone.startedAt ? kept.startedAt : gone.startedAt,
    at: Math.max(at, kept?.at ?? at),
    from: lo,
    totals,
  };
}

/**
 * The times from which the workers gone have figures that the live workers' history does not
 * reach back to (before `before`), no earlier than `since`: the start of each bucket.
 */
export function keptTimes(kept: KeptTraffic, since: number, before: number): number[] {
  const times: number[] = [];
  for (let b = Math.max(kept.from, Math.ceil(since / HISTORY_INTERVAL_MS)); ; b++) {
    const t = b * HISTORY_INTERVAL_MS;
    if (t >= before || times.length >= KEPT_BUCKETS) return times;
    times.push(t);
  }
}
