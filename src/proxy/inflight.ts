/**
 * The blob fetches in flight, by digest: one per digest, shared by every upstream's blob store
 * (so a digest is fetched once), and what the status page and `pullcache_fetches_in_flight` see
 * of them, without reaching into the proxy.
 */
import type { Digest } from '../oci/digest.js';

/** One fetch as people see it. */
export interface FetchProgress {
  digest: Digest;
  upstream: string;
  repository: string;
  /** Bytes in all; undefined when the upstream did not say. */
  size: number | undefined;
  received: number;
  /** Over the last second or so; the average since the start for a fetch younger than that. */
  bytesPerSecond: number;
  /** Clients following it now. */
  clients: number;
  /**
   * Where the bytes come from: the upstream, or another replica fetching the blob (a worker
   * following another worker of its host shows as that one's fetch, in the host's status).
   */
  from: 'upstream' | 'replica';
  /** ms since epoch. */
  startedAt: number;
}

/** What the map holds: any fetch (made here, or followed from another process). */
export interface TrackedFetch {
  readonly digest: Digest;
  readonly repo: { upstream: string; repository: string };
  readonly size: number | undefined;
  readonly state: string;
  /**
   * False while the fetch follows another process's (a worker of the host, or another replica);
   * absent on a fetch that is always this process's own.
   */
  readonly local?: boolean;
}

/** What a fetch may tell of its progress; BlobFetch does. */
interface Progressing {
  readonly received: number;
  readonly clients: number;
  readonly startedAt: number;
}

const isProgressing = (f: object): f is Progressing =>
  typeof (f as Partial<Progressing>).received === 'number' &&
  typeof (f as Partial<Progressing>).clients === 'number' &&
  typeof (f as Partial<Progressing>).startedAt === 'number';

const isRunning = (f: TrackedFetch) => f.state === 'starting' || f.state === 'running';

/** How long a rate sample lasts before the next one replaces it. */
const RATE_WINDOW_MS = 1000;

export class InflightFetches<F extends TrackedFetch = TrackedFetch> extends Map<Digest, F> {
  private readonly samples = new WeakMap<F, { at: number; received: number; rate: number }>();
  /** When a fetch that tells no start time was first seen here. */
  private readonly seen = new WeakMap<F, number>();

  /**
   * Fetches this process is making and still running (settled ones leave the map a moment
   * after). One that follows another worker's or replica's is that one's to count: `/metrics`
   * with `server.workers` adds the workers' counts up, and a dashboard the replicas'.
   */
  running(): number {
    let n = 0;
    for (const fetch of this.values()) if (isRunning(fetch) && fetch.local !== false) n++;
    return n;
  }

  /** Every fetch still running, oldest first. */
  progress(now = Date.now()): FetchProgress[] {
    const out: FetchProgress[] = [];
    for (const fetch of this.values()) {
      if (!isRunning(fetch)) continue;
      const p = isProgressing(fetch) ? fetch : undefined;
      let startedAt = p?.startedAt ?? this.seen.get(fetch);
      if (startedAt === undefined) this.seen.set(fetch, (startedAt = now));
      out.push({
        digest: fetch.digest,
        upstream: fetch.repo.upstream,
        repository: fetch.repo.repository,
        size: fetch.size,
        received: p?.received ?? 0,
        bytesPerSecond: p ? this.rate(fetch, p, now) : 0,
        clients: p?.clients ?? 0,
        from: fetch.local === false ? 'replica' : 'upstream',
        startedAt,
      });
    }
    return out.sort((a, b) => a.startedAt - b.startedAt);
  }

  private rate(fetch: F, p: Progressing, now: number): number {
    const sample = this.samples.get(fetch);
    if (!sample) {
      const rate = (p.received * 1000) / Math.max(now - p.startedAt, 1);
      this.samples.set(fetch, { at: now, received: p.received, rate });
      return Math.round(rate);
    }
    if (now - sample.at >= RATE_WINDOW_MS) {
      sample.rate = ((p.received - sample.received) * 1000) / (now - sample.at);
      sample.at = now;
      sample.received = p.received;
    }
    return Math.round(sample.rate);
  }
}
