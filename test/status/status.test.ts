/**
 * The status JSON, `pullcache status` (the real CLI against a running server), the request log
 * lines and the start-up report, against the real test registry.
 */
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { mergeStatuses } from '../../src/fleet/cluster-status.js';
import type { Digest } from '../../src/oci/digest.js';
import { RecentEvents } from '../../src/status/events.js';
import {
  StatusReporter,
  visibleTo,
  type Status,
  type StatusDeps,
} from '../../src/status/status.js';
import { cli, configFile, hasStackTrace } from '../helpers/cli.js';
import { basic, htpasswdFile } from '../helpers/htpasswd.js';
import { HubLike } from '../helpers/hub-like.js';
import { makeImage, pushImage, type Image } from '../helpers/images.js';
import { freePort, waitFor } from '../helpers/net.js';
import { scrape, sum } from '../helpers/prometheus.js';
import { capturedLog, startPullcache, type TestPullcache } from '../helpers/pullcache.js';
import { TestRegistry } from '../helpers/registry.js';
import { skopeoCopy } from '../helpers/skopeo.js';
import { Throttle } from '../helpers/throttle.js';

const tmp = () => mkdtempSync(join(tmpdir(), 'pullcache-status-'));

describe('the status of a running server', () => {
  let registry: TestRegistry;
  let hub: HubLike;
  let pc: TestPullcache;
  let lines: Record<string, unknown>[];
  let image: Image;
  let downPort: number;

  beforeAll(async () => {
    registry = await TestRegistry.start();
    image = makeImage('org/app', 'v1', 'oci', [150_000, 20_000]);
    await pushImage(registry, image);
    hub = await HubLike.start(registry.url);
    downPort = await freePort();
    const captured = capturedLog('info');
    lines = captured.lines;
    pc = await startPullcache(
      {
        upstreams: {
          'docker.io': { url: hub.url, tagTTL: '1h' },
          'quay.io': { url: `http://127.0.0.1:${downPort}` },
          'lab.local': { url: 'http://127.0.0.1:9', offline: true },
        },
        routing: { default: 'docker.io' },
        retention: { maxSize: '1GiB' },
      },
      undefined,
      { log: captured.log },
    );
    await skopeoCopy(pc.host, 'org/app:v1', tmp());
    await skopeoCopy(pc.host, 'org/app:v1', tmp());
    expect((await fetch(`${pc.url}/v2/org/app/manifests/v1`, { method: 'DELETE' })).status).toBe(
      405,
    );
    await new Promise((r) => setTimeout(r, 100)); // lines are written when responses close
  });
  afterAll(async () => {
    await pc?.stop();
    await hub?.close();
    await registry?.close();
  });

  test('GET /_pullcache/v1/status has traffic as /metrics counts it, storage, upstreams and recent failures', async () => {
    const res = await fetch(`${pc.url}/_pullcache/v1/status`);
    expect(res.status).toBe(200);
    expect(res.headers.get('cache-control')).toBe('no-store');
    const status = (await res.json()) as Status;
    const { samples } = await scrape(pc.url);
    const blobBytes = image.blobs.reduce((n, b) => n + b.bytes.length, 0);
    expect(status.traffic.hits).toBe(sum(samples, 'registry_proxy_hits_total'));
    expect(status.traffic.misses).toBe(sum(samples, 'registry_proxy_misses_total'));
    expect(status.traffic.missBytes).toBe(blobBytes + image.manifest.length);
    expect(status.traffic.hitBytes).toBe(blobBytes + image.manifest.length);
    expect(status.traffic.upstreamBytes).toBe(sum(samples, 'pullcache_upstream_bytes_total'));
    expect(status.traffic.savedBytes).toBe(
      status.traffic.servedBytes - status.traffic.upstreamBytes,
    );
    expect(status.traffic.hitRatio.bytes).toBe(0.5);
    expect(status.history.intervalSeconds).toBe(10);
    expect(status.history.points.at(-1)!.hits).toBe(status.traffic.hits);
    expect(status.storage).toMatchObject({ images: 1, maxSize: 1024 ** 3, ready: true });
    expect(status.storage.bytes).toBe(sum(samples, 'pullcache_storage_bytes'));
    const [docker, quay, lab] = status.upstreams;
    expect(docker).toMatchObject({
      name: 'docker.io',
      state: 'up',
      auth: 'bearer',
      rateLimit: { limit: 100, remaining: hub.remaining, windowSeconds: 21600 },
      lastFailure: null,
    });
    expect(docker!.latencyMs).toBeGreaterThanOrEqual(0);
    expect(quay).toMatchObject({ name: 'quay.io', state: 'down', auth: null });
    expect(quay!.lastFailure!.reason).toMatch(/ECONNREFUSED/);
    expect(lab).toMatchObject({ name: 'lab.local', state: 'offline' });
    expect(status.fetches).toEqual([]);
    expect(status.recent.upstreamFailures[0]).toMatchObject({
      upstream: 'quay.io',
      what: 'GET /v2/ at start-up',
      count: 1,
    });
    expect(status.recent.refused[0]).toMatchObject({
      client: '127.0.0.1',
      method: 'DELETE',
      path: '/v2/org/app/manifests/v1',
      status: 405,
      code: 'UNSUPPORTED',
      reason: expect.stringMatching(/pull-through cache/),
    });
    // From this host, without client authentication: the admin action.
    expect(status.viewer).toEqual({ admin: true });
  });

  test('pullcache status prints the overview of the server managing the storage', async () => {
    const config = configFile(pc.root, { 'docker.io': { url: hub.url } });
    const shown = await cli('status', '--config', config);
    expect(shown.stderr).toBe('');
    expect(shown.code).toBe(0);
    const out = shown.stdout.toString();
    expect(out).toMatch(/^pullcache \S+ at http:\/\/127\.0\.0\.1:\d+, up \d+ min\n/);
    expect(out).toMatch(/hit ratio [\d.]+% of requests, 50\.0% of bytes \(\d+ hits, \d+ misses\)/);
    expect(out).toMatch(
      /storage {4}[\d.]+ KiB of 1\.0 GiB budget \(0%\), 1 images; [\d.]+ \w+ free/,
    );
    expect(out).toMatch(/^docker\.io +up +bearer +\d+ ms +\d+ of 100 *$/m);
    expect(out).toMatch(
      /^quay\.io +down +- +- +- +\d\d:\d\d:\d\d GET \/v2\/ at start-up: ECONNREFUSED/m,
    );
    expect(out).toMatch(/^lab\.local +offline/m);
    expect(out).toMatch(
      /refused requests \(1\)\n {2}\d\d:\d\d:\d\d {2}127\.0\.0\.1 DELETE \/v2\/org\/app\/manifests\/v1 405 UNSUPPORTED: /,
    );
    expect(out).toContain('fetching now (0)');

    const json = await cli('status', '--url', pc.url, '--json');
    expect(json.code).toBe(0);
    expect((JSON.parse(json.stdout.toString()) as Status).storage.images).toBe(1);
  });

  test('pullcache status with no server says so in one line', async () => {
    const config = configFile(tmp(), { 'docker.io': { url: hub.url } });
    const none = await cli('status', '--config', config);
    expect(none.code).toBe(1);
    expect(none.stderr).toBe(
      'pullcache: no pullcache server is running on this storage; start one with pullcache serve, or give --url\n',
    );
    const gone = await cli('status', '--url', `http://127.0.0.1:${downPort}`);
    expect(gone.code).toBe(1);
    expect(gone.stderr).toMatch(
      /^pullcache: the server at http:\/\/127\.0\.0\.1:\d+ does not answer: ECONNREFUSED\n$/,
    );
    expect(hasStackTrace(gone.stderr)).toBe(false);
  });

  test('every request has one line: id, client, user agent, path, upstream, repository, cache, status, bytes, duration', async () => {
    const requests = lines.filter((l) => l.msg === 'request' || l.msg === 'request failed');
    const blobs = requests.filter((l) => /\/blobs\//.test((l.req as { url: string }).url));
    const manifests = requests.filter((l) =>
      /\/manifests\/v1$/.test((l.req as { url: string }).url),
    );
    expect(blobs.map((l) => l.cache).sort()).toEqual([
      ...image.blobs.map(() => 'hit'),
      ...image.blobs.map(() => 'miss'),
    ]);
    // Each fetch says how long it took, a manifest's as a blob's.
    for (const msg of ['manifest fetched', 'blob fetched'])
      expect(lines.find((l) => l.msg === msg)).toMatchObject({ durationMs: expect.any(Number) });
    const get = manifests.find((l) => (l.req as { method: string }).method === 'GET')!;
    expect(get).toMatchObject({
      req: { id: expect.any(String), method: 'GET', url: '/v2/org/app/manifests/v1' },
      res: { statusCode: 200 },
      client: '127.0.0.1',
      userAgent: expect.stringMatching(/skopeo|containers/i),
      upstream: 'docker.io',
      repository: 'org/app',
      cache: 'miss',
      bytes: image.manifest.length,
      responseTime: expect.any(Number),
    });
    const longPath = `/v2/org/${'x'.repeat(2000)}/manifests/v1`;
    await fetch(`${pc.url}${longPath}`);
    await new Promise((r) => setTimeout(r, 100));
    const long = lines.find((l) =>
      ((l.req as { url?: string })?.url ?? '').startsWith('/v2/org/xxx'),
    )!;
    expect((long.req as { url: string }).url).toBe(`${longPath.slice(0, 1024)}...`);
    // The status page's polls write no line.
    const before = lines.length;
    await (await fetch(`${pc.url}/_pullcache/v1/status`)).arrayBuffer();
    await new Promise((r) => setTimeout(r, 100));
    expect(lines.slice(before).filter((l) => l.msg === 'request')).toEqual([]);
  });

  test('start-up says what storage, the metadata cache and each upstream are, warning of what is degraded', () => {
    const storage = lines.find((l) => l.msg === 'storage writable')!;
    expect(storage).toMatchObject({
      level: 30,
      storage: 'filesystem',
      root: resolve(pc.root),
      writable: true,
      free: expect.any(Number),
      total: expect.any(Number),
    });
    expect(lines.find((l) => l.msg === 'metadata cache in memory')).toMatchObject({
      cache: 'memory',
      reachable: true,
    });
    expect(lines.find((l) => l.msg === 'upstream answers')).toMatchObject({
      upstream: 'docker.io',
      status: 401,
      auth: 'bearer',
    });
    expect(
      lines.find(
        (l) => l.upstream === 'quay.io' && /does not answer at start-up/.test(String(l.msg)),
      ),
    ).toMatchObject({ level: 40, err: expect.stringMatching(/ECONNREFUSED/) });
    expect(lines.find((l) => l.upstream === 'lab.local')).toMatchObject({
      level: 40,
      msg: 'upstream offline: only what is cached is served',
    });
  });
});

describe('the status with client authentication: each caller sees what it may pull', () => {
  let registry: TestRegistry;
  let throttle: Throttle;
  let pc: TestPullcache;
  let open: Image;
  let secret: Image;
  const root = basic('root', 'root-pw'); // pulls and administers everything
  const alice = basic('alice', 'alice-pw'); // pulls public/** only

  beforeAll(async () => {
    registry = await TestRegistry.start();
    open = makeImage('public/app', 'v1', 'oci', [1000]);
    secret = makeImage('secret/app', 'v1', 'oci', [1_000_000]);
    for (const image of [open, secret]) await pushImage(registry, image);
    // A slow upstream: the secret layer takes about a minute, so its fetch is seen under way.
    throttle = await Throttle.start(registry.url);
    throttle.bytesPerSecond = 16 * 1024;
    pc = await startPullcache({
      // No retries: one failure each, and the upstream is not taken for down.
      upstreams: { 'docker.io': { url: throttle.url, retries: 0 } },
      auth: {
        htpasswd: htpasswdFile({ root: 'root-pw', alice: 'alice-pw' }),
        rules: [
          { users: ['root'], actions: ['pull', 'admin'] },
          { users: ['alice'], repositories: ['public/**'], actions: ['pull'] },
        ],
      },
    });
  });
  afterAll(async () => {
    await pc?.stop();
    await throttle?.close();
    await registry?.close();
  });

  const status = async (headers: Record<string, string>) => {
    const res = await fetch(`${pc.url}/_pullcache/v1/status`, { headers });
    expect(res.status).toBe(200);
    return (await res.json()) as Status;
  };

  test('fetches and upstream failures of repositories it may not pull, and refused requests, are not shown; an admin sees them all', async () => {
    const layer = secret.blobs[1]!;
    const manifest = (repository: string, tag: string, headers: Record<string, string>) =>
      fetch(`${pc.url}/v2/${repository}/manifests/${tag}`, {
        headers: { ...headers, accept: secret.mediaType },
      });
    // alice is refused secret/app: a refused request, with her address and the path.
    expect((await manifest('secret/app', 'v1', alice)).status).toBe(403);
    // root fetches the secret layer from the slow upstream.
    const pulling = new AbortController();
    void fetch(`${pc.url}/v2/secret/app/blobs/${layer.digest}`, {
      headers: root,
      signal: pulling.signal,
    })
      .then((res) => res.arrayBuffer())
      .catch(() => {});
    try {
      await waitFor(
        async () =>
          (await status(root)).fetches.some((f) => f.digest === layer.digest && f.received > 0),
        'the fetch under way',
      );
      // The upstream cuts connections: a failure of each repository, the secret one last.
      throttle.down = true;
      expect((await manifest('public/app', 'v2', alice)).status).toBe(503);
      expect((await manifest('secret/app', 'v2', root)).status).toBe(503);
      throttle.down = false;

      const admin = await status(root);
      expect(admin.viewer).toEqual({ admin: true });
      expect(admin.fetches).toMatchObject([
        { digest: layer.digest, upstream: 'docker.io', repository: 'secret/app' },
      ]);
      expect(admin.recent.upstreamFailures.map((f) => f.what)).toEqual([
        'GET /v2/secret/app/manifests/v2',
        'GET /v2/public/app/manifests/v2',
      ]);
      expect(admin.upstreams[0]!.lastFailure).toMatchObject({
        what: 'GET /v2/secret/app/manifests/v2',
        repositories: ['secret/app'],
      });
      expect(admin.recent.refused).toMatchObject([
        { client: '127.0.0.1', path: '/v2/secret/app/manifests/v1', status: 403, code: 'DENIED' },
      ]);

      const shown = await status(alice);
      expect(shown.viewer).toEqual({ admin: false });
      expect(shown.fetches).toEqual([]);
      expect(shown.recent.refused).toEqual([]);
      expect(shown.recent.upstreamFailures.map((f) => f.what)).toEqual([
        'GET /v2/public/app/manifests/v2',
      ]);
      // The upstream's last failure: when and why, not what was asked.
      expect(shown.upstreams[0]!.lastFailure).toMatchObject({
        what: 'a request',
        reason: admin.upstreams[0]!.lastFailure!.reason,
      });
      const text = JSON.stringify(shown);
      expect(text).not.toContain('secret');
      expect(text).not.toContain(layer.digest);
      expect(text).not.toContain('127.0.0.1');
      // The rest is the same as the admin's (free space aside: other tests write meanwhile).
      expect({ ...shown.storage, free: 0 }).toEqual({ ...admin.storage, free: 0 });
      expect(shown.upstreams[0]!.state).toBe(admin.upstreams[0]!.state);

      // With server.workers, each worker gives its whole status and the one asked merges them
      // (fleet/cluster-status.ts): the host's is narrowed once merged, the same way.
      const reporter = new StatusReporter({
        config: {
          upstreams: {
            'docker.io': { url: throttle.url, repositories: { allow: [], deny: [] } },
          },
        },
        events: new RecentEvents(),
      } as unknown as StatusDeps);
      // Another worker fetches a public layer.
      const other = {
        ...admin.fetches[0]!,
        digest: open.blobs[1]!.digest as Digest,
        repository: 'public/app',
      };
      reporter.showHost(
        () => async (viewer) =>
          mergeStatuses({ ...admin, viewer }, [
            admin,
            { ...admin, fetches: [other], recent: { upstreamFailures: [], refused: [] } },
          ]),
      );
      const host = await reporter.status({
        admin: false,
        mayPull: (t) => t.upstream === 'docker.io' && t.repository.startsWith('public/'),
      });
      expect(host.fetches).toEqual([other]);
      expect(host.recent).toEqual(shown.recent);
      expect(host.viewer).toEqual({ admin: false });
      expect(JSON.stringify(host)).not.toContain('secret');
    } finally {
      pulling.abort();
    }
  });

  test('fetches and upstream failures of repositories outside the allow/deny lists are shown to an admin only', async () => {
    const events = new RecentEvents();
    events.upstreamFailed('docker.io', 'GET /v2/public/app/tags/list', 'HTTP 500', ['public/app']);
    events.upstreamFailed('docker.io', 'GET /v2/secret/app/manifests/v1', 'HTTP 500', [
      'secret/app',
    ]);
    const failures = events.upstreamFailures();
    const fetch = (repository: string, digest: string) => ({
      digest: digest as Digest,
      upstream: 'docker.io',
      repository,
      size: 10,
      received: 5,
      bytesPerSecond: 1,
      clients: 1,
      startedAt: 0,
      from: 'upstream' as const,
    });
    const whole = {
      upstreams: [{ name: 'docker.io', lastFailure: { ...failures[0]! } }],
      fetches: [
        fetch('public/app', `sha256:${'a'.repeat(64)}`),
        fetch('secret/app', `sha256:${'b'.repeat(64)}`),
      ],
      recent: { upstreamFailures: failures, refused: [] },
    } as unknown as Status;
    const reporter = new StatusReporter({
      config: {
        upstreams: {
          'docker.io': {
            url: 'http://127.0.0.1:9',
            repositories: { allow: [], deny: ['secret/**'] },
          },
        },
      },
      events,
    } as unknown as StatusDeps);
    reporter.showHost(() => async (viewer) => ({ ...whole, viewer }));
    // Whatever the rules give (here: everything), the lists refuse secret/app to everyone.
    const shown = await reporter.status({ admin: false, mayPull: () => true });
    expect(shown.fetches.map((f) => f.repository)).toEqual(['public/app']);
    expect(shown.recent.upstreamFailures.map((f) => f.repositories)).toEqual([['public/app']]);
    expect(shown.upstreams[0]!.lastFailure).toMatchObject({ what: 'a request', repositories: [] });
    expect(JSON.stringify(shown)).not.toContain('secret');
    const admin = await reporter.status({ admin: true, mayPull: () => true });
    expect(admin.fetches).toHaveLength(2);
    expect(admin.recent.upstreamFailures).toHaveLength(2);
  });

  test('an upstream failure is shown to who may pull every repository it was asked for', () => {
    const events = new RecentEvents();
    events.upstreamFailed('docker.io', 'GET /v2/ at start-up', 'HTTP 502', []);
    events.upstreamFailed('docker.io', 'a token for repository:public/app:pull', 'HTTP 500', [
      'public/app',
    ]);
    events.upstreamFailed('docker.io', 'GET /v2/secret/app/manifests/v1', 'HTTP 500', [
      'secret/app',
    ]);
    events.upstreamFailed('docker.io', 'a token for two', 'HTTP 500', ['public/app', 'secret/a']);
    events.upstreamFailed('ghcr.io', 'GET /v2/public/app/tags/list', 'HTTP 500', ['public/app']);
    const failures = events.upstreamFailures();
    const whole = {
      upstreams: [
        {
          name: 'docker.io',
          lastFailure: { ...failures[1]!, repositories: ['secret/app'] },
        },
      ],
      fetches: [],
      recent: { upstreamFailures: failures, refused: [] },
    } as unknown as Status;
    const viewer = {
      admin: false,
      mayPull: (t: { upstream: string; repository: string }) =>
        t.upstream === 'docker.io' && t.repository.startsWith('public/'),
    };
    const shown = visibleTo(whole, viewer);
    expect(shown.recent.upstreamFailures.map((f) => f.what)).toEqual([
      'a token for repository:public/app:pull',
      'GET /v2/ at start-up',
    ]);
    expect(shown.upstreams[0]!.lastFailure).toMatchObject({ what: 'a request', repositories: [] });
    expect(visibleTo(whole, { ...viewer, admin: true, mayPull: () => true })).toMatchObject({
      recent: { upstreamFailures: failures },
    });
  });
});
