/**
 * /metrics after real pulls from the real test registry (behind a Docker Hub-like forwarder for
 * its RateLimit headers): hits and misses in pullcache's names and distribution's, bytes served
 * and fetched, upstream requests, the pull limit, an upstream that never answered, stale tags.
 */
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { Registry } from 'prom-client';
import { CellCounter, CellHistogram } from '../../src/metric-cells.js';
import type { Status } from '../../src/status/status.js';
import { HubLike } from '../helpers/hub-like.js';
import { makeImage, pushImage, type Image } from '../helpers/images.js';
import { freePort, waitFor } from '../helpers/net.js';
import { parseMetrics, scrape, sum } from '../helpers/prometheus.js';
import { startPullcache, type TestPullcache } from '../helpers/pullcache.js';
import { Recorder } from '../helpers/recorder.js';
import { TestRegistry } from '../helpers/registry.js';
import { skopeoCopy } from '../helpers/skopeo.js';

const tmp = () => mkdtempSync(join(tmpdir(), 'pullcache-metrics-'));
const bytesOf = (image: Image) => image.blobs.reduce((n, b) => n + b.bytes.length, 0);

describe('metrics after real pulls', () => {
  let registry: TestRegistry;
  let hub: HubLike;
  let pc: TestPullcache;
  let alpine: Image;

  beforeAll(async () => {
    registry = await TestRegistry.start();
    alpine = makeImage('library/alpine', '3.20', 'docker', [300_000, 40_000]);
    await pushImage(registry, alpine);
    hub = await HubLike.start(registry.url);
    pc = await startPullcache({ upstreams: { 'docker.io': { url: hub.url, tagTTL: '1h' } } });
  });
  afterAll(async () => {
    await pc?.stop();
    await hub?.close();
    await registry?.close();
  });

  test('a cold pull counts misses and a warm one hits, in pullcache names and distribution names', async () => {
    await skopeoCopy(pc.host, 'alpine:3.20', tmp());
    const cold = (await scrape(pc.url)).samples;
    const blobs = alpine.blobs.length;
    const blobBytes = bytesOf(alpine);
    expect(sum(cold, 'registry_proxy_misses_total', { type: 'blob' })).toBe(blobs);
    expect(sum(cold, 'registry_proxy_hits_total', { type: 'blob' })).toBe(0);
    expect(sum(cold, 'registry_proxy_pulled_bytes_total', { type: 'blob' })).toBe(blobBytes);
    expect(sum(cold, 'registry_proxy_pushed_bytes_total', { type: 'blob' })).toBe(blobBytes);
    expect(sum(cold, 'registry_proxy_misses_total', { type: 'manifest' })).toBe(1);
    // The proxy layer's lookups: the tag was a miss, and the manifest it brought is no lookup of
    // its own (it was counted a hit of a cold cache).
    expect(sum(cold, 'pullcache_requests_total', { kind: 'tag', cache: 'miss' })).toBe(1);
    expect(sum(cold, 'pullcache_requests_total', { kind: 'manifest' })).toBe(0);
    expect(
      sum(cold, 'pullcache_served_bytes_total', {
        upstream: 'docker.io',
        kind: 'blob',
        cache: 'miss',
      }),
    ).toBe(blobBytes);
    expect(sum(cold, 'pullcache_served_bytes_total', { kind: 'manifest', cache: 'miss' })).toBe(
      alpine.manifest.length,
    );
    // What crossed the upstream link: the blobs and the manifest (a token's few bytes aside).
    expect(sum(cold, 'pullcache_upstream_bytes_total', { upstream: 'docker.io' })).toBe(
      blobBytes + alpine.manifest.length,
    );
    expect(
      sum(cold, 'pullcache_upstream_requests_total', {
        upstream: 'docker.io',
        kind: 'blob',
        status: '200',
      }),
    ).toBe(blobs);
    expect(sum(cold, 'pullcache_upstream_requests_total', { kind: 'token' })).toBeGreaterThan(0);
    expect(sum(cold, 'pullcache_upstream_request_duration_seconds_count', { kind: 'blob' })).toBe(
      blobs,
    );

    await skopeoCopy(pc.host, 'alpine:3.20', tmp());
    const warm = (await scrape(pc.url)).samples;
    expect(sum(warm, 'registry_proxy_hits_total', { type: 'blob' })).toBe(blobs);
    expect(sum(warm, 'registry_proxy_misses_total', { type: 'blob' })).toBe(blobs);
    expect(sum(warm, 'registry_proxy_requests_total', { type: 'blob' })).toBe(2 * blobs);
    // The tag is fresh: its manifest is a hit too, and nothing more was fetched.
    expect(sum(warm, 'registry_proxy_hits_total', { type: 'manifest' })).toBe(1);
    expect(sum(warm, 'pullcache_requests_total', { kind: 'tag', cache: 'hit' })).toBe(1);
    expect(sum(warm, 'pullcache_requests_total', { kind: 'manifest', cache: 'hit' })).toBe(1);
    expect(sum(warm, 'registry_proxy_pulled_bytes_total', { type: 'blob' })).toBe(blobBytes);
    expect(sum(warm, 'pullcache_served_bytes_total', { kind: 'blob', cache: 'hit' })).toBe(
      blobBytes,
    );
    expect(
      sum(warm, 'pullcache_http_requests_total', { kind: 'blob', method: 'GET', status: '200' }),
    ).toBe(2 * blobs);
    expect(
      sum(warm, 'pullcache_http_request_duration_seconds_count', { kind: 'manifest' }),
    ).toBeGreaterThanOrEqual(2);
    // The pull limit Docker Hub reports, as the upstream last sent it.
    expect(sum(warm, 'pullcache_upstream_ratelimit_limit', { upstream: 'docker.io' })).toBe(100);
    expect(sum(warm, 'pullcache_upstream_ratelimit_remaining', { upstream: 'docker.io' })).toBe(
      hub.remaining,
    );
    expect(sum(warm, 'pullcache_upstream_down', { upstream: 'docker.io' })).toBe(0);
    expect(sum(warm, 'pullcache_fetches_in_flight')).toBe(0);
  });

  test('requests pullcache refuses are counted by kind, method and status', async () => {
    const put = await fetch(`${pc.url}/v2/library/alpine/manifests/3.20`, {
      method: 'PUT',
      body: '{}',
    });
    expect(put.status).toBe(405);
    const missing = await fetch(`${pc.url}/v2/library/nothing-here/blobs/sha256:${'0'.repeat(64)}`);
    expect(missing.status).toBe(404);
    const { samples } = await scrape(pc.url);
    expect(
      sum(samples, 'pullcache_http_requests_total', {
        kind: 'manifest',
        method: 'PUT',
        status: '405',
      }),
    ).toBe(1);
    expect(
      sum(samples, 'pullcache_http_requests_total', { kind: 'blob', method: 'GET', status: '404' }),
    ).toBe(1);
    // A 404 from the upstream is an answer, not a failure; HEAD and the 405 add no served bytes.
    expect(sum(samples, 'registry_proxy_requests_total', { type: 'manifest' })).toBe(2);
  });

  test('a 304 (the client has it already) is no GET served and no hit, in the metrics and the status', async () => {
    const hits = async () =>
      ((await (await fetch(`${pc.url}/_pullcache/v1/status`)).json()) as Status).traffic.hits;
    const before = (await scrape(pc.url)).samples;
    const hitsBefore = await hits();
    for (const [path, digest] of [
      ['/v2/library/alpine/manifests/3.20', alpine.digest],
      [`/v2/library/alpine/blobs/${alpine.blobs[1]!.digest}`, alpine.blobs[1]!.digest],
    ] as const) {
      const res = await fetch(`${pc.url}${path}`, {
        headers: { accept: alpine.mediaType, 'if-none-match': `"${digest}"` },
      });
      expect({ path, status: res.status }).toEqual({ path, status: 304 });
    }
    const after = (await scrape(pc.url)).samples;
    for (const name of [
      'registry_proxy_requests_total',
      'registry_proxy_hits_total',
      'registry_proxy_misses_total',
      'pullcache_served_bytes_total',
    ])
      expect({ name, value: sum(after, name) }).toEqual({ name, value: sum(before, name) });
    expect(await hits()).toBe(hitsBefore);
    // Still an answered request.
    for (const kind of ['manifest', 'blob'])
      expect(
        sum(after, 'pullcache_http_requests_total', { kind, method: 'GET', status: '304' }),
      ).toBe(1);
  });
});

describe('upstream health in the metrics', () => {
  test('an upstream that does not answer the start-up greeting is down until it answers', async () => {
    const registry = await TestRegistry.start();
    const port = await freePort();
    const pc = await startPullcache({
      upstreams: { 'docker.io': { url: `http://127.0.0.1:${port}`, tagTTL: '1s' } },
    });
    let recorder: Recorder | undefined;
    try {
      const down = async () => sum((await scrape(pc.url)).samples, 'pullcache_upstream_down');
      await waitFor(async () => (await down()) === 1, 'upstream_down 1 after the greeting');
      const image = makeImage('org/app', 'v1', 'oci', [2000]);
      await pushImage(registry, image);
      recorder = await Recorder.start(registry.url, port);
      await skopeoCopy(pc.host, 'org/app:v1', tmp());
      expect(await down()).toBe(0);

      // Past its tagTTL with the upstream gone: served stale, and counted.
      await recorder.down();
      await new Promise((r) => setTimeout(r, 1100));
      expect((await fetch(`${pc.url}/v2/org/app/manifests/v1`)).status).toBe(200);
      const { samples } = await scrape(pc.url);
      expect(sum(samples, 'pullcache_stale_served_total', { kind: 'tag' })).toBe(1);
      expect(
        sum(samples, 'pullcache_upstream_requests_total', {
          upstream: 'docker.io',
          status: 'error',
        }),
      ).toBeGreaterThan(0);
    } finally {
      await pc.stop();
      await recorder?.close();
      await registry.close();
    }
  });
});

describe('metric cells', () => {
  test('print as prom-client prints counters and histograms, buckets cumulative', async () => {
    const registry = new Registry();
    const counter = new CellCounter({
      name: 't_total',
      help: 'h',
      labelNames: ['a', 'b'] as const,
      registry,
    });
    const histogram = new CellHistogram({
      name: 't_seconds',
      help: 'h',
      labelNames: ['k'] as const,
      buckets: [0.1, 1],
      registry,
    });
    counter.cell('x', 200).value += 3;
    counter.cell('x', 200).value++;
    const h = histogram.cell('blob');
    h.observe(0.05);
    h.observe(0.5);
    h.observe(5);
    const samples = parseMetrics(await registry.metrics());
    expect(samples).toEqual([
      { name: 't_total', labels: { a: 'x', b: '200' }, value: 4 },
      { name: 't_seconds_bucket', labels: { k: 'blob', le: '0.1' }, value: 1 },
      { name: 't_seconds_bucket', labels: { k: 'blob', le: '1' }, value: 2 },
      { name: 't_seconds_bucket', labels: { k: 'blob', le: '+Inf' }, value: 3 },
      { name: 't_seconds_sum', labels: { k: 'blob' }, value: 5.55 },
      { name: 't_seconds_count', labels: { k: 'blob' }, value: 3 },
    ]);
  });
});
