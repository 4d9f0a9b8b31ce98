import { mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { parseDigest } from '../../src/oci/digest.js';
import { rawRequest, ociError } from '../helpers/http.js';
import {
  makeImage,
  makeIndex,
  pushImage,
  pushManifest,
  sha256,
  type Image,
} from '../helpers/images.js';
import { capturedLog, startPullcache, type TestPullcache } from '../helpers/pullcache.js';
import { freePort, waitFor } from '../helpers/net.js';
import { scrape, sum } from '../helpers/prometheus.js';
import { Recorder } from '../helpers/recorder.js';
import { TestRegistry } from '../helpers/registry.js';
import { expectDirHolds, skopeo, skopeoCopy } from '../helpers/skopeo.js';
import { startRedis } from '../helpers/redis.js';
import { DRIVERS, useStorage } from '../helpers/storage-drivers.js';

const tmp = () => mkdtempSync(join(tmpdir(), 'pullcache-pull-'));
const MANIFEST_GET = /\/manifests\//;
const BLOB_PATH = /\/blobs\/sha256:/;

describe.each(DRIVERS)('pulling through pullcache from a real registry (%s storage)', (kind) => {
  const storage = useStorage(kind, { scope: 'file' });
  let registry: TestRegistry;
  let recorder: Recorder;
  let pc: TestPullcache;
  let alpine: Image;
  let oci: Image;
  let multi: Image;
  let secret: Image;
  let big: Image;
  const manyTags: string[] = [];

  beforeAll(async () => {
    registry = await TestRegistry.start();
    alpine = makeImage('library/alpine', '3.20', 'docker', [200_000, 30_000]);
    oci = makeImage('org/oci-app', 'v1', 'oci', [50_000, 40_000, 30_000, 20_000]);
    multi = makeIndex('org/multi', 'latest', 'docker', ['amd64', 'arm64']);
    secret = makeImage('private/app', 'v1', 'docker', [10_000]);
    big = makeImage('org/big', 'v1', 'oci', [6 * 1024 * 1024]);
    for (const image of [alpine, oci, multi, secret, big]) await pushImage(registry, image);
    const small = makeImage('org/many', 'base', 'oci', [1000]);
    await pushImage(registry, small);
    for (let i = 0; i < 120; i++) {
      const tag = `1.${i}`;
      manyTags.push(tag);
      await pushManifest(registry, 'org/many', tag, small.manifest, small.mediaType);
    }
    manyTags.push('base');
    manyTags.sort();
    recorder = await Recorder.start(registry.url);
    pc = await startPullcache({
      storage: storage.config(),
      upstreams: {
        'docker.io': { url: recorder.url, tagTTL: '1h' },
        'registry.test': {
          url: recorder.url,
          tagTTL: '1s',
          username: 'reader',
          password: 'read-secret',
        },
        'passthru.test': { url: registry.url, mode: 'passthrough' },
      },
    });
  });
  afterAll(async () => {
    await pc?.stop();
    await recorder?.close();
    await registry?.close();
  });

  test('skopeo pulls a Docker v2 image, an OCI image and a manifest list byte-equal to the upstream', async () => {
    const d1 = tmp();
    await skopeoCopy(pc.host, 'alpine:3.20', d1);
    expectDirHolds(d1, alpine);

    const d2 = tmp();
    await skopeoCopy(pc.host, 'org/oci-app:v1', d2);
    expectDirHolds(d2, oci);

    const d3 = tmp();
    await skopeoCopy(pc.host, 'org/multi:latest', d3, '--all');
    expect(readFileSync(join(d3, 'manifest.json')).equals(multi.manifest)).toBe(true);
    for (const child of multi.children!) {
      expect(
        readFileSync(join(d3, `${parseDigest(child.digest).hex}.manifest.json`)).equals(
          child.manifest,
        ),
      ).toBe(true);
      for (const blob of child.blobs)
        expect(readFileSync(join(d3, parseDigest(blob.digest).hex)).equals(blob.bytes)).toBe(true);
    }
  });

  test('manifests are served with the upstream media type, digest and length', async () => {
    for (const image of [alpine, oci, multi]) {
      const res = await fetch(`${pc.url}/v2/${image.repository}/manifests/${image.tag}`);
      expect(res.status).toBe(200);
      expect(res.headers.get('content-type')).toBe(image.mediaType);
      expect(res.headers.get('docker-content-digest')).toBe(image.digest);
      expect(Number(res.headers.get('content-length'))).toBe(image.manifest.length);
      expect(Buffer.from(await res.arrayBuffer()).equals(image.manifest)).toBe(true);
    }
  });

  test('a second pull sends no blob bytes and no manifest GETs to the upstream', async () => {
    recorder.reset();
    const dir = tmp();
    await skopeoCopy(pc.host, 'alpine:3.20', dir);
    expectDirHolds(dir, alpine);
    expect(recorder.count('GET', MANIFEST_GET)).toBe(0);
    expect(recorder.count('GET', BLOB_PATH)).toBe(0);
    expect(recorder.blobBytes()).toBe(0);
  });

  test('pull by digest', async () => {
    const dir = tmp();
    await skopeoCopy(pc.host, `org/oci-app@${oci.digest}`, dir);
    expectDirHolds(dir, oci);
    const child = multi.children![1]!;
    const d2 = tmp();
    await skopeoCopy(pc.host, `org/multi@${child.digest}`, d2);
    expectDirHolds(d2, child);
  });

  test('a private repository is pulled with the upstream credentials, and denied without them', async () => {
    const dir = tmp();
    await skopeoCopy(pc.host, 'registry.test/private/app:v1', dir);
    expectDirHolds(dir, secret);
    const res = await fetch(`${pc.url}/v2/private/app/manifests/v1`);
    expect(res.status).toBe(403);
    expect(await ociError(res)).toBe('DENIED');
  });

  test('a tag moved upstream is visible after tagTTL, not before; revalidation is a HEAD', async () => {
    const first = makeImage('org/moving', 'stable', 'oci', [3000]);
    const second = makeImage('org/moving', 'stable', 'oci', [4000]);
    await pushImage(registry, first);
    const url = `${pc.url}/v2/registry.test/org/moving/manifests/stable`;
    expect((await fetch(url)).headers.get('docker-content-digest')).toBe(first.digest);
    await pushImage(registry, second);
    expect((await fetch(url)).headers.get('docker-content-digest')).toBe(first.digest);
    await new Promise((r) => setTimeout(r, 1100));
    recorder.reset();
    expect((await fetch(url)).headers.get('docker-content-digest')).toBe(second.digest);
    expect(recorder.count('HEAD', /\/org\/moving\/manifests\/stable$/)).toBe(1);
    expect(recorder.count('GET', /\/org\/moving\/manifests\/stable$/)).toBe(0);
    expect(recorder.count('GET', new RegExp(`/manifests/${second.digest}$`))).toBe(1);
    // Unchanged after the next expiry: one HEAD, no GET at all.
    await new Promise((r) => setTimeout(r, 1100));
    recorder.reset();
    expect((await fetch(url)).headers.get('docker-content-digest')).toBe(second.digest);
    expect(recorder.count('HEAD', MANIFEST_GET)).toBe(1);
    expect(recorder.count('GET', MANIFEST_GET)).toBe(0);
  });

  test('a tag whose HEAD answer has no Docker-Content-Digest moves with one GET, not served stale', async () => {
    const first = makeImage('org/undigested', 'stable', 'oci', [3100]);
    const second = makeImage('org/undigested', 'stable', 'oci', [4100]);
    await pushImage(registry, first);
    const url = `${pc.url}/v2/registry.test/org/undigested/manifests/stable`;
    const byTag = /\/org\/undigested\/manifests\/stable$/;
    expect((await fetch(url)).headers.get('docker-content-digest')).toBe(first.digest);
    recorder.headWithoutDigest = true;
    try {
      await pushImage(registry, second);
      await new Promise((r) => setTimeout(r, 1100)); // past registry.test's 1 s tagTTL
      recorder.reset();
      const moved = await fetch(url);
      expect(moved.status).toBe(200);
      expect(moved.headers.get('docker-content-digest')).toBe(second.digest);
      expect(moved.headers.get('warning')).toBeNull();
      expect(Buffer.from(await moved.arrayBuffer()).equals(second.manifest)).toBe(true);
      // The HEAD named no digest: one GET by tag told it and brought the manifest.
      expect(recorder.count('HEAD', byTag)).toBe(1);
      expect(recorder.count('GET', byTag)).toBe(1);
      expect(recorder.count('GET', new RegExp(`/manifests/${second.digest}$`))).toBe(0);
      // Unchanged past the next expiry (a client's HEAD this time): fresh, not stale.
      await new Promise((r) => setTimeout(r, 1100));
      recorder.reset();
      const again = await fetch(url, { method: 'HEAD' });
      expect(again.status).toBe(200);
      expect(again.headers.get('docker-content-digest')).toBe(second.digest);
      expect(again.headers.get('warning')).toBeNull();
      expect(recorder.count('HEAD', byTag)).toBe(1);
      expect(recorder.count('GET', byTag)).toBe(1);
      // That GET only confirmed the tag: what is served of it comes from storage, no miss.
      const missed = async () =>
        sum((await scrape(pc.url)).samples, 'pullcache_served_bytes_total', {
          upstream: 'registry.test',
          kind: 'manifest',
          cache: 'miss',
        });
      const before = await missed();
      await new Promise((r) => setTimeout(r, 1100));
      const confirmed = await fetch(url);
      expect(Buffer.from(await confirmed.arrayBuffer()).equals(second.manifest)).toBe(true);
      expect(await missed()).toBe(before);
    } finally {
      recorder.headWithoutDigest = false;
    }
  });

  test('concurrent lookups of one tag share one upstream request', async () => {
    const image = makeImage('org/shared-tag', 'v1', 'oci', [2000]);
    await pushImage(registry, image);
    recorder.reset();
    const responses = await Promise.all(
      Array.from({ length: 10 }, () => fetch(`${pc.url}/v2/org/shared-tag/manifests/v1`)),
    );
    for (const res of responses)
      expect(res.headers.get('docker-content-digest')).toBe(image.digest);
    expect(recorder.count('GET', MANIFEST_GET)).toBe(1);
  });

  test('tag lists paginate with n, last and Link', async () => {
    const seen: string[] = [];
    let next: string | undefined = '/v2/org/many/tags/list?n=50';
    let pages = 0;
    while (next) {
      const res: Response = await fetch(`${pc.url}${next}`);
      expect(res.status).toBe(200);
      const body = (await res.json()) as { name: string; tags: string[] };
      expect(body.name).toBe('org/many');
      expect(body.tags.length).toBeLessThanOrEqual(50);
      seen.push(...body.tags);
      next = /<([^>]+)>; rel="next"/.exec(res.headers.get('link') ?? '')?.[1];
      pages++;
    }
    expect(pages).toBe(3);
    expect(seen).toEqual(manyTags);
  });

  test('range reads on cached and uncached blobs', async () => {
    const cached = alpine.blobs[1]!;
    const url = `${pc.url}/v2/library/alpine/blobs/${cached.digest}`;
    let res = await fetch(url, { headers: { range: 'bytes=10-99' } });
    expect(res.status).toBe(206);
    expect(res.headers.get('content-range')).toBe(`bytes 10-99/${cached.bytes.length}`);
    expect(Buffer.from(await res.arrayBuffer()).equals(cached.bytes.subarray(10, 100))).toBe(true);
    res = await fetch(url, { headers: { range: 'bytes=-100' } });
    expect(res.status).toBe(206);
    expect(
      Buffer.from(await res.arrayBuffer()).equals(cached.bytes.subarray(cached.bytes.length - 100)),
    ).toBe(true);
    res = await fetch(url, { headers: { range: `bytes=${cached.bytes.length}-` } });
    expect(res.status).toBe(416);
    expect(res.headers.get('content-range')).toBe(`bytes */${cached.bytes.length}`);
    expect(await ociError(res)).toBe('RANGE_INVALID');
    res = await fetch(url, { headers: { 'if-none-match': `"${cached.digest}"` } });
    expect(res.status).toBe(304);
    // Several ranges: a part each, in the order asked (test/http/byte-ranges.test.ts has the
    // framing); an object of the bucket is read on, not sought, so out of order it is whole.
    const size = cached.bytes.length;
    const part = (start: number, end: number) =>
      `Content-Range: bytes ${start}-${end}/${size}\r\nContent-Type: application/octet-stream` +
      `\r\n\r\n${cached.bytes.subarray(start, end + 1).toString('latin1')}\r\n--`;
    for (const [range, order] of [
      ['bytes=0-9,200-299', [0, 200]],
      ['bytes=200-299,0-9', [200, 0]],
    ] as const) {
      res = await fetch(url, { headers: { range } });
      const body = Buffer.from(await res.arrayBuffer());
      if (kind === 's3' && order[0] > order[1]) {
        expect(res.status).toBe(200);
        expect(body.equals(cached.bytes)).toBe(true);
        continue;
      }
      expect(res.status).toBe(206);
      expect(res.headers.get('content-type')).toMatch(/^multipart\/byteranges; boundary=\w+$/);
      const text = body.toString('latin1');
      const at = order.map((start) => text.indexOf(part(start, start === 0 ? 9 : 299)));
      expect(at[0]).toBeGreaterThan(0);
      expect(at[1]).toBeGreaterThan(at[0]!);
    }

    const fresh = makeImage('org/ranged', 'v1', 'oci', [100_000]);
    await pushImage(registry, fresh);
    const layer = fresh.blobs[1]!;
    res = await fetch(`${pc.url}/v2/org/ranged/blobs/${layer.digest}`, {
      headers: { range: 'bytes=1000-1999' },
    });
    expect(res.status).toBe(206);
    expect(Buffer.from(await res.arrayBuffer()).equals(layer.bytes.subarray(1000, 2000))).toBe(
      true,
    );
  });

  test('a HEAD on an uncached blob asks the upstream with HEAD and moves no body', async () => {
    const fresh = makeImage('org/headonly', 'v1', 'oci', [500_000]);
    await pushImage(registry, fresh);
    const layer = fresh.blobs[1]!;
    recorder.reset();
    const res = await fetch(`${pc.url}/v2/org/headonly/blobs/${layer.digest}`, { method: 'HEAD' });
    expect(res.status).toBe(200);
    expect(Number(res.headers.get('content-length'))).toBe(layer.bytes.length);
    expect(recorder.count('HEAD', BLOB_PATH)).toBe(1);
    expect(recorder.count('GET', BLOB_PATH)).toBe(0);
    expect((await pc.runtime.blobs.stat(parseDigest(layer.digest).digest)).found).toBe(false);
  });

  test('sixteen clients on one uncached blob all get the right bytes, and the upstream sends it once', async () => {
    const layer = big.blobs[1]!;
    recorder.reset();
    const bodies = await Promise.all(
      Array.from({ length: 16 }, async () => {
        const res = await fetch(`${pc.url}/v2/org/big/blobs/${layer.digest}`);
        expect(res.status).toBe(200);
        return Buffer.from(await res.arrayBuffer());
      }),
    );
    for (const body of bodies) expect(sha256(body)).toBe(layer.digest);
    expect(recorder.count('GET', BLOB_PATH)).toBe(1);
    expect(recorder.blobBytes()).toBeLessThanOrEqual(layer.bytes.length * 1.05);
    expect((await pc.runtime.blobs.stat(parseDigest(layer.digest).digest)).found).toBe(true);
  });

  test('routing: ns, an upstream-name prefix (with or without ns), the default, and library/ on docker.io', async () => {
    const byNs = await fetch(`${pc.url}/v2/library/alpine/manifests/3.20?ns=docker.io`);
    expect(byNs.headers.get('docker-content-digest')).toBe(alpine.digest);
    // The spec: a registry that uses ns says so in OCI-Namespace (blobs and lists too).
    expect(byNs.headers.get('oci-namespace')).toBe('docker.io');
    const blobByNs = await fetch(
      `${pc.url}/v2/library/alpine/blobs/${alpine.blobs[0]!.digest}?ns=docker.io`,
      { method: 'HEAD' },
    );
    expect(blobByNs.headers.get('oci-namespace')).toBe('docker.io');
    const bare = await fetch(`${pc.url}/v2/alpine/manifests/3.20`);
    expect(bare.headers.get('docker-content-digest')).toBe(alpine.digest);
    expect(bare.headers.get('oci-namespace')).toBeNull();
    const byNs2 = await fetch(`${pc.url}/v2/org/oci-app/manifests/v1?ns=registry.test`);
    expect(byNs2.headers.get('docker-content-digest')).toBe(oci.digest);
    expect(byNs2.headers.get('oci-namespace')).toBe('registry.test');
    const byPrefix = await fetch(`${pc.url}/v2/registry.test/org/oci-app/manifests/v1`);
    expect(byPrefix.headers.get('docker-content-digest')).toBe(oci.digest);
    expect(byPrefix.headers.get('oci-namespace')).toBeNull();
    // containerd's hosts.toml with the upstream in the host's path (override_path) sends ns too.
    const byBoth = await fetch(
      `${pc.url}/v2/registry.test/org/oci-app/manifests/v1?ns=registry.test`,
    );
    expect(byBoth.headers.get('docker-content-digest')).toBe(oci.digest);
    const unknownNs = await fetch(`${pc.url}/v2/library/alpine/manifests/3.20?ns=evil.example.com`);
    expect(unknownNs.status).toBe(400);
    expect(await ociError(unknownNs)).toBe('UPSTREAM_UNKNOWN');
    // The same name from two upstreams is kept apart.
    const catalog = (await (await fetch(`${pc.url}/v2/_catalog`)).json()) as {
      repositories: string[];
    };
    expect(catalog.repositories).toContain('org/oci-app');
    expect(catalog.repositories).toContain('registry.test/org/oci-app');
    expect(catalog.repositories).toContain('library/alpine');
    const page = await fetch(`${pc.url}/v2/_catalog?n=1`);
    expect(((await page.json()) as { repositories: string[] }).repositories).toHaveLength(1);
    expect(page.headers.get('link')).toMatch(/rel="next"/);
  });

  test('a passthrough upstream forwards pushes unchanged, with the client auth, and keeps nothing', async () => {
    const src = tmp();
    await skopeoCopy(pc.host, 'alpine:3.20', src);
    // Clients take their auth challenge from the /v2/ ping, so an upstream that needs auth is
    // passed through as the default upstream of its own pullcache.
    const pt = await startPullcache({
      upstreams: { 'passthru.test': { url: registry.url, mode: 'passthrough' } },
    });
    try {
      await skopeo(
        'copy',
        '--dest-tls-verify=false',
        '--dest-creds',
        'pusher:push-secret',
        `dir:${src}`,
        `docker://${pt.host}/pushed/alpine:copied`,
      );
      expect(await pt.runtime.repositories.listRepositories('passthru.test')).toEqual([]);
      const pulled = tmp();
      await skopeo(
        'copy',
        '--src-tls-verify=false',
        '--src-creds',
        'pusher:push-secret',
        `docker://${pt.host}/pushed/alpine:copied`,
        `dir:${pulled}`,
      );
      expectDirHolds(pulled, alpine);
    } finally {
      await pt.stop();
    }
    const token = registry.tokens.sign(null, 'repository:pushed/alpine:pull');
    const direct = await fetch(`${registry.url}/v2/pushed/alpine/manifests/copied`, {
      headers: { authorization: `Bearer ${token}`, accept: alpine.mediaType },
    });
    expect(direct.status).toBe(200);
    expect(Buffer.from(await direct.arrayBuffer()).equals(alpine.manifest)).toBe(true);
    // Addressed by prefix on a caching pullcache, the request still goes through unchanged.
    const prefixed = await fetch(`${pc.url}/v2/passthru.test/pushed/alpine/manifests/copied`, {
      headers: { authorization: `Bearer ${token}`, accept: alpine.mediaType },
    });
    expect(prefixed.headers.get('docker-content-digest')).toBe(alpine.digest);
    const challenged = await fetch(`${pc.url}/v2/passthru.test/pushed/alpine/manifests/copied`);
    expect(challenged.status).toBe(401);
    expect(challenged.headers.get('www-authenticate')).toContain(registry.tokens.url);
  });

  test('bad requests get OCI errors with the right status, never a 500', async () => {
    const unknown = sha256('nothing');
    const cases: [string, string, number, string][] = [
      ['GET', '/v2/UPPER/case/manifests/latest', 400, 'NAME_INVALID'],
      ['GET', '/v2/library/../etc/manifests/latest', 400, 'NAME_INVALID'],
      ['GET', '/v2/library/%2e%2e/etc/manifests/latest', 400, 'NAME_INVALID'],
      ['GET', '/v2/library/alpine/manifests/bad%21tag', 404, 'MANIFEST_UNKNOWN'],
      ['GET', '/v2/library/alpine/blobs/sha256:xyz', 400, 'DIGEST_INVALID'],
      [
        'GET',
        '/v2/library/alpine/blobs/md5:d41d8cd98f00b204e9800998ecf8427e',
        400,
        'DIGEST_INVALID',
      ],
      ['GET', '/v2/library/alpine/blobs/sha256:%zz', 400, 'DIGEST_INVALID'],
      ['GET', '/v2/library/alpine/manifests/nope', 404, 'MANIFEST_UNKNOWN'],
      ['GET', `/v2/library/alpine/manifests/${unknown}`, 404, 'MANIFEST_UNKNOWN'],
      ['GET', `/v2/library/alpine/blobs/${unknown}`, 404, 'BLOB_UNKNOWN'],
      ['GET', '/v2/library/nothing-here/tags/list', 404, 'NAME_UNKNOWN'],
      ['GET', '/v2/library/alpine/tags/list?n=abc', 400, 'PAGINATION_NUMBER_INVALID'],
      ['PUT', '/v2/library/alpine/manifests/latest', 405, 'UNSUPPORTED'],
      ['POST', '/v2/library/alpine/blobs/uploads/', 405, 'UNSUPPORTED'],
      ['DELETE', `/v2/library/alpine/blobs/${alpine.blobs[0]!.digest}`, 405, 'UNSUPPORTED'],
      ['DELETE', `/v2/library/alpine/manifests/${alpine.digest}`, 405, 'UNSUPPORTED'],
      ['GET', '/v2/x/manifests/latest?ns=10.0.0.1', 400, 'UPSTREAM_UNKNOWN'],
      ['GET', '/v2/nothing', 404, 'NOT_FOUND'],
      ['GET', '/nothing', 404, 'NOT_FOUND'],
    ];
    for (const [method, path, status, code] of cases) {
      const res = await rawRequest(pc.url, method, path);
      expect({ method, path, status: res.status, code: await ociError(res) }).toEqual({
        method,
        path,
        status,
        code,
      });
    }
  });

  test('once listening it greets each upstream, so the first pull makes no 401 round trip', async () => {
    const { log, lines } = capturedLog('info');
    const deadPort = await freePort();
    recorder.reset();
    const fresh = await startPullcache(
      {
        upstreams: {
          'docker.io': { url: recorder.url },
          'dead.test': { url: `http://127.0.0.1:${deadPort}` },
          'air.test': { url: recorder.url, offline: true },
        },
      },
      undefined,
      { log },
    );
    try {
      const greeting = (upstream: string) =>
        lines.find((l) => l.upstream === upstream && l.module === 'upstream');
      await waitFor(async () => !!greeting('docker.io') && !!greeting('dead.test'), 'greetings');
      expect(greeting('docker.io')).toMatchObject({
        msg: 'upstream answers',
        status: 401,
        auth: 'bearer',
      });
      expect(greeting('dead.test')).toMatchObject({ level: 40 });
      expect(greeting('dead.test')!.msg).toMatch(/does not answer/);
      expect(greeting('air.test')).toBeUndefined(); // offline: never dialled
      expect(recorder.requests).toEqual([
        { method: 'GET', path: '/v2/', status: 401, bytes: expect.any(Number), sent: 0 },
      ]);
      expect(JSON.stringify(lines)).not.toMatch(/read-secret|Bearer /);

      recorder.reset();
      const blob = alpine.blobs[1]!;
      const res = await fetch(`${fresh.url}/v2/library/alpine/blobs/${blob.digest}`);
      expect(Buffer.from(await res.arrayBuffer()).equals(blob.bytes)).toBe(true);
      // The token was asked for at once: the upstream never had to say 401 first.
      expect(recorder.requests.map((r) => [r.method, r.status])).toEqual([['GET', 200]]);
    } finally {
      await fresh.stop();
    }
  });

  test('at log level info every request gets one line, manifests (answered before express) and blobs alike', async () => {
    const { log, lines } = capturedLog('info');
    const logged = await startPullcache(
      {
        upstreams: {
          'docker.io': { url: recorder.url, tagTTL: '1h' },
          'registry.test': { url: recorder.url, username: 'reader', password: 'read-secret' },
        },
      },
      undefined,
      { log },
    );
    try {
      const byTag = await fetch(`${logged.url}/v2/library/alpine/manifests/3.20`, {
        headers: { 'x-request-id': 'ci-job-7' },
      });
      expect(byTag.status).toBe(200);
      expect(byTag.headers.get('x-request-id')).toBe('ci-job-7');
      expect(byTag.headers.get('docker-distribution-api-version')).toBe('registry/2.0');
      await byTag.arrayBuffer();
      const missing = await fetch(`${logged.url}/v2/org/nothing/manifests/v9?ns=registry.test`);
      expect(missing.status).toBe(404);
      expect(missing.headers.get('content-type')).toMatch(/^application\/json/);
      expect(await ociError(missing)).toBe('MANIFEST_UNKNOWN');
      const blob = alpine.blobs[0]!;
      const blobRes = await fetch(`${logged.url}/v2/library/alpine/blobs/${blob.digest}`);
      expect(Buffer.from(await blobRes.arrayBuffer()).equals(blob.bytes)).toBe(true);
      const generatedId = blobRes.headers.get('x-request-id');
      expect(generatedId).toMatch(/^[0-9a-f-]{36}$/);
      await new Promise((r) => setTimeout(r, 50)); // lines are written when responses close

      const requests = lines.filter((l) => l.msg === 'request' || l.msg === 'request failed');
      const summary = requests.map((l) => ({
        id: (l.req as { id: string }).id,
        url: (l.req as { url: string }).url,
        status: (l.res as { statusCode: number }).statusCode,
        upstream: l.upstream,
        repository: l.repository,
      }));
      expect(summary).toEqual([
        {
          id: 'ci-job-7',
          url: '/v2/library/alpine/manifests/3.20',
          status: 200,
          upstream: 'docker.io',
          repository: 'library/alpine',
        },
        {
          id: expect.any(String),
          url: '/v2/org/nothing/manifests/v9?ns=registry.test',
          status: 404,
          upstream: 'registry.test',
          repository: 'org/nothing',
        },
        {
          id: generatedId,
          url: `/v2/library/alpine/blobs/${blob.digest}`,
          status: 200,
          upstream: 'docker.io',
          repository: 'library/alpine',
        },
      ]);
      expect(requests[1]!.errorCode).toBe('MANIFEST_UNKNOWN');
      expect(JSON.stringify(lines)).not.toContain('read-secret');

      // A blob the upstream does not have is the client's 404, nothing for the operator: no
      // warning, the request line says it.
      const unknown = `sha256:${'0'.repeat(64)}`;
      const absent = await fetch(`${logged.url}/v2/library/alpine/blobs/${unknown}`);
      expect(absent.status).toBe(404);
      expect(await ociError(absent)).toBe('BLOB_UNKNOWN');
      await new Promise((r) => setTimeout(r, 50));
      expect(lines.filter((l) => (l.level as number) >= 40).map((l) => l.msg)).toEqual([]);
    } finally {
      await logged.stop();
    }
  });

  test('a tag deleted upstream is passed on as 404 once its tagTTL is over', async () => {
    const gone = makeImage('org/gone', 'v1', 'oci', [1500]);
    await pushImage(registry, gone);
    const url = `${pc.url}/v2/registry.test/org/gone/manifests/v1`;
    expect((await fetch(url)).status).toBe(200);
    const token = registry.tokens.pushToken('org/gone');
    const deleted = await fetch(`${registry.url}/v2/org/gone/manifests/${gone.digest}`, {
      method: 'DELETE',
      headers: { authorization: `Bearer ${token}` },
    });
    expect(deleted.status).toBe(202);
    expect((await fetch(url)).status).toBe(200); // still fresh
    await new Promise((r) => setTimeout(r, 1100));
    const after = await fetch(url);
    expect(after.status).toBe(404);
    expect(await ociError(after)).toBe('MANIFEST_UNKNOWN');
  });

  test('with Redis as the metadata cache, a second process on the same storage serves what the first cached', async () => {
    const redis = await startRedis();
    const shared = storage.another();
    const root = (shared.filesystem as { root?: string } | undefined)?.root ?? tmp();
    const upstreams = { 'docker.io': { url: recorder.url, tagTTL: '1h' } };
    const a = await startPullcache(
      { storage: shared, upstreams, cache: { store: 'redis', redis: { url: redis.url } } },
      root,
    );
    const b = await startPullcache(
      { storage: shared, upstreams, cache: { store: 'redis', redis: { url: redis.url } } },
      root,
    );
    try {
      const d1 = tmp();
      await skopeoCopy(a.host, 'org/oci-app:v1', d1);
      expectDirHolds(d1, oci);
      recorder.reset();
      const d2 = tmp();
      await skopeoCopy(b.host, 'org/oci-app:v1', d2);
      expectDirHolds(d2, oci);
      expect(recorder.requests).toEqual([]);
    } finally {
      await a.stop();
      await b.stop();
      await redis.stop();
    }
  });

  test('/v2/, health and readiness answer', async () => {
    const v2 = await fetch(`${pc.url}/v2/`);
    expect(v2.status).toBe(200);
    expect(v2.headers.get('docker-distribution-api-version')).toBe('registry/2.0');
    expect((await fetch(`${pc.url}/healthz`)).status).toBe(200);
    expect((await fetch(`${pc.url}/readyz`)).status).toBe(200);
    const metrics = await (await fetch(`${pc.url}/metrics`)).text();
    expect(metrics).toMatch(
      /pullcache_requests_total\{upstream="docker.io",kind="blob",cache="hit"\} \d+/,
    );
  });

  test('with the upstream stopped, cached tags and digests are served, the uncached answer 503, and a restart loses nothing', async () => {
    const uncached = makeImage('org/never-pulled', 'v1', 'oci', [1000]);
    await pushImage(registry, uncached);
    await recorder.down();
    await new Promise((r) => setTimeout(r, 1100)); // let registry.test's 1 s tagTTL pass
    try {
      const served = await fetch(`${pc.url}/v2/library/alpine/manifests/3.20`);
      expect(served.headers.get('docker-content-digest')).toBe(alpine.digest);
      const blob = await fetch(`${pc.url}/v2/library/alpine/blobs/${alpine.blobs[1]!.digest}`);
      expect(sha256(Buffer.from(await blob.arrayBuffer()))).toBe(alpine.blobs[1]!.digest);
      // Past its 1 s tagTTL: served stale, and said so.
      const stale = await fetch(`${pc.url}/v2/registry.test/org/oci-app/manifests/v1`);
      expect(stale.status).toBe(200);
      expect(stale.headers.get('docker-content-digest')).toBe(oci.digest);
      expect(stale.headers.get('warning')).toMatch(/^299 - "pullcache: stale/);
      const missing = await fetch(`${pc.url}/v2/org/never-pulled/manifests/v1`);
      expect(missing.status).toBe(503);
      expect(await ociError(missing)).toBe('UNAVAILABLE');
      const missingBlob = await fetch(
        `${pc.url}/v2/org/never-pulled/blobs/${uncached.blobs[1]!.digest}`,
      );
      expect(missingBlob.status).toBe(503);

      // A new process on the same storage (memory cache gone) still serves it all, offline.
      const again = await startPullcache(
        { storage: storage.config(), upstreams: { 'docker.io': { url: recorder.url } } },
        pc.root,
      );
      try {
        const dir = tmp();
        await skopeoCopy(again.host, 'alpine:3.20', dir);
        expectDirHolds(dir, alpine);
      } finally {
        await again.stop();
      }
    } finally {
      await recorder.up();
    }
  });

  test('with the upstream down, the tag list of a repository never cached answers 503 as its manifest does; a cached one is served', async () => {
    const uncached = makeImage('org/tags-never-listed', 'v1', 'oci', [1000]);
    await pushImage(registry, uncached);
    await recorder.down();
    try {
      // Refused connections: the first requests, before the circuit opens, and after it.
      for (let i = 0; i < 5; i++) {
        const manifest = await fetch(`${pc.url}/v2/org/tags-never-listed/manifests/v1`);
        const tags = await fetch(`${pc.url}/v2/org/tags-never-listed/tags/list`);
        expect({ i, manifest: manifest.status, tags: tags.status }).toEqual({
          i,
          manifest: 503,
          tags: 503,
        });
        expect(await ociError(tags)).toBe('UNAVAILABLE');
      }
      const cached = await fetch(`${pc.url}/v2/library/alpine/tags/list`);
      expect(cached.status).toBe(200);
      expect(((await cached.json()) as { tags: string[] }).tags).toEqual(['3.20']);
    } finally {
      await recorder.up();
    }
    // Configured offline (air-gapped): the same answer, without dialling anything.
    const offline = await startPullcache(
      {
        storage: storage.config(),
        upstreams: { 'docker.io': { url: recorder.url, offline: true } },
      },
      pc.root,
    );
    try {
      recorder.reset();
      const tags = await fetch(`${offline.url}/v2/org/tags-never-listed/tags/list`);
      expect(tags.status).toBe(503);
      expect(await ociError(tags)).toBe('UNAVAILABLE');
      const cached = await fetch(`${offline.url}/v2/library/alpine/tags/list`);
      expect(((await cached.json()) as { tags: string[] }).tags).toEqual(['3.20']);
      expect(recorder.requests).toEqual([]);
    } finally {
      await offline.stop();
    }
  });
});
