/**
 * The Grafana dashboard in deploy/grafana/ queries only metrics pullcache exports: every metric
 * name in its PromQL is compared with a real /metrics after a real pull.
 */
import { mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { expect, test } from 'vitest';
import { makeImage, pushImage } from '../helpers/images.js';
import { metricNames } from '../helpers/prometheus.js';
import { startPullcache } from '../helpers/pullcache.js';
import { TestRegistry } from '../helpers/registry.js';
import { skopeoCopy } from '../helpers/skopeo.js';

interface Panel {
  type: string;
  title: string;
  targets?: { expr: string }[];
  panels?: Panel[];
}

/** PromQL's functions, aggregations and keywords: names that are no metric. */
const PROMQL_WORDS = new Set([
  'sum',
  'min',
  'max',
  'avg',
  'count',
  'by',
  'without',
  'on',
  'ignoring',
  'group_left',
  'group_right',
  'and',
  'or',
  'unless',
  'offset',
  'bool',
  'rate',
  'irate',
  'increase',
  'delta',
  'histogram_quantile',
  'clamp_min',
  'topk',
  'inf',
  'nan',
]);

/** The metric names a PromQL expression selects. */
function metricsOf(expr: string): string[] {
  const stripped = expr
    .replace(/"(?:[^"\\]|\\.)*"/g, '""') // label values
    .replace(/\{[^}]*\}/g, '') // label matchers
    .replace(/\[[^\]]*\]/g, '') // ranges: [5m], [$__rate_interval]
    .replace(/\b(by|without|on|ignoring)\s*\([^)]*\)/g, ''); // grouping labels
  const names = new Set<string>();
  for (const m of stripped.matchAll(/(?<![\w$])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?/g)) {
    if (m[2] || PROMQL_WORDS.has(m[1]!.toLowerCase())) continue; // a function call or keyword
    names.add(m[1]!);
  }
  return [...names];
}

function exprs(panels: Panel[]): { title: string; expr: string }[] {
  return panels.flatMap((p) => [
    ...(p.targets ?? []).map((t) => ({ title: p.title, expr: t.expr })),
    ...exprs(p.panels ?? []),
  ]);
}

test('PromQL metric names are read as a scraper reads them', () => {
  expect(
    metricsOf(
      'histogram_quantile(0.95, sum by (le, kind) (rate(pullcache_http_request_duration_seconds_bucket{kind!="other"}[$__rate_interval])))',
    ),
  ).toEqual(['pullcache_http_request_duration_seconds_bucket']);
  expect(
    metricsOf(
      'sum(rate(a_total{cache="hit"}[5m])) / sum(rate(b_total[5m])) - sum(increase(c[$__range]))',
    ),
  ).toEqual(['a_total', 'b_total', 'c']);
});

test('every metric the Grafana dashboard queries is one pullcache exports', async () => {
  const dashboard = JSON.parse(readFileSync('deploy/grafana/pullcache.json', 'utf8')) as {
    panels: Panel[];
  };
  const queries = exprs(dashboard.panels);
  expect(queries.length).toBeGreaterThan(20);

  const registry = await TestRegistry.start();
  const pc = await startPullcache({ upstreams: { 'docker.io': { url: registry.url } } });
  try {
    await pushImage(registry, makeImage('org/app', 'v1', 'oci', [5000]));
    await skopeoCopy(pc.host, 'org/app:v1', mkdtempSync(join(tmpdir(), 'pullcache-dash-')));
    const text = await (await fetch(`${pc.url}/metrics`)).text();
    const exported = metricNames(text);
    // A histogram is queried by its series.
    for (const name of [...exported])
      if (new RegExp(`^# TYPE ${name} histogram$`, 'm').test(text))
        for (const suffix of ['_bucket', '_sum', '_count']) exported.add(`${name}${suffix}`);
    const unknown = queries.flatMap(({ title, expr }) =>
      metricsOf(expr)
        .filter((name) => !exported.has(name))
        .map((name) => `${title}: ${name}`),
    );
    expect(unknown).toEqual([]);
    // And the settled names are all there to be charted.
    for (const name of [
      'pullcache_http_requests_total',
      'pullcache_served_bytes_total',
      'pullcache_upstream_bytes_total',
      'pullcache_upstream_requests_total',
      'pullcache_upstream_ratelimit_remaining',
      'pullcache_upstream_ratelimit_limit',
      'pullcache_upstream_down',
      'pullcache_fetches_in_flight',
      'pullcache_stale_served_total',
      'registry_proxy_requests_total',
      'registry_proxy_hits_total',
      'registry_proxy_misses_total',
      'registry_proxy_pulled_bytes_total',
      'registry_proxy_pushed_bytes_total',
    ])
      expect(
        queries.some(({ expr }) => metricsOf(expr).includes(name)),
        name,
      ).toBe(true);
  } finally {
    await pc.stop();
    await registry.close();
  }
});
