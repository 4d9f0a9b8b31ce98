/**
 * The last hour of traffic for the status page's chart: the traffic totals sampled every ten
 * seconds into a ring of 360 points. Points are totals since start (the page charts the
 * differences), so a missed sample loses no bytes, only resolution.
 */
import type { TrafficTotals } from '../metrics.js';

export interface TrafficPoint extends TrafficTotals {
  /** ms since epoch. */
  t: number;
}

/** A process's traffic: when it started, and its history (oldest first, now last). */
export interface OwnTraffic {
  /** ISO 8601. */
  startedAt: string;
  points: TrafficPoint[];
}

export const HISTORY_INTERVAL_MS = 10_000;
const HISTORY_POINTS = 360;

export class TrafficHistory {
  private readonly ring: TrafficPoint[] = [];
  private timer: NodeJS.Timeout | undefined;

  constructor(
    private readonly totals: () => TrafficTotals,
    private readonly interval = HISTORY_INTERVAL_MS,
  ) {}

  start(): void {
    this.sample();
    this.timer = setInterval(() => this.sample(), this.interval);
    this.timer.unref();
  }

  stop(): void {
    clearInterval(this.timer);
  }

  sample(now = Date.now()): void {
    this.ring.push({ t: now, ...this.totals() });
    if (this.ring.length > HISTORY_POINTS + 1) this.ring.shift();
  }

  /** Oldest first, with the totals of this moment as the last point. */
  points(now = Date.now()): TrafficPoint[] {
    return [...this.ring, { t: now, ...this.totals() }];
  }
}
