/**
 * The status page in a real browser: Debian's chromium driven by playwright-core, against a
 * pullcache holding real content pulled from the real test registry (behind a Docker Hub-like
 * forwarder for its pull limit and a slow path for one large blob). Screenshots are kept in
 * test-results/status-page/ (the path is printed).
 */
import { mkdirSync, mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { chromium, type Browser, type Page } from 'playwright-core';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { HubLike } from '../helpers/hub-like.js';
import { makeImage, pushImage, type Image } from '../helpers/images.js';
import { freePort } from '../helpers/net.js';
import { scrape, sum } from '../helpers/prometheus.js';
import { startPullcache, type TestPullcache } from '../helpers/pullcache.js';
import { TestRegistry } from '../helpers/registry.js';
import { skopeoCopy } from '../helpers/skopeo.js';

const SHOTS = resolve('test-results/status-page');
const tmp = () => mkdtempSync(join(tmpdir(), 'pullcache-page-'));

describe('the status page in chromium', () => {
  let registry: TestRegistry;
  let hub: HubLike;
  let pc: TestPullcache;
  let browser: Browser;
  let page: Page;
  const problems: string[] = [];
  const images: Image[] = [];
  let big: Image;

  beforeAll(async () => {
    mkdirSync(SHOTS, { recursive: true });
    console.log(`status page screenshots: ${SHOTS}`);
    registry = await TestRegistry.start();
    images.push(
      makeImage('library/alpine', '3.20', 'docker', [400_000, 30_000]),
      makeImage('library/node', '22', 'oci', [900_000, 200_000, 50_000]),
      makeImage('org/app', 'v1', 'oci', [120_000]),
      makeImage('org/tool', 'v2', 'docker', [60_000, 10_000]),
    );
    big = makeImage('org/big', 'v1', 'oci', [12 * 1024 * 1024]);
    for (const image of [...images, big]) await pushImage(registry, image);
    hub = await HubLike.start(registry.url);
    pc = await startPullcache({
      upstreams: {
        'docker.io': { url: hub.url, tagTTL: '1h' },
        // Nothing listens there: its greeting fails, and the page says so.
        'quay.io': { url: `http://127.0.0.1:${await freePort()}`, timeouts: { connect: '1s' } },
      },
      routing: { default: 'docker.io' },
      retention: { maxSize: '1GiB' },
    });
    for (const image of images)
      await skopeoCopy(pc.host, `${image.repository}:${image.tag}`, tmp());
    await skopeoCopy(pc.host, 'alpine:3.20', tmp()); // hits
    // A push is refused, and said why.
    await fetch(`${pc.url}/v2/org/app/manifests/v9`, { method: 'PUT', body: '{}' });

    browser = await chromium.launch({
      executablePath: '/usr/bin/chromium',
      args: ['--no-sandbox', '--disable-background-networking'],
    });
    page = await browser.newPage({ viewport: { width: 1280, height: 1400 } });
    page.on('console', (m) => {
      if (m.type() === 'error') problems.push(`console: ${m.text()}`);
    });
    page.on('pageerror', (err) => problems.push(`page error: ${err.message}`));
    page.on('request', (r) => {
      if (!r.url().startsWith(pc.url) && !r.url().startsWith('data:'))
        problems.push(`request to another host: ${r.url()}`);
    });
    page.on('requestfailed', (r) => problems.push(`failed: ${r.url()}`));
  });
  afterAll(async () => {
    await browser?.close();
    await pc?.stop();
    await hub?.close();
    await registry?.close();
  });

  const value = (id: string) => page.locator(`#${id}`).getAttribute('data-value');

  test('loads with no console error, from pullcache alone, and shows the numbers /metrics shows', async () => {
    await page.goto(`${pc.url}/`);
    await expect.poll(() => page.locator('#connection').textContent()).toBe('live');
    const { samples } = await scrape(pc.url);
    const hits = sum(samples, 'registry_proxy_hits_total');
    const misses = sum(samples, 'registry_proxy_misses_total');
    expect(hits).toBeGreaterThan(0);
    expect(misses).toBeGreaterThan(0);
    await expect.poll(() => value('hits')).toBe(String(hits));
    expect(await value('misses')).toBe(String(misses));
    const served = sum(samples, 'pullcache_served_bytes_total');
    expect(await value('served-bytes')).toBe(String(served));
    const hitBytes = sum(samples, 'pullcache_served_bytes_total', { cache: 'hit' });
    expect(Number(await value('hit-ratio-bytes'))).toBeCloseTo(hitBytes / served, 10);
    expect(Number(await value('hit-ratio-requests'))).toBeCloseTo(hits / (hits + misses), 10);
    expect(await value('saved-bytes')).toBe(
      String(served - sum(samples, 'pullcache_upstream_bytes_total')),
    );
    expect(await value('storage-used')).toBe(String(sum(samples, 'pullcache_storage_bytes')));
    expect(await page.locator('#hit-ratio-requests').textContent()).toMatch(/^\d+\.\d%$/);

    // Each upstream: its state, auth scheme and the pull limit it reported.
    const docker = page.locator('tr[data-upstream="docker.io"]');
    await expect.poll(() => docker.locator('.badge').textContent()).toBe('up');
    expect(await docker.textContent()).toContain('bearer');
    const remaining = sum(samples, 'pullcache_upstream_ratelimit_remaining', {
      upstream: 'docker.io',
    });
    expect(await docker.locator('.limit').textContent()).toBe(`${remaining} of 100`);
    const quay = page.locator('tr[data-upstream="quay.io"]');
    expect(await quay.locator('.badge').textContent()).toBe('down');

    // What went wrong lately, with reasons.
    expect(await page.locator('#refused').textContent()).toMatch(
      /PUT \/v2\/org\/app\/manifests\/v9 → 405.*UNSUPPORTED/,
    );
    expect(await page.locator('#upstream-failures').textContent()).toMatch(
      /quay\.io: GET \/v2\/ at start-up.*ECONNREFUSED/,
    );
    await page.screenshot({ path: join(SHOTS, 'overview.png'), fullPage: true });
    expect(problems).toEqual([]);
  });

  test('follows a cold blob while it is fetched: progress, rate and clients', async () => {
    const layer = big.blobs[1]!;
    hub.blobBytesPerSecond = 2 * 1024 * 1024;
    const download = fetch(`${pc.url}/v2/org/big/blobs/${layer.digest}`).then(async (r) =>
      Buffer.from(await r.arrayBuffer()),
    );
    const row = page.locator(`.fetch[data-digest="${layer.digest}"]`);
    await expect.poll(() => row.count(), { timeout: 10_000 }).toBe(1);
    const first = Number(await row.getAttribute('data-received'));
    await expect
      .poll(async () => Number(await row.getAttribute('data-received')), { timeout: 10_000 })
      .toBeGreaterThan(first);
    const size = (layer.bytes.length / 1024 / 1024).toFixed(1).replace('.', '\\.');
    expect(await row.locator('.small').textContent()).toMatch(
      new RegExp(`^[\\d.]+ (KiB|MiB) of ${size} MiB \\(\\d+%\\) · [\\d.]+ (KiB|MiB)/s · 1 client$`),
    );
    expect(Number(await row.locator('.bar').getAttribute('aria-valuenow'))).toBeGreaterThan(0);
    await page.screenshot({ path: join(SHOTS, 'fetching.png'), fullPage: true });
    const bytes = await download;
    expect(bytes.equals(layer.bytes)).toBe(true);
    await expect.poll(() => page.locator('.fetch').count(), { timeout: 10_000 }).toBe(0);
    hub.blobBytesPerSecond = Infinity;
    expect(problems).toEqual([]);
  });

  test('lists the cached images, sorts them and filters them', async () => {
    const rows = page.locator('.image-row');
    await expect.poll(() => rows.count()).toBe(images.length);
    expect(await page.locator('#image-count').textContent()).toBe(String(images.length));
    // By size, largest first, then smallest first.
    await page.locator('button[data-sort="size"]').click();
    const bySize = [...images].sort(
      (a, b) =>
        b.blobs.reduce((n, x) => n + x.bytes.length, 0) -
        a.blobs.reduce((n, x) => n + x.bytes.length, 0),
    );
    const refs = () =>
      rows.evaluateAll((els) =>
        els.map((e) => (e as unknown as { dataset: { reference?: string } }).dataset.reference),
      );
    expect((await refs())[0]).toBe(`docker.io/${bySize[0]!.repository}:${bySize[0]!.tag}`);
    await page.locator('button[data-sort="size"]').click();
    expect((await refs())[0]).toBe(`docker.io/${bySize.at(-1)!.repository}:${bySize.at(-1)!.tag}`);
    // By name.
    await page.locator('button[data-sort="reference"]').click();
    expect(await refs()).toEqual(images.map((i) => `docker.io/${i.repository}:${i.tag}`).sort());
    await page.locator('#image-search').fill('org/');
    await expect.poll(() => rows.count()).toBe(2);
    expect(await page.locator('#image-count').textContent()).toBe(`2 of ${images.length}`);
    await page.locator('#image-search').fill('no-such-image');
    await expect.poll(() => page.locator('#images-empty').isVisible()).toBe(true);
    await page.locator('#image-search').fill('');
    await expect.poll(() => rows.count()).toBe(images.length);
    expect(problems).toEqual([]);
  });

  test('pins and unpins an image for a viewer with the admin action (this host)', async () => {
    const row = page.locator('.image-row[data-reference="docker.io/org/tool:v2"]');
    await row.locator('button.pin').click();
    await expect.poll(() => row.locator('.pinned').textContent()).toBe('pinned');
    const pins = (await (await fetch(`${pc.url}/_pullcache/v1/pins`)).json()) as { pins: string[] };
    expect(pins.pins).toContain('docker.io/org/tool:v2');
    await page.screenshot({ path: join(SHOTS, 'images.png'), fullPage: true });
    await row.locator('button.pin').click();
    await expect.poll(() => row.locator('.pinned').textContent()).toBe('');
    // Remove asks for a second click.
    await row.locator('button.remove').click();
    expect(await row.locator('button.remove').textContent()).toBe('Sure?');
    await row.locator('button.remove').click();
    await expect
      .poll(async () => [
        await page.locator('.image-row').count(),
        await page.locator('#image-mode').textContent(),
      ])
      .toEqual([images.length - 1, '']);
    expect(problems).toEqual([]);
  });

  test('stays fast with 10,000 images: only the rows in view are in the page', async () => {
    const many = Array.from({ length: 10_000 }, (_, i) => ({
      references: [`docker.io/team/svc-${String(i).padStart(5, '0')}:v${i % 7}`],
      upstream: 'docker.io',
      repository: `team/svc-${i}`,
      digest: `sha256:${i.toString(16).padStart(64, '0')}`,
      size: (i * 7919) % 100_000_000,
      ownBytes: 1,
      sharedBytes: 0,
      lastPulled: new Date(Date.now() - i * 60_000).toISOString(),
      pinned: i % 100 === 0,
    }));
    // The server's answer for 10,000 images, stood in by the browser (pulling 10,000 real
    // images here would take the whole test budget); the page code under test is the same.
    await page.route('**/_pullcache/v1/images', (route) =>
      route.fulfill({ contentType: 'application/json', body: JSON.stringify(many) }),
    );
    const started = Date.now();
    await page.reload();
    await expect
      .poll(async () => [await page.locator('#image-count').textContent(), problems])
      .toEqual(['10,000', []]);
    expect(await page.locator('.image-row').count()).toBeLessThan(40);
    // Timed in the page: the click sorts 10,000 images and renders the rows in view.
    const sortMs = (await page.evaluate(
      `(() => { const t = performance.now(); document.querySelector('button[data-sort="size"]').click(); return performance.now() - t; })()`,
    )) as number;
    expect(sortMs).toBeLessThan(500);
    await page.locator('#image-search').fill('svc-0999');
    await expect.poll(() => page.locator('#image-count').textContent()).toBe('10 of 10,000');
    await page.locator('#image-search').fill('');
    await page.locator('#images-scroll').evaluate((e) => (e.scrollTop = 32 * 9_990));
    await expect
      .poll(() => page.locator('.image-row').first().getAttribute('data-reference'))
      .toMatch(/svc-/);
    expect(await page.locator('.image-row').count()).toBeLessThan(40);
    console.log(
      `10,000 images: listed in ${Date.now() - started} ms, sorted in ${sortMs.toFixed(0)} ms`,
    );
    await page.unroute('**/_pullcache/v1/images');
    expect(problems).toEqual([]);
  });
});
