/** Prometheus metrics (prom-client), one registry per server so tests can run several. */
export interface UpstreamStatus {
  upstream: string;
  down: boolean;
  rateLimitRemaining?: number | undefined;
}

import { Counter, Gauge, Registry, collectDefaultMetrics } from 'prom-client';

export interface StorageStatus {
  /** Undefined until the start-up scan has counted storage. */
  bytes: number | undefined;
  limit: number;
}

export class Metrics {
  readonly registry = new Registry();
  readonly requests = new Counter({
    name: 'pullcache_requests_total',
    help: 'Registry API requests by kind and cache result',
    labelNames: ['upstream', 'kind', 'cache'] as const,
    registers: [this.registry],
  });
  readonly upstreamBytes = new Counter({
    name: 'pullcache_upstream_blob_bytes_total',
    help: 'Blob bytes received from upstreams',
    labelNames: ['upstream'] as const,
    registers: [this.registry],
  });
  readonly staleServed = new Counter({
    name: 'pullcache_stale_tags_served_total',
    help: 'Tags served past their freshness window because the upstream failed or is offline',
    labelNames: ['upstream', 'reason'] as const,
    registers: [this.registry],
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

  /** Where the storage gauges read their values (the lifecycle, once it exists). */
  setStorageStatus(status: () => StorageStatus): void {
    this.storageStatus = status;
  }

  constructor(options: { defaults?: boolean; status?: () => UpstreamStatus[] } = {}) {
    // eslint-disable-next-line @typescript-eslint/no-this-alias
    const metrics = this;
    new Gauge({
      name: 'pullcache_storage_bytes',
      help: 'Bytes of content in storage (blobs and manifests), once the start-up scan is done',
      registers: [this.registry],
      collect() {
        const { bytes } = metrics.storageStatus();
        if (bytes !== undefined) this.set(bytes);
      },
    });
    new Gauge({
      name: 'pullcache_storage_limit_bytes',
      help: 'retention.maxSize: most bytes of content kept; 0 when there is no limit',
      registers: [this.registry],
      collect() {
        this.set(metrics.storageStatus().limit);
      },
    });
    if (options.defaults) collectDefaultMetrics({ register: this.registry });
    const status = options.status ?? (() => []);
    new Gauge({
      name: 'pullcache_upstream_ratelimit_remaining',
      help: 'The last RateLimit-Remaining an upstream sent',
      labelNames: ['upstream'] as const,
      registers: [this.registry],
      collect() {
        for (const s of status())
          if (s.rateLimitRemaining !== undefined)
            this.set({ upstream: s.upstream }, s.rateLimitRemaining);
      },
    });
    new Gauge({
      name: 'pullcache_upstream_down',
      help: '1 while pullcache fails fast for an upstream (unreachable or offline)',
      labelNames: ['upstream'] as const,
      registers: [this.registry],
      collect() {
        for (const s of status()) this.set({ upstream: s.upstream }, s.down ? 1 : 0);
      },
    });
  }
}
