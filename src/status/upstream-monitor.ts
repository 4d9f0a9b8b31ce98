/**
 * One upstream's traffic as the metrics and the status page see it: the client tells it of every
 * request, byte and failure (UpstreamObserver), and it adds them to cells bound once to the
 * upstream's labels, keeps a running latency, and passes failures on to the recent events.
 */
import type { Metrics } from '../metrics.js';
import type { CounterCell, HistogramCell } from '../metric-cells.js';
import type { UpstreamObserver, UpstreamRequestKind } from '../upstream/types.js';
import type { RecentEvents } from './events.js';

/** Weight of the newest request in the running latency. */
const LATENCY_WEIGHT = 0.2;

export class UpstreamMonitor implements UpstreamObserver {
  /** A running average of the time to an answer's headers, seconds; undefined before any. */
  latency: number | undefined;
  /** ms since epoch of the last answer (any status), and of the last failure. */
  lastAnswerAt: number | undefined;
  lastFailure:
    { at: number; what: string; reason: string; repositories: readonly string[] } | undefined;
  /** The start-up greeting; undefined until it ends (or for an offline upstream). */
  greeting: { ok: true; status: number; auth: string } | { ok: false; reason: string } | undefined;
  private unansweredSinceGreeting = false;
  private readonly bytes: CounterCell;
  private readonly pulled: Record<'blob' | 'manifest', CounterCell>;
  private readonly requests = new Map<string, CounterCell>();
  private readonly durations = new Map<UpstreamRequestKind, HistogramCell>();

  constructor(
    readonly upstream: string,
    private readonly metrics: Metrics,
    private readonly events: RecentEvents,
  ) {
    this.bytes = metrics.upstreamBytes.cell(upstream);
    this.pulled = { blob: metrics.pulledCell('blob'), manifest: metrics.pulledCell('manifest') };
  }

  /** True from a greeting that got no answer until the upstream answers a request. */
  get unreachable(): boolean {
    return this.unansweredSinceGreeting;
  }

  request(kind: UpstreamRequestKind, status: number | 'error', seconds: number): void {
    const key = `${kind} ${status}`;
    let cell = this.requests.get(key);
    if (!cell) {
      cell = this.metrics.upstreamRequests.cell(this.upstream, kind, status);
      this.requests.set(key, cell);
    }
    cell.value++;
    let duration = this.durations.get(kind);
    if (!duration) {
      duration = this.metrics.upstreamDuration.cell(this.upstream, kind);
      this.durations.set(kind, duration);
    }
    duration.observe(seconds);
    if (status === 'error') return;
    this.lastAnswerAt = Date.now();
    this.unansweredSinceGreeting = false;
    this.latency =
      this.latency === undefined
        ? seconds
        : this.latency + LATENCY_WEIGHT * (seconds - this.latency);
  }

  received(kind: UpstreamRequestKind, bytes: number): void {
    this.bytes.value += bytes;
    if (kind === 'blob' || kind === 'manifest') this.pulled[kind].value += bytes;
  }

  failed(what: string, reason: string, repositories: readonly string[]): void {
    this.lastFailure = { at: Date.now(), what, reason, repositories };
    this.events.upstreamFailed(this.upstream, what, reason, repositories);
  }

  greeted(result: UpstreamMonitor['greeting'] & object): void {
    this.greeting = result;
    if (!result.ok) {
      this.unansweredSinceGreeting = true;
      this.failed('GET /v2/ at start-up', result.reason, []);
    }
  }
}
