/**
 * Prometheus metrics (prom-client), one registry per server so tests can run several. The names
 * are settled (docs/metrics.md lists them with their meaning); the series a request adds to are
 * cells bound once to their labels (metric-cells.ts), so the hot paths pay an addition each.
 */
import { Counter, Gauge, Registry, collectDefaultMetrics } from 'prom-client';
import {
  CellCounter,
  CellHistogram,
  type CounterCell,
  type HistogramCell,
} from './metric-cells.js';

export interface UpstreamStatus {
  upstream: string;
  down: boolean;
  rateLimitRemaining?: number | undefined;
  rateLimitLimit?: number | undefined;
}

export interface StorageStatus {
  /** Undefined until the start-up scan has counted storage. */
  bytes: number | undefined;
  limit: number;
}

/** What a client request is, for `pullcache_http_*`. */
export type HttpKind = 'manifest' | 'blob' | 'tags' | 'catalog' | 'other';
/** What pullcache asked an upstream for, for `pullcache_upstream_*`. */
export type UpstreamKind = 'manifest' | 'blob' | 'tags' | 'referrers' | 'token' | 'ping';
/** Content served from the cache or the upstream: the kinds of distribution's proxy metrics. */
export type ContentKind = 'manifest' | 'blob';

/** The cells one served manifest or blob adds to, bound once per upstream and kind. */
export interface ServedCells {
  hitBytes: CounterCell;
  missBytes: CounterCell;
  proxyRequests: CounterCell;
  proxyHits: CounterCell;
  proxyMisses: CounterCell;
  proxyPushed: CounterCell;
}

/** What following other replicas' fetches adds to (`pullcache_peer_*`). */
export interface PeerCells {
  bytes: CounterCell;
  /** Followed fetches by result. */
  whole: CounterCell;
  cut: CounterCell;
  unavailable: CounterCell;
}

/** The cells of one kind of client request with one method; `status` cells made as they come. */
export class HttpCells {
  private readonly statuses = new Map<number, CounterCell>();
  constructor(
    private readonly counter: CellCounter<'kind' | 'method' | 'status'>,
    private readonly kind: HttpKind,
    private readonly method: string,
    readonly duration: HistogramCell,
  ) {}

  status(code: number): CounterCell {
    let cell = this.statuses.get(code);
    if (!cell) {
      cell = this.counter.cell(this.kind, this.method, code);
      this.statuses.set(code, cell);
    }
    return cell;
  }
}

/** Sums since start, for the status page and its history. */
export interface TrafficTotals {
  /** Manifests and blobs served from the cache, and from the upstream. */
  hits: number;
  misses: number;
  /** Their bytes. */
  hitBytes: number;
  missBytes: number;
  /** Every byte received from the upstreams (manifests, blobs, tag lists, referrers; no tokens). */
  upstreamBytes: number;
}

/** Seconds; blobs may take minutes. */
const DURATION_BUCKETS = [
  0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300,
];

export class Metrics {
  readonly registry = new Registry();
  /** The proxy layer's lookups by result (tags revalidated included). */
  readonly requests = new Counter({
    name: 'pullcache_requests_total',
    help: 'Lookups of the proxy layer by kind and result: hit, miss, revalidate (tags, referrers)',
    labelNames: ['upstream', 'kind', 'cache'] as const,
    registers: [this.registry],
  });
  readonly staleServed = new Counter({
    name: 'pullcache_stale_served_total',
    help: 'Tags and referrers served past their freshness window because the upstream failed (error) or is known down (down)',
    labelNames: ['upstream', 'kind', 'reason'] as const,
    registers: [this.registry],
  });

  readonly httpRequests = new CellCounter({
    name: 'pullcache_http_requests_total',
    help: 'Client requests answered, by kind (manifest, blob, tags, catalog, other), method and status',
    labelNames: ['kind', 'method', 'status'] as const,
    registry: this.registry,
  });
  readonly httpDuration = new CellHistogram({
    name: 'pullcache_http_request_duration_seconds',
    help: 'Time from a client request to the end of its answer, by kind',
    labelNames: ['kind'] as const,
    buckets: DURATION_BUCKETS,
    registry: this.registry,
  });
  readonly servedBytes = new CellCounter({
    name: 'pullcache_served_bytes_total',
    help: 'Manifest and blob bytes sent to clients, by upstream, kind and cache (hit: from storage, miss: fetched from the upstream)',
    labelNames: ['upstream', 'kind', 'cache'] as const,
    registry: this.registry,
  });
  readonly upstreamBytes = new CellCounter({
    name: 'pullcache_upstream_bytes_total',
    help: 'Bytes received from each upstream (blobs, manifests, tag lists, referrers)',
    labelNames: ['upstream'] as const,
    registry: this.registry,
  });
  readonly upstreamRequests = new CellCounter({
    name: 'pullcache_upstream_requests_total',
    help: 'Requests to each upstream by kind and status (error: no answer)',
    labelNames: ['upstream', 'kind', 'status'] as const,
    registry: this.registry,
  });
  readonly upstreamDuration = new CellHistogram({
    name: 'pullcache_upstream_request_duration_seconds',
    help: "Time from a request to an upstream to its answer's headers",
    labelNames: ['upstream', 'kind'] as const,
    buckets: DURATION_BUCKETS,
    registry: this.registry,
  });

  readonly peerBytes = new CellCounter({
    name: 'pullcache_peer_bytes_total',
    help: 'Blob bytes received from other replicas, following their upstream fetches',
    labelNames: ['upstream'] as const,
    registry: this.registry,
  });
  readonly peerFollows = new CellCounter({
    name: 'pullcache_peer_follows_total',
    help: 'Blob fetches that asked the replica fetching the blob, by result: whole (streamed and verified), cut (ended before it was whole: the peer failed, or this replica stopped), unavailable (fetched from the upstream instead)',
    labelNames: ['upstream', 'result'] as const,
    registry: this.registry,
  });

  // distribution v3's proxy metrics (registry/proxy/proxymetrics.go), with its meaning.
  private readonly proxyRequests = new CellCounter({
    name: 'registry_proxy_requests_total',
    help: 'The number of total incoming proxy request received (GETs of manifests and blobs)',
    labelNames: ['type'] as const,
    registry: this.registry,
  });
  private readonly proxyHits = new CellCounter({
    name: 'registry_proxy_hits_total',
    help: 'The number of total proxy request hits (served from storage)',
    labelNames: ['type'] as const,
    registry: this.registry,
  });
  private readonly proxyMisses = new CellCounter({
    name: 'registry_proxy_misses_total',
    help: 'The number of total proxy request misses (served from the upstream)',
    labelNames: ['type'] as const,
    registry: this.registry,
  });
  private readonly proxyPulled = new CellCounter({
    name: 'registry_proxy_pulled_bytes_total',
    help: 'The size of total bytes pulled from the upstream',
    labelNames: ['type'] as const,
    registry: this.registry,
  });
  private readonly proxyPushed = new CellCounter({
    name: 'registry_proxy_pushed_bytes_total',
    help: 'The size of total bytes pushed to the client',
    labelNames: ['type'] as const,
    registry: this.registry,
  });

  readonly evictions = new Counter({
    name: 'pullcache_evictions_total',
    help: 'Images and blobs evicted, by reason: size (the budget), unused (retention.unusedFor), manual (rm)',
    labelNames: ['reason'] as const,
    registers: [this.registry],
  });
  readonly evictedBytes = new Counter({
    name: 'pullcache_evicted_bytes_total',
    help: 'Bytes removed from storage by evictions',
    registers: [this.registry],
  });
  readonly gcRuns = new Counter({
    name: 'pullcache_gc_runs_total',
    help: 'Garbage collections run (the sweep and pullcache gc)',
    registers: [this.registry],
  });
  private storageStatus: () => StorageStatus = () => ({ bytes: undefined, limit: 0 });
  private fetchesInFlight: () => number = () => 0;
  private readonly served = new Map<string, ServedCells>();
  private readonly http = new Map<string, HttpCells>();

  /** Where the storage gauges read their values (the lifecycle, once it exists). */
  setStorageStatus(status: () => StorageStatus): void {
    this.storageStatus = status;
  }

  /** Where `pullcache_fetches_in_flight` reads its value. */
  setFetchesInFlight(count: () => number): void {
    this.fetchesInFlight = count;
  }

  constructor(options: { defaults?: boolean; status?: () => UpstreamStatus[] } = {}) {
    // eslint-disable-next-line @typescript-eslint/no-this-alias
    const metrics = this;
    // As distribution does: both types are there from the start, at 0.
    for (const type of ['blob', 'manifest'] as const) {
      for (const counter of [
        this.proxyRequests,
        this.proxyHits,
        this.proxyMisses,
        this.proxyPulled,
        this.proxyPushed,
      ])
        counter.cell(type);
    }
    new Gauge({
      name: 'pullcache_storage_bytes',
      aggregator: 'max',
      help: 'Bytes of content in storage (blobs and manifests), once the start-up scan is done',
      registers: [this.registry],
      collect() {
        const { bytes } = metrics.storageStatus();
        if (bytes !== undefined) this.set(bytes);
      },
    });
    new Gauge({
      name: 'pullcache_storage_limit_bytes',
      aggregator: 'max',
      help: 'retention.maxSize: most bytes of content kept; 0 when there is no limit',
      registers: [this.registry],
      collect() {
        this.set(metrics.storageStatus().limit);
      },
    });
    new Gauge({
      name: 'pullcache_fetches_in_flight',
      help: 'Blobs being fetched from upstreams now (each once, however many clients follow it)',
      registers: [this.registry],
      collect() {
        this.set(metrics.fetchesInFlight());
      },
    });
    if (options.defaults) collectDefaultMetrics({ register: this.registry });
    const status = options.status ?? (() => []);
    new Gauge({
      name: 'pullcache_upstream_ratelimit_remaining',
      aggregator: 'min',
      help: 'The last RateLimit-Remaining an upstream sent (pulls left in its window)',
      labelNames: ['upstream'] as const,
      registers: [this.registry],
      collect() {
        for (const s of status())
          if (s.rateLimitRemaining !== undefined)
            this.set({ upstream: s.upstream }, s.rateLimitRemaining);
      },
    });
    new Gauge({
      name: 'pullcache_upstream_ratelimit_limit',
      aggregator: 'max',
      help: 'The last RateLimit-Limit an upstream sent (pulls allowed in its window)',
      labelNames: ['upstream'] as const,
      registers: [this.registry],
      collect() {
        for (const s of status())
          if (s.rateLimitLimit !== undefined) this.set({ upstream: s.upstream }, s.rateLimitLimit);
      },
    });
    new Gauge({
      name: 'pullcache_upstream_down',
      aggregator: 'max',
      help: '1 while an upstream is taken as down: failing fast, offline, or unanswered at start-up until it answers',
      labelNames: ['upstream'] as const,
      registers: [this.registry],
      collect() {
        for (const s of status()) this.set({ upstream: s.upstream }, s.down ? 1 : 0);
      },
    });
  }

  /** The cells of client requests of one kind and method. */
  httpCells(kind: HttpKind, method: string): HttpCells {
    const key = `${kind} ${method}`;
    let cells = this.http.get(key);
    if (!cells) {
      cells = new HttpCells(this.httpRequests, kind, method, this.httpDuration.cell(kind));
      this.http.set(key, cells);
    }
    return cells;
  }

  /** The cells a manifest or blob served for `upstream` adds to. */
  servedCells(upstream: string, kind: ContentKind): ServedCells {
    const key = `${upstream} ${kind}`;
    let cells = this.served.get(key);
    if (!cells) {
      cells = {
        hitBytes: this.servedBytes.cell(upstream, kind, 'hit'),
        missBytes: this.servedBytes.cell(upstream, kind, 'miss'),
        proxyRequests: this.proxyRequests.cell(kind),
        proxyHits: this.proxyHits.cell(kind),
        proxyMisses: this.proxyMisses.cell(kind),
        proxyPushed: this.proxyPushed.cell(kind),
      };
      this.served.set(key, cells);
    }
    return cells;
  }

  /** The cells a blob source that follows other replicas adds to, for `upstream`. */
  peerCells(upstream: string): PeerCells {
    return {
      bytes: this.peerBytes.cell(upstream),
      whole: this.peerFollows.cell(upstream, 'whole'),
      cut: this.peerFollows.cell(upstream, 'cut'),
      unavailable: this.peerFollows.cell(upstream, 'unavailable'),
    };
  }

  /** The cell of bytes pulled from upstreams, by distribution's type. */
  pulledCell(kind: ContentKind): CounterCell {
    return this.proxyPulled.cell(kind);
  }

  /** Sums since start, for the status page. */
  traffic(): TrafficTotals {
    const totals: TrafficTotals = {
      hits: 0,
      misses: 0,
      hitBytes: 0,
      missBytes: 0,
      upstreamBytes: 0,
    };
    for (const [labels, cell] of this.servedBytes.entries()) {
      if (labels.cache === 'hit') totals.hitBytes += cell.value;
      else totals.missBytes += cell.value;
    }
    for (const [, cell] of this.proxyHits.entries()) totals.hits += cell.value;
    for (const [, cell] of this.proxyMisses.entries()) totals.misses += cell.value;
    for (const [, cell] of this.upstreamBytes.entries()) totals.upstreamBytes += cell.value;
    return totals;
  }
}

/** Adds one GET of a manifest or blob answered with its content to the served metrics. */
export function countServed(cells: ServedCells, hit: boolean, bytes: number): void {
  cells.proxyRequests.value++;
  cells.proxyPushed.value += bytes;
  if (hit) {
    cells.proxyHits.value++;
    cells.hitBytes.value += bytes;
  } else {
    cells.proxyMisses.value++;
    cells.missBytes.value += bytes;
  }
}
