import { existsSync } from 'node:fs';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { fakeServer, servedManifest, type FakeServer } from '../helpers/fake-server.js';
import { ociError, rawRequest } from '../helpers/http.js';
import {
  makeImage,
  pushBlob,
  pushImage,
  pushManifest,
  sha256,
  type Image,
} from '../helpers/images.js';
import { startPullcache, type TestPullcache } from '../helpers/pullcache.js';
import { Recorder } from '../helpers/recorder.js';
import { TestRegistry } from '../helpers/registry.js';
import { paths } from '../../src/storage/paths.js';
import { parseRepository, parseTag } from '../../src/oci/reference.js';

const INDEX = 'application/vnd.oci.image.index.v1+json';
const SIGNATURE = 'application/vnd.example.signature.v1+json';
const SBOM = 'application/vnd.example.sbom.v1+json';

interface Index {
  schemaVersion: number;
  mediaType: string;
  manifests: Record<string, unknown>[];
}

async function index(res: Response): Promise<Index> {
  expect(res.status).toBe(200);
  expect(res.headers.get('content-type')).toBe(INDEX);
  return (await res.json()) as Index;
}

describe('referrers from an upstream without the referrers API (distribution 2.8)', () => {
  let registry: TestRegistry;
  let recorder: Recorder;
  let image: Image;
  let pc: TestPullcache;

  beforeAll(async () => {
    registry = await TestRegistry.start();
    recorder = await Recorder.start(registry.url);
    image = makeImage('org/app', 'v1', 'oci', [1000]);
    await pushImage(registry, image);
    pc = await startPullcache({ upstreams: { 'docker.io': { url: recorder.url } } });
  });
  afterAll(async () => {
    await pc?.stop();
    await recorder?.close();
    await registry?.close();
  });

  test('the answer is an empty OCI image index, filtered or not, GET and HEAD', async () => {
    const url = `${pc.url}/v2/org/app/referrers/${image.digest}`;
    const all = await fetch(url);
    expect(all.headers.get('oci-filters-applied')).toBeNull();
    expect(await index(all)).toEqual({ schemaVersion: 2, mediaType: INDEX, manifests: [] });
    // The upstream was asked, and said 404: it has no such API.
    expect(recorder.requests.filter((r) => r.path.includes('/referrers/'))).toMatchObject([
      { method: 'GET', path: `/v2/org/app/referrers/${image.digest}`, status: 404 },
    ]);

    const filtered = await fetch(`${url}?artifactType=${encodeURIComponent(SIGNATURE)}`);
    expect(filtered.headers.get('oci-filters-applied')).toBe('artifactType');
    expect(await index(filtered)).toEqual({ schemaVersion: 2, mediaType: INDEX, manifests: [] });

    const head = await fetch(url, { method: 'HEAD' });
    expect(head.status).toBe(200);
    expect(head.headers.get('content-type')).toBe(INDEX);
    expect(Number(head.headers.get('content-length'))).toBeGreaterThan(0);
  });

  test('the digest is checked before anything: a malformed one is 400 and reaches no upstream', async () => {
    recorder.reset();
    const cases: [string, number, string][] = [
      ['/v2/org/app/referrers/sha256:xyz', 400, 'DIGEST_INVALID'],
      ['/v2/org/app/referrers/v1', 400, 'DIGEST_INVALID'],
      [`/v2/org/app/referrers/md5:${'0'.repeat(32)}`, 400, 'DIGEST_INVALID'],
      ['/v2/org/app/referrers/sha256:%zz', 400, 'DIGEST_INVALID'],
      [`/v2/Org/app/referrers/${image.digest}`, 400, 'NAME_INVALID'],
    ];
    for (const [path, status, code] of cases) {
      const res = await rawRequest(pc.url, 'GET', path);
      expect({ path, status: res.status, code: await ociError(res) }).toEqual({
        path,
        status,
        code,
      });
    }
    expect(recorder.requests).toEqual([]);
  });

  test('referrers take no push: another method is 405 with Allow', async () => {
    const res = await rawRequest(pc.url, 'PUT', `/v2/org/app/referrers/${image.digest}`);
    expect(res.status).toBe(405);
    expect(res.headers.allow).toBe('GET, HEAD');
    expect(await ociError(res)).toBe('UNSUPPORTED');
  });
});

const OCI_MANIFEST = 'application/vnd.oci.image.manifest.v1+json';
const DOCKER_LIST = 'application/vnd.docker.distribution.manifest.list.v2+json';

/**
 * Pushes an artifact whose subject is `subject` to a registry without the referrers API, as oras
 * (or cosign, through go-containerregistry) does: the artifact by digest, then an index listing
 * it under the referrers tag schema's tag `sha256-<hex>` of the subject. Resolves to the
 * artifact's descriptor as listed.
 */
async function pushReferrer(
  registry: TestRegistry,
  subject: Image,
  artifactType: string,
  indexType = INDEX,
): Promise<Record<string, unknown>> {
  const empty = { digest: sha256('{}'), bytes: Buffer.from('{}') };
  const bytes = Buffer.from(`${artifactType} of ${subject.digest}`);
  const content = { digest: sha256(bytes), bytes };
  for (const blob of [empty, content]) await pushBlob(registry, subject.repository, blob);
  const annotations = { 'org.opencontainers.image.created': '2026-01-01T00:00:00Z' };
  const manifest = Buffer.from(
    JSON.stringify({
      schemaVersion: 2,
      mediaType: OCI_MANIFEST,
      artifactType,
      config: { mediaType: 'application/vnd.oci.empty.v1+json', digest: empty.digest, size: 2 },
      layers: [{ mediaType: artifactType, digest: content.digest, size: content.bytes.length }],
      subject: {
        mediaType: subject.mediaType,
        digest: subject.digest,
        size: subject.manifest.length,
      },
      annotations,
    }),
  );
  const digest = sha256(manifest);
  await pushManifest(registry, subject.repository, digest, manifest, OCI_MANIFEST);
  const listed = {
    mediaType: OCI_MANIFEST,
    digest,
    size: manifest.length,
    artifactType,
    annotations,
  };
  const index = Buffer.from(
    JSON.stringify({ schemaVersion: 2, mediaType: indexType, manifests: [listed] }),
  );
  await pushManifest(registry, subject.repository, referrersTag(subject), index, indexType);
  return listed;
}

const referrersTag = (subject: Image) => subject.digest.replace(':', '-');

describe('referrers from the referrers tag schema of an upstream without the API (distribution 2.8)', () => {
  let registry: TestRegistry;
  let recorder: Recorder;
  let pc: TestPullcache;
  /** Listed by an OCI index under its referrers tag. */
  let signed: Image;
  let signature: Record<string, unknown>;
  /** Listed by a Docker manifest list under its referrers tag. */
  let listed: Image;
  let sbom: Record<string, unknown>;
  /** No referrers tag. */
  let unsigned: Image;

  beforeAll(async () => {
    registry = await TestRegistry.start();
    recorder = await Recorder.start(registry.url);
    signed = makeImage('org/signed', 'v1', 'oci', [1000]);
    listed = makeImage('org/signed', 'v2', 'oci', [1000]);
    unsigned = makeImage('org/signed', 'v3', 'oci', [1000]);
    for (const image of [signed, listed, unsigned]) await pushImage(registry, image);
    // The same image in another repository, which has no referrers tag of its own.
    await pushImage(registry, { ...signed, repository: 'org/other' });
    signature = await pushReferrer(registry, signed, SIGNATURE);
    sbom = await pushReferrer(registry, listed, SBOM, DOCKER_LIST);
    pc = await startPullcache({ upstreams: { 'docker.io': { url: recorder.url } } });
  });
  afterAll(async () => {
    await pc?.stop();
    await recorder?.close();
    await registry?.close();
  });

  const referrersOf = (repository: string, subject: Image, type?: string) =>
    fetch(
      `${pc.url}/v2/${repository}/referrers/${subject.digest}${
        type === undefined ? '' : `?artifactType=${encodeURIComponent(type)}`
      }`,
    );
  // Not the upstream's 401s: they ask for a token (one of them expired on a slow run), and the
  // same request follows.
  const tagAsked = (repository: string, subject: Image) =>
    recorder.requests
      .filter((r) => r.path === `/v2/${repository}/manifests/${referrersTag(subject)}`)
      .filter((r) => r.status !== 401)
      .map(({ method, status }) => ({ method, status }));

  test('the index under the referrers tag is the answer, filtered or not; the tag is no image of the cache', async () => {
    recorder.reset();
    const all = await referrersOf('org/signed', signed);
    expect(all.headers.get('oci-filters-applied')).toBeNull();
    expect(await index(all)).toEqual({
      schemaVersion: 2,
      mediaType: INDEX,
      manifests: [signature],
    });

    const matching = await referrersOf('org/signed', signed, SIGNATURE);
    expect(matching.headers.get('oci-filters-applied')).toBe('artifactType');
    expect((await index(matching)).manifests).toEqual([signature]);
    const other = await referrersOf('org/signed', signed, SBOM);
    expect(other.headers.get('oci-filters-applied')).toBe('artifactType');
    expect((await index(other)).manifests).toEqual([]);

    // For each answer (each one cached on its own), the API (404), then the tag: a HEAD (free
    // against Docker Hub's pull limit), and a GET of the index it names, by digest.
    expect(recorder.requests.filter((r) => r.path.includes('/referrers/'))).toHaveLength(3);
    const head = { method: 'HEAD', status: 200 };
    expect(tagAsked('org/signed', signed)).toEqual([head, head, head]);
    const gets = recorder.requests.filter(
      (r) => r.method === 'GET' && r.path.includes('/manifests/') && r.status !== 401,
    );
    expect(gets.map((r) => [r.path.split('/manifests/')[1]!.slice(0, 7), r.status])).toEqual([
      ['sha256:', 200],
      ['sha256:', 200],
      ['sha256:', 200],
    ]);
    // Inside tagTTL the answer is the cache's: nothing is asked again.
    recorder.reset();
    expect((await index(await referrersOf('org/signed', signed))).manifests).toEqual([signature]);
    expect(recorder.requests).toEqual([]);
    // The tag is read, not kept: no image of the repository (ls, eviction, pulls) comes of it.
    const repo = { upstream: 'docker.io', repository: parseRepository('org/signed') };
    const link = join(pc.root, paths.tagLink(repo, parseTag(referrersTag(signed))));
    expect(existsSync(link)).toBe(false);
  });

  test('a Docker manifest list under the referrers tag is read as well', async () => {
    expect((await index(await referrersOf('org/signed', listed))).manifests).toEqual([sbom]);
    expect((await index(await referrersOf('org/signed', listed, SBOM))).manifests).toEqual([sbom]);
    expect((await index(await referrersOf('org/signed', listed, SIGNATURE))).manifests).toEqual([]);
  });

  test('a subject without a referrers tag has no referrers: an empty index', async () => {
    recorder.reset();
    const res = await referrersOf('org/signed', unsigned);
    expect(await index(res)).toEqual({ schemaVersion: 2, mediaType: INDEX, manifests: [] });
    // A HEAD, and no more: most subjects have no such tag.
    expect(tagAsked('org/signed', unsigned)).toEqual([{ method: 'HEAD', status: 404 }]);
  });

  test('the referrers tag is read in the repository asked about only', async () => {
    // org/signed's tag of this subject is stored upstream.
    recorder.reset();
    const res = await referrersOf('org/other', signed);
    expect(await index(res)).toEqual({ schemaVersion: 2, mediaType: INDEX, manifests: [] });
    expect(tagAsked('org/other', signed)).toEqual([{ method: 'HEAD', status: 404 }]);
    expect(recorder.requests.filter((r) => r.path.startsWith('/v2/org/signed/'))).toEqual([]);
  });
});

/** A referring manifest's descriptor as a registry with the referrers API lists it. */
function referrer(artifactType: string, n: number): Record<string, unknown> {
  const bytes = `{"referrer":${n}}`;
  return {
    mediaType: 'application/vnd.oci.image.manifest.v1+json',
    digest: sha256(bytes),
    size: bytes.length,
    artifactType,
    annotations: { 'org.example.n': String(n) },
  };
}

describe('referrers from an upstream with the referrers API (in-process fake)', () => {
  /** Held by the cache (pulled first): only a held subject's answers are stored. */
  const held = servedManifest('org/signed', 'the subject manifest');
  const subject = held.digest;
  const signature = referrer(SIGNATURE, 1);
  const sbom = referrer(SBOM, 2);
  let upstream: FakeServer;
  let pc: TestPullcache;
  /** When true the fake ignores artifactType, as a registry may (the spec makes it a SHOULD). */
  let ignoresFilter = false;

  const handler = (req: IncomingMessage, res: ServerResponse) => {
    if (held.serve(req, res)) return;
    const url = new URL(req.url ?? '/', 'http://fake');
    const m = /^\/v2\/org\/signed\/referrers\/(sha256:[0-9a-f]{64})$/.exec(url.pathname);
    if (!m || m[1] !== subject) {
      res.writeHead(url.pathname === '/v2/' ? 200 : 404).end('{}');
      return;
    }
    const type = url.searchParams.get('artifactType');
    const filter = type !== null && !ignoresFilter;
    const headers: Record<string, string> = { 'content-type': INDEX };
    if (filter) headers['oci-filters-applied'] = 'artifactType';
    // Two pages when unfiltered: the second is linked from the first, as the spec pages.
    let manifests = [signature, sbom];
    if (filter) manifests = manifests.filter((d) => d.artifactType === type);
    else if (url.searchParams.get('page') === '2') manifests = [sbom];
    else {
      manifests = [signature];
      headers.link = `</v2/org/signed/referrers/${subject}?page=2${type ? `&artifactType=${encodeURIComponent(type)}` : ''}>; rel="next"`;
    }
    res
      .writeHead(200, headers)
      .end(JSON.stringify({ schemaVersion: 2, mediaType: INDEX, manifests }));
  };

  beforeAll(async () => {
    upstream = await fakeServer(handler);
    pc = await startPullcache({
      upstreams: { 'docker.io': { url: upstream.url, tagTTL: '1s' } },
    });
    const pulled = await fetch(`${pc.url}/v2/org/signed/manifests/${subject}`);
    expect(pulled.status).toBe(200);
    await pulled.arrayBuffer();
  });
  afterAll(async () => {
    await pc?.stop();
    await upstream?.close();
  });

  const referrersOf = (query = '') => fetch(`${pc.url}/v2/org/signed/referrers/${subject}${query}`);
  const asked = () => upstream.requests.filter((r) => r.url.includes('/referrers/'));

  test('every page is joined into one index, each descriptor as the upstream sent it', async () => {
    const body = await index(await referrersOf());
    expect(body).toEqual({ schemaVersion: 2, mediaType: INDEX, manifests: [signature, sbom] });
    expect(asked().map((r) => r.url)).toEqual([
      `/v2/org/signed/referrers/${subject}`,
      `/v2/org/signed/referrers/${subject}?page=2`,
    ]);
  });

  test('artifactType is passed on, and the answer says the filter was applied', async () => {
    upstream.requests.length = 0;
    const res = await referrersOf(`?artifactType=${encodeURIComponent(SBOM)}`);
    expect(res.headers.get('oci-filters-applied')).toBe('artifactType');
    expect((await index(res)).manifests).toEqual([sbom]);
    expect(asked().map((r) => new URL(r.url, 'http://x').searchParams.get('artifactType'))).toEqual(
      [SBOM],
    );
  });

  test('an upstream that ignores artifactType is filtered here, and the answer still says so', async () => {
    ignoresFilter = true;
    try {
      const res = await referrersOf(`?artifactType=${encodeURIComponent(SIGNATURE)}`);
      expect(res.headers.get('oci-filters-applied')).toBe('artifactType');
      expect((await index(res)).manifests).toEqual([signature]);
    } finally {
      ignoresFilter = false;
    }
    // Several types: kept by any of them.
    const both = await referrersOf(
      `?artifactType=${encodeURIComponent(SBOM)}&artifactType=${encodeURIComponent(SIGNATURE)}`,
    );
    expect(both.headers.get('oci-filters-applied')).toBe('artifactType');
    expect((await index(both)).manifests).toEqual([signature, sbom]);
  });

  test('a kept answer is served without asking inside tagTTL, and stale when the upstream is down, across a restart too', async () => {
    const fresh = await index(await referrersOf());
    upstream.requests.length = 0;
    expect(await index(await referrersOf())).toEqual(fresh);
    expect(asked()).toEqual([]);

    await upstream.close();
    try {
      await new Promise((r) => setTimeout(r, 1100)); // past tagTTL
      const stale = await referrersOf();
      expect(stale.headers.get('warning')).toMatch(/^299 - "pullcache: stale/);
      expect(await index(stale)).toEqual(fresh);
      const filtered = await referrersOf(`?artifactType=${encodeURIComponent(SBOM)}`);
      expect(filtered.headers.get('oci-filters-applied')).toBe('artifactType');
      expect((await index(filtered)).manifests).toEqual([sbom]);
      // Never asked before: nothing to stand in for the upstream's answer, as for a manifest.
      const never = await fetch(`${pc.url}/v2/org/signed/referrers/${sha256('another')}`);
      expect(never.status).toBe(503);
      expect(await ociError(never)).toBe('UNAVAILABLE');

      // A new process on the same storage, configured offline: the kept answer is still there.
      const again = await startPullcache(
        { upstreams: { 'docker.io': { url: upstream.url, tagTTL: '1s', offline: true } } },
        pc.root,
      );
      try {
        const kept = await fetch(`${again.url}/v2/org/signed/referrers/${subject}`);
        expect(kept.headers.get('warning')).toMatch(/^299 - "pullcache: stale/);
        expect(await index(kept)).toEqual(fresh);
      } finally {
        await again.stop();
      }
    } finally {
      upstream = await fakeServer(handler);
    }
  });
});
