/**
 * A circuit breaker per upstream. After `threshold` consecutive connection failures the upstream
 * is "open": requests fail at once for an interval that doubles on each failed probe (up to
 * `maxInterval`), with one probe request let through at a time once it passes. The first
 * success closes it.
 */
export type HealthState = 'closed' | 'open' | 'half-open';

export interface HealthOptions {
  threshold?: number;
  baseInterval?: number;
  maxInterval?: number;
  now?: () => number;
}

export class UpstreamHealth {
  private failures = 0;
  private openUntil = 0;
  private interval: number;
  private probing = false;
  private readonly threshold: number;
  private readonly baseInterval: number;
  private readonly maxInterval: number;
  private readonly now: () => number;

  constructor(options: HealthOptions = {}) {
    this.threshold = options.threshold ?? 3;
    this.baseInterval = options.baseInterval ?? 1000;
    this.maxInterval = options.maxInterval ?? 30_000;
    this.interval = this.baseInterval;
    this.now = options.now ?? Date.now;
  }

  get state(): HealthState {
    if (this.failures < this.threshold) return 'closed';
    return this.now() < this.openUntil || this.probing ? 'open' : 'half-open';
  }

  /** True when the upstream is known to be down right now (a request would fail fast). */
  get down(): boolean {
    return this.failures >= this.threshold;
  }

  /**
   * Asks to send a request: false when it must fail fast. When true while open, the request is
   * the one probe; it must end with success(), failure() or release().
   */
  admit(): boolean {
    if (this.failures < this.threshold) return true;
    if (this.now() < this.openUntil || this.probing) return false;
    this.probing = true;
    return true;
  }

  success(): void {
    this.failures = 0;
    this.probing = false;
    this.interval = this.baseInterval;
  }

  failure(): void {
    this.failures++;
    if (this.failures >= this.threshold) {
      if (this.probing) this.interval = Math.min(this.interval * 2, this.maxInterval);
      this.openUntil = this.now() + this.interval;
    }
    this.probing = false;
  }

  /** Ends a probe that got neither a success nor a connection failure. */
  release(): void {
    this.probing = false;
  }
}
