/**
 * Referrers answers and storage. Anyone may ask for the referrers of any repository name,
 * subject digest and set of artifact types, so an empty answer (404 from an upstream without the
 * referrers API and no referrers tag, an empty index from one with it) is not written to storage,
 * where nothing would ever remove it: it is remembered in memory. Nor is one for a subject the
 * repository does not hold, or for artifact types no referrer listed has. An answer that lists
 * referrers of a held subject is stored (and served across a restart: test/http/referrers.test.ts).
 * Real parts: Debian's docker-registry (distribution 2.8, no referrers API); an in-process fake
 * for a registry with the API.
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { fakeServer, servedManifest, type FakeServer } from '../helpers/fake-server.js';
import { snapshot } from '../helpers/files.js';
import { makeImage, pushImage, sha256, type Image } from '../helpers/images.js';
import { startPullcache, type TestPullcache } from '../helpers/pullcache.js';
import { Recorder } from '../helpers/recorder.js';
import { TestRegistry } from '../helpers/registry.js';

const INDEX = 'application/vnd.oci.image.index.v1+json';
const SIGNATURE = 'application/vnd.example.signature.v1+json';
const SBOM = 'application/vnd.example.sbom.v1+json';

describe('referrers answers in storage', () => {
  let registry: TestRegistry;
  let recorder: Recorder;
  let api: FakeServer;
  let pc: TestPullcache;
  let image: Image;
  /** The one subject the fake registry lists a referrer of (in org/signed), until emptied. */
  const signed = servedManifest('org/signed', 'a signed manifest');
  const subject = signed.digest;
  const signature = {
    mediaType: 'application/vnd.oci.image.manifest.v1+json',
    digest: sha256('{"signature":1}'),
    size: 15,
    artifactType: SIGNATURE,
  };
  const sbom = {
    mediaType: 'application/vnd.oci.image.manifest.v1+json',
    digest: sha256('{"sbom":1}'),
    size: 10,
    artifactType: SBOM,
  };
  let emptied = false;

  /** A registry with the referrers API: an empty index for every subject but one. */
  const handler = (req: IncomingMessage, res: ServerResponse) => {
    if (signed.serve(req, res)) return;
    const url = new URL(req.url ?? '/', 'http://fake');
    const m = /^\/v2\/(.+)\/referrers\/(sha256:[0-9a-f]{64})$/.exec(url.pathname);
    if (!m) {
      res.writeHead(url.pathname === '/v2/' ? 200 : 404).end('{}');
      return;
    }
    const listed = m[1] === 'org/signed' && m[2] === subject && !emptied;
    const type = url.searchParams.get('artifactType');
    const all = listed ? [signature, sbom] : [];
    const manifests = type === null ? all : all.filter((d) => d.artifactType === type);
    res
      .writeHead(200, { 'content-type': INDEX })
      .end(JSON.stringify({ schemaVersion: 2, mediaType: INDEX, manifests }));
  };

  beforeAll(async () => {
    registry = await TestRegistry.start();
    recorder = await Recorder.start(registry.url);
    image = makeImage('org/app', 'v1', 'oci', [1000]);
    await pushImage(registry, image);
    api = await fakeServer(handler);
    pc = await startPullcache({
      upstreams: {
        'docker.io': { url: recorder.url },
        'api.test': { url: api.url, tagTTL: '1s' },
      },
    });
  });
  afterAll(async () => {
    await pc?.stop();
    await api?.close();
    await recorder?.close();
    await registry?.close();
  });

  const referrers = async (path: string) => {
    const res = await fetch(`${pc.url}/v2/${path}`);
    expect({ path, status: res.status }).toEqual({ path, status: 200 });
    expect(res.headers.get('content-type')).toBe(INDEX);
    return ((await res.json()) as { manifests: unknown[] }).manifests;
  };
  const repositories = () => snapshot(join(pc.root, 'repositories'));

  test('empty answers, a 404 or an empty index, write nothing to storage, for any name, subject or filter', async () => {
    // The repository is cached: its manifest is stored.
    const pulled = await fetch(`${pc.url}/v2/org/app/manifests/v1`, {
      headers: { accept: image.mediaType },
    });
    expect(pulled.status).toBe(200);
    await pulled.arrayBuffer();
    const before = repositories();
    expect(Object.keys(before).length).toBeGreaterThan(0);

    const filters = [
      '',
      `?artifactType=${encodeURIComponent(SIGNATURE)}`,
      `?artifactType=${encodeURIComponent(SBOM)}&artifactType=${encodeURIComponent(SIGNATURE)}`,
    ];
    const paths: string[] = [];
    for (const upstream of ['', 'api.test/'])
      for (const repository of ['org/app', 'nobody/here', 'a/b/c'])
        for (const digest of [image.digest, sha256('one'), sha256('two')])
          for (const filter of filters)
            paths.push(`${upstream}${repository}/referrers/${digest}${filter}`);
    for (const path of paths) expect(await referrers(path)).toEqual([]);
    expect(repositories()).toEqual(before);

    // Remembered in memory: asked again inside tagTTL, the upstream is not.
    const asked = recorder.requests.filter((r) => r.path.includes('/referrers/')).length;
    expect(asked).toBe(3 * 3 * filters.length);
    for (const path of paths.filter((p) => !p.startsWith('api.test/')))
      expect(await referrers(path)).toEqual([]);
    expect(recorder.requests.filter((r) => r.path.includes('/referrers/')).length).toBe(asked);
  });

  test('an answer that lists referrers of a held subject is stored, unfiltered or by one type, and an empty one that replaces it too', async () => {
    const path = `api.test/org/signed/referrers/${subject}`;
    const type = (t: string) => `artifactType=${encodeURIComponent(t)}`;
    const signatures = `${path}?${type(SIGNATURE)}`;
    // Several types, as any client may make up sets of them: 2^k files for k types of referrers.
    const madeUp = `${signatures}&${type('application/x-made-up')}`;
    const both = `${signatures}&${type(SBOM)}`;
    const before = repositories();
    // The subject's manifest is not held yet: remembered in memory only.
    expect(await referrers(path)).toEqual([signature, sbom]);
    expect(await referrers(signatures)).toEqual([signature]);
    expect(await referrers(madeUp)).toEqual([signature]);
    expect(repositories()).toEqual(before);

    const pulled = await fetch(`${pc.url}/v2/api.test/org/signed/manifests/${subject}`, {
      headers: { accept: signed.mediaType },
    });
    expect(pulled.status).toBe(200);
    await pulled.arrayBuffer();
    const held = repositories();
    await new Promise((r) => setTimeout(r, 1100)); // past tagTTL: asked again
    expect(await referrers(madeUp)).toEqual([signature]);
    expect(await referrers(both)).toEqual([signature, sbom]);
    expect(repositories()).toEqual(held);
    expect(await referrers(signatures)).toEqual([signature]);
    expect(await referrers(path)).toEqual([signature, sbom]);
    const added = Object.keys(repositories())
      .filter((f) => !(f in held))
      .sort();
    expect(added).toHaveLength(2);
    expect(added[0]).toMatch(/^api\.test\/org\/signed\/_referrers\/sha256\/[0-9a-f]{64}\/all$/);
    expect(added[1]).toMatch(/\/artifactType-[0-9a-f]{64}$/);
    const kept = () =>
      JSON.parse(
        JSON.parse(readFileSync(join(pc.root, 'repositories', added[0]!), 'utf8')).index as string,
      ) as { manifests: unknown[] };
    expect(kept().manifests).toEqual([signature, sbom]);

    // The referrer is deleted upstream: past tagTTL the kept answer is replaced, not left stale.
    emptied = true;
    await new Promise((r) => setTimeout(r, 1100));
    expect(await referrers(path)).toEqual([]);
    expect(kept().manifests).toEqual([]);
    expect(Object.keys(repositories()).filter((f) => !(f in held))).toEqual(added);
  });
});
