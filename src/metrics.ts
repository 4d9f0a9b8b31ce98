/** Prometheus metrics (prom-client), one registry per server so tests can run several. */
export interface UpstreamStatus {
  upstream: string;
  down: boolean;
  rateLimitRemaining?: number | undefined;
}

import { Counter, Gauge, Registry, collectDefaultMetrics } from 'prom-client';

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

  constructor(options: { defaults?: boolean; status?: () => UpstreamStatus[] } = {}) {
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
