/**
 * No content leaks between repositories: blob bytes are shared by digest in storage, but a blob
 * is served for a repository only when that repository holds it, or its upstream confirms (a HEAD
 * with that repository's scope) that it has it. Real parts: the upstream is Debian's
 * docker-registry with token auth, where `private/*` needs the reader's credentials and a
 * repository has only the blobs pushed to (or mounted into) it.
 */
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { parseDigest } from '../../src/oci/digest.js';
import { parseRepository } from '../../src/oci/reference.js';
import { fakeServer, type FakeServer } from '../helpers/fake-server.js';
import { ociError } from '../helpers/http.js';
import { makeImage, pushBlob, pushImage, sha256, type Image } from '../helpers/images.js';
import { freePort } from '../helpers/net.js';
import { startPullcache, type TestPullcache } from '../helpers/pullcache.js';
import { Recorder } from '../helpers/recorder.js';
import { TestRegistry } from '../helpers/registry.js';
import { expectDirHolds, skopeoCopy } from '../helpers/skopeo.js';

const tmp = () => mkdtempSync(join(tmpdir(), 'pullcache-isolation-'));
const BLOB_GET = /\/blobs\/sha256:/;
const digestOf = (value: string) => parseDigest(value).digest;

describe('content is served per repository', () => {
  let registry: TestRegistry;
  let recorder: Recorder;
  let pc: TestPullcache;
  /** private/app:v1, pulled through pullcache with the upstream credentials: its blobs are stored. */
  let secret: Image;
  /** org/public:v1, an unrelated public image. */
  let pub: Image;

  const url = (path: string) => `${pc.url}/v2/${path}`;
  const repo = (upstream: string, repository: string) => ({
    upstream,
    repository: parseRepository(repository),
  });

  beforeAll(async () => {
    registry = await TestRegistry.start();
    secret = makeImage('private/app', 'v1', 'docker', [30_000, 20_000, 10_000]);
    pub = makeImage('org/public', 'v1', 'oci', [5_000]);
    for (const image of [secret, pub]) await pushImage(registry, image);
    recorder = await Recorder.start(registry.url);
    pc = await startPullcache({
      upstreams: {
        'registry.test': { url: recorder.url, username: 'reader', password: 'read-secret' },
        // The same registry without credentials: another upstream, whose repositories are its own.
        'other.test': { url: recorder.url },
      },
      routing: { default: 'registry.test' },
    });
    const dir = tmp();
    await skopeoCopy(pc.host, 'private/app:v1', dir);
    expectDirHolds(dir, secret);
    await skopeoCopy(pc.host, 'org/public:v1', tmp());
  });
  afterAll(async () => {
    await pc?.stop();
    await recorder?.close();
    await registry?.close();
  });

  test("a private repository's layer asked for under a public repository's name is 404 and never served", async () => {
    const layer = secret.blobs[1]!;
    // Stored (the private image was pulled), and the public repository does not have it upstream.
    expect((await pc.runtime.blobs.stat(digestOf(layer.digest))).found).toBe(true);
    recorder.reset();
    const get = await fetch(url(`org/public/blobs/${layer.digest}`));
    expect(get.status).toBe(404);
    expect(await ociError(get)).toBe('BLOB_UNKNOWN');
    const head = await fetch(url(`org/public/blobs/${layer.digest}`), { method: 'HEAD' });
    expect(head.status).toBe(404);
    const ranged = await fetch(url(`org/public/blobs/${layer.digest}`), {
      headers: { range: 'bytes=0-99' },
    });
    expect(ranged.status).toBe(404);
    const conditional = await fetch(url(`org/public/blobs/${layer.digest}`), {
      headers: { 'if-none-match': `"${layer.digest}"` },
    });
    expect(conditional.status).toBe(404);
    // The upstream was asked with the public repository's scope, and said no; nothing moved.
    expect(recorder.count('HEAD', new RegExp(`/org/public/blobs/${layer.digest}$`))).toBe(4);
    expect(recorder.count('GET', BLOB_GET)).toBe(0);
    expect(
      await pc.runtime.repositories.hasBlob(
        repo('registry.test', 'org/public'),
        digestOf(layer.digest),
      ),
    ).toBe(false);
    // Its own repository is served as always.
    const own = await fetch(url(`private/app/blobs/${layer.digest}`));
    expect(Buffer.from(await own.arrayBuffer()).equals(layer.bytes)).toBe(true);
  });

  test("a private manifest is not served under a public repository's name, by the manifest or the blob endpoint", async () => {
    const byDigest = await fetch(url(`org/public/manifests/${secret.digest}`));
    expect(byDigest.status).toBe(404);
    expect(await ociError(byDigest)).toBe('MANIFEST_UNKNOWN');
    const asBlob = await fetch(url(`org/public/blobs/${secret.digest}`));
    expect(asBlob.status).toBe(404);
    // Its own repository serves its manifest's bytes as a blob too (the revision link holds it).
    const own = await fetch(url(`private/app/blobs/${secret.digest}`));
    expect(own.status).toBe(200);
    expect(Buffer.from(await own.arrayBuffer()).equals(secret.manifest)).toBe(true);
  });

  test('a digest the public repository really has upstream is served once a HEAD confirms it, then from memory', async () => {
    const shared = secret.blobs[2]!;
    const publicRepo = repo('registry.test', 'org/public');
    await pushBlob(registry, 'org/public', shared);
    recorder.reset();
    const first = await fetch(url(`org/public/blobs/${shared.digest}`));
    expect(first.status).toBe(200);
    expect(Buffer.from(await first.arrayBuffer()).equals(shared.bytes)).toBe(true);
    // One HEAD with the public repository's scope; the bytes came from storage, not upstream.
    expect(recorder.requests.map((r) => `${r.method} ${r.path} ${r.status}`)).toEqual([
      `HEAD /v2/org/public/blobs/${shared.digest} 200`,
    ]);
    // Linked through the repository store: on disk, and in the lifecycle's graph.
    expect(await pc.runtime.repositories.hasBlob(publicRepo, digestOf(shared.digest))).toBe(true);
    expect(
      pc.runtime.lifecycle.graph.repositories
        .get('registry.test/org/public')
        ?.links.has(digestOf(shared.digest)),
    ).toBe(true);
    recorder.reset();
    for (const method of ['GET', 'HEAD', 'GET']) {
      const again = await fetch(url(`org/public/blobs/${shared.digest}`), { method });
      expect(again.status).toBe(200);
      await again.arrayBuffer();
    }
    expect(recorder.requests).toEqual([]);
  });

  test('a HEAD that confirms without a Content-Length serves the stored blob whole', async () => {
    const shared = secret.blobs[0]!;
    await pushBlob(registry, 'org/public', shared);
    recorder.reset();
    recorder.headWithoutLength = true;
    try {
      const head = await fetch(url(`org/public/blobs/${shared.digest}`), { method: 'HEAD' });
      expect(head.status).toBe(200);
      expect(head.headers.get('content-length')).toBe(String(shared.bytes.length));
      const get = await fetch(url(`org/public/blobs/${shared.digest}`));
      expect(get.status).toBe(200);
      expect(Buffer.from(await get.arrayBuffer()).equals(shared.bytes)).toBe(true);
    } finally {
      recorder.headWithoutLength = false;
    }
    expect(recorder.requests.map((r) => `${r.method} ${r.path}`)).toEqual([
      `HEAD /v2/org/public/blobs/${shared.digest}`,
    ]);
  });

  test('another upstream holding the same digest does not make it served', async () => {
    const layer = secret.blobs[1]!;
    recorder.reset();
    // The same repository name under the other upstream (no credentials for private/*).
    const sameName = await fetch(url(`other.test/private/app/blobs/${layer.digest}`));
    expect([403, 404]).toContain(sameName.status);
    await sameName.arrayBuffer();
    const publicName = await fetch(url(`other.test/org/public/blobs/${layer.digest}`));
    expect(publicName.status).toBe(404);
    expect(recorder.count('GET', BLOB_GET)).toBe(0);
    expect(
      await pc.runtime.repositories.hasBlob(
        repo('other.test', 'private/app'),
        digestOf(layer.digest),
      ),
    ).toBe(false);
    // Linked for registry.test's org/public (previous test), still asked of other.test's own.
    const shared = secret.blobs[2]!;
    recorder.reset();
    const confirmed = await fetch(url(`other.test/org/public/blobs/${shared.digest}`));
    expect(confirmed.status).toBe(200);
    await confirmed.arrayBuffer();
    expect(recorder.count('HEAD', new RegExp(`/org/public/blobs/${shared.digest}$`))).toBe(1);
  });

  test('an image whose layers are stored for another repository is pulled whole after one HEAD per layer, nothing fetched twice', async () => {
    // The same image in a private and a public repository upstream (as base layers are shared).
    const base = makeImage('private/base', 'v1', 'docker', [40_000, 8_000]);
    await pushImage(registry, base);
    const mirror: Image = { ...base, repository: 'org/base' };
    await pushImage(registry, mirror);
    await skopeoCopy(pc.host, 'private/base:v1', tmp());
    recorder.reset();
    const dir = tmp();
    await skopeoCopy(pc.host, 'org/base:v1', dir);
    expectDirHolds(dir, mirror);
    expect(recorder.count('GET', BLOB_GET)).toBe(0);
    expect(recorder.blobBytes()).toBe(0);
    expect(recorder.count('HEAD', BLOB_GET)).toBe(base.blobs.length);
    recorder.reset();
    await skopeoCopy(pc.host, 'org/base:v1', tmp());
    expect(recorder.count('HEAD', BLOB_GET)).toBe(0);
  });

  test('a blob being fetched for one repository is followed under another name only once the upstream confirms', async () => {
    const big = makeImage('private/big', 'v1', 'oci', [8 * 1024 * 1024]);
    await pushImage(registry, big);
    const layer = big.blobs[1]!;
    const twin = makeImage('org/twin', 'v1', 'oci', [1000]);
    await pushImage(registry, twin);
    await pushBlob(registry, 'org/twin', layer); // org/twin has it upstream; org/public does not
    recorder.reset();
    const owner = await fetch(url(`private/big/blobs/${layer.digest}`)); // headers: fetch under way
    const [refused, confirmed] = await Promise.all([
      fetch(url(`org/public/blobs/${layer.digest}`)),
      fetch(url(`org/twin/blobs/${layer.digest}`)),
    ]);
    expect(refused.status).toBe(404);
    await refused.arrayBuffer();
    expect(confirmed.status).toBe(200);
    expect(sha256(Buffer.from(await confirmed.arrayBuffer()))).toBe(layer.digest);
    expect(sha256(Buffer.from(await owner.arrayBuffer()))).toBe(layer.digest);
    expect(recorder.count('GET', BLOB_GET)).toBe(1); // one fetch, for private/big
    await expect
      .poll(() =>
        pc.runtime.repositories.hasBlob(repo('registry.test', 'org/twin'), digestOf(layer.digest)),
      )
      .toBe(true);
    expect(
      await pc.runtime.repositories.hasBlob(
        repo('registry.test', 'org/public'),
        digestOf(layer.digest),
      ),
    ).toBe(false);
  });

  test('with the upstream offline or down, a digest stored for another repository answers 503 as one never stored does, while its own are served', async () => {
    const layer = secret.blobs[1]!; // stored, for private/app only
    const unstored = sha256(randomBytes(64));
    /** Each way of asking for `digest` under org/public: its status and error code. */
    const answers = async (base: string, digest: string) => {
      const blob = `${base}/v2/org/public/blobs/${digest}`;
      const manifest = `${base}/v2/org/public/manifests/${digest}`;
      const asked: [string, string, RequestInit][] = [
        ['blob GET', blob, {}],
        ['blob HEAD', blob, { method: 'HEAD' }],
        ['blob range', blob, { headers: { range: 'bytes=0-99' } }],
        ['blob if-none-match', blob, { headers: { 'if-none-match': `"${digest}"` } }],
        ['manifest GET', manifest, {}],
        ['manifest HEAD', manifest, { method: 'HEAD' }],
      ];
      const got: Record<string, string> = {};
      for (const [what, url, init] of asked) {
        const res = await fetch(url, init);
        got[what] = `${res.status} ${init.method === 'HEAD' ? '' : await ociError(res)}`;
      }
      return got;
    };
    const unavailable = {
      'blob GET': '503 UNAVAILABLE',
      'blob HEAD': '503 ',
      'blob range': '503 UNAVAILABLE',
      'blob if-none-match': '503 UNAVAILABLE',
      'manifest GET': '503 UNAVAILABLE',
      'manifest HEAD': '503 ',
    };
    for (const upstream of [
      { url: recorder.url, offline: true },
      { url: `http://127.0.0.1:${await freePort()}` }, // nothing listens: down
    ]) {
      const cut = await startPullcache(
        { upstreams: { 'registry.test': upstream }, routing: { default: 'registry.test' } },
        pc.root,
      );
      try {
        recorder.reset();
        // Stored or not, the same answer: nothing tells which digests (of a private image's
        // layers, say) are stored.
        expect({ upstream, stored: await answers(cut.url, layer.digest) }).toEqual({
          upstream,
          stored: unavailable,
        });
        expect({ upstream, unstored: await answers(cut.url, unstored) }).toEqual({
          upstream,
          unstored: unavailable,
        });
        // The private manifest by digest, the same.
        expect(await answers(cut.url, secret.digest)).toEqual(unavailable);
        expect(
          await pc.runtime.repositories.hasBlob(
            repo('registry.test', 'org/public'),
            digestOf(layer.digest),
          ),
        ).toBe(false);
        const own = await fetch(`${cut.url}/v2/private/app/blobs/${layer.digest}`);
        expect(Buffer.from(await own.arrayBuffer()).equals(layer.bytes)).toBe(true);
        // Confirmed and linked while online: still served, from its link.
        const shared = secret.blobs[2]!;
        const linked = await fetch(`${cut.url}/v2/org/public/blobs/${shared.digest}`);
        expect(Buffer.from(await linked.arrayBuffer()).equals(shared.bytes)).toBe(true);
        const dir = tmp();
        await skopeoCopy(cut.host, 'org/public:v1', dir);
        expectDirHolds(dir, pub);
        rmSync(dir, { recursive: true });
        expect(recorder.requests).toEqual([]);
      } finally {
        await cut.stop();
      }
    }
  });
});

/**
 * A body slow enough to be in flight while other repositories ask for the same digest: a pace a
 * real registry cannot be made to keep, so an in-process upstream where each repository has only
 * the blobs given to it.
 */
describe('a blob being fetched, asked for under other repositories', () => {
  let upstream: FakeServer;
  let pc: TestPullcache;
  const bytes = randomBytes(2 * 1024 * 1024);
  const digest = sha256(bytes);
  /** Which repositories have the blob upstream. */
  const holders = new Set(['team/private', 'team/twin']);

  beforeAll(async () => {
    upstream = await fakeServer((req, res) => {
      const m = /^\/v2\/(.+)\/blobs\/(sha256:[a-f0-9]{64})$/.exec(req.url ?? '');
      if (!m) {
        res.writeHead(req.url === '/v2/' ? 200 : 404).end();
        return;
      }
      if (m[2] !== digest || !holders.has(m[1]!)) {
        res.writeHead(404).end();
        return;
      }
      res.writeHead(200, { 'content-length': bytes.length });
      if (req.method === 'HEAD') {
        res.end();
        return;
      }
      let offset = 0;
      const send = () => {
        if (res.destroyed) return;
        const chunk = bytes.subarray(offset, offset + 65536);
        offset += chunk.length;
        if (offset >= bytes.length) res.end(chunk);
        else res.write(chunk, () => setTimeout(send, 15));
      };
      send();
    });
    pc = await startPullcache({ upstreams: { 'lab.test': { url: upstream.url } } });
  });
  afterAll(async () => {
    await pc?.stop();
    await upstream?.close();
  });

  test('is refused to a repository the upstream denies it to, and followed (then linked) for one it confirms', async () => {
    const blobUrl = (repository: string) => `${pc.url}/v2/${repository}/blobs/${digest}`;
    const owner = await fetch(blobUrl('team/private')); // headers sent: the fetch is under way
    expect((await pc.runtime.blobs.stat(digestOf(digest))).found).toBe(false);
    const [refused, twin] = await Promise.all([
      fetch(blobUrl('team/public')),
      fetch(blobUrl('team/twin')),
    ]);
    expect(refused.status).toBe(404);
    expect(await ociError(refused)).toBe('BLOB_UNKNOWN');
    expect(twin.status).toBe(200);
    const [ownerBytes, twinBytes] = await Promise.all([owner.arrayBuffer(), twin.arrayBuffer()]);
    expect(Buffer.from(ownerBytes).equals(bytes)).toBe(true);
    expect(Buffer.from(twinBytes).equals(bytes)).toBe(true);
    const asked = (method: string, repository: string) =>
      upstream.requests.filter(
        (r) => r.method === method && r.url === `/v2/${repository}/blobs/${digest}`,
      ).length;
    expect(asked('GET', 'team/private')).toBe(1);
    expect(asked('GET', 'team/twin')).toBe(0); // followed the one fetch
    expect(asked('HEAD', 'team/twin')).toBe(1);
    expect(asked('HEAD', 'team/public')).toBe(1);
    // The fetch was kept: linked to both repositories it was served for, not to the refused one.
    const linked = (repository: string) =>
      pc.runtime.repositories.hasBlob(
        { upstream: 'lab.test', repository: parseRepository(repository) },
        digestOf(digest),
      );
    await expect.poll(() => linked('team/twin')).toBe(true);
    expect(await linked('team/private')).toBe(true);
    expect(await linked('team/public')).toBe(false);
    const again = await fetch(blobUrl('team/public'));
    expect(again.status).toBe(404);
    await again.arrayBuffer();
  });
});
