/**
 * What a browser is told of what the registry API serves, on the origin of the status page and
 * the admin API: a manifest only ever as a manifest media type (whatever Content-Type its
 * upstream sent, and whatever an earlier version stored), and every /v2 answer `nosniff` with a
 * policy that runs nothing. An in-process upstream: a real registry serves a manifest with the
 * media type it was pushed as, never `text/html`.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { parseDigest } from '../../src/oci/digest.js';
import { parseRepository } from '../../src/oci/reference.js';
import { fakeServer, type FakeServer } from '../helpers/fake-server.js';
import { rawRequest } from '../helpers/http.js';
import { makeImage, sha256 } from '../helpers/images.js';
import { startPullcache, type TestPullcache } from '../helpers/pullcache.js';

const HTML = 'text/html; charset=utf-8';
const POLICY = "default-src 'none'; sandbox";

describe('what browsers are told of what /v2 serves', () => {
  /** web/page:v1, a Docker image whose manifest and blobs the upstream serves as HTML. */
  const image = makeImage('web/page', 'v1', 'docker', [100]);
  let upstream: FakeServer;
  let pc: TestPullcache;

  beforeAll(async () => {
    upstream = await fakeServer((req, res) => {
      const path = new URL(req.url ?? '/', 'http://fake').pathname;
      const headers = {
        'content-type': HTML,
        // What an upstream says of these is not what pullcache's origin says.
        'x-content-type-options': 'sniff',
        'content-security-policy': 'script-src *',
      };
      let body: Buffer | undefined;
      if (path === '/v2/') body = Buffer.from('{}');
      else if (
        path === `/v2/${image.repository}/manifests/${image.tag}` ||
        path === `/v2/${image.repository}/manifests/${image.digest}`
      ) {
        body = image.manifest;
        res.setHeader('docker-content-digest', image.digest);
      } else {
        const blob = image.blobs.find((b) => path === `/v2/${image.repository}/blobs/${b.digest}`);
        body = blob?.bytes;
      }
      if (body === undefined) {
        res.writeHead(404, { 'content-type': 'application/json' }).end('{"errors":[]}');
        return;
      }
      res.writeHead(200, { ...headers, 'content-length': body.length });
      res.end(req.method === 'HEAD' ? undefined : body);
    });
    pc = await startPullcache({
      upstreams: {
        'web.test': { url: upstream.url },
        'pass.test': { url: upstream.url, mode: 'passthrough' },
      },
      routing: { default: 'web.test' },
    });
  });
  afterAll(async () => {
    await pc?.stop();
    await upstream?.close();
  });

  const repo = (repository: string) => ({
    upstream: 'web.test',
    repository: parseRepository(repository),
  });

  test('a manifest its upstream serves as text/html is kept and served as its manifest media type', async () => {
    for (const reference of [image.tag, image.digest]) {
      for (const method of ['GET', 'HEAD']) {
        const res = await rawRequest(
          pc.url,
          method,
          `/v2/${image.repository}/manifests/${reference}`,
        );
        expect({
          reference,
          method,
          status: res.status,
          type: res.headers['content-type'],
        }).toEqual({ reference, method, status: 200, type: image.mediaType });
        if (method === 'GET') expect(res.body.equals(image.manifest)).toBe(true);
      }
    }
    // Kept as the manifest type, not only served as one.
    const kept = await pc.runtime.local.manifests.stat(
      repo(image.repository),
      parseDigest(image.digest).digest,
    );
    expect(kept.found && kept.link.mediaType).toBe(image.mediaType);
  });

  test('a manifest stored with another type (by an earlier version) is served as the type its bytes name or show', async () => {
    const docker = makeImage('web/old', 'v1', 'docker', [50]);
    // An OCI manifest without a mediaType field: an image manifest by its config.
    const bare = JSON.parse(makeImage('web/old', 'v2', 'oci', [60]).manifest.toString()) as Record<
      string,
      unknown
    >;
    delete bare.mediaType;
    const oci = Buffer.from(JSON.stringify(bare));
    const stored = [
      { bytes: docker.manifest, served: docker.mediaType },
      { bytes: oci, served: 'application/vnd.oci.image.manifest.v1+json' },
    ];
    for (const { bytes } of stored)
      await pc.runtime.local.manifests.put(
        repo('web/old'),
        bytes,
        parseDigest(sha256(bytes)).digest,
        'text/html',
      );
    for (const { bytes, served } of stored) {
      for (const method of ['GET', 'HEAD']) {
        const res = await rawRequest(pc.url, method, `/v2/web/old/manifests/${sha256(bytes)}`);
        expect({ method, status: res.status, type: res.headers['content-type'] }).toEqual({
          method,
          status: 200,
          type: served,
        });
        expect(Number(res.headers['content-length'])).toBe(bytes.length);
      }
    }
  });

  test('every /v2 answer is nosniff in a sandbox, passthrough answers too; the status page is not', async () => {
    const config = image.blobs[0]!.digest;
    const paths: [string, string, number][] = [
      ['GET', `/v2/${image.repository}/manifests/${image.tag}`, 200], // the fast path
      ['HEAD', `/v2/${image.repository}/manifests/${image.tag}`, 200],
      ['GET', `/v2/${image.repository}/blobs/${config}`, 200],
      ['GET', `/v2/${image.repository}/blobs/${sha256('none')}`, 404],
      ['GET', `/v2/${image.repository}/manifests/nothing`, 404],
      ['GET', '/v2/_catalog', 200],
      ['GET', '/v2/', 200],
      ['GET', '/v2/nothing', 404],
      ['GET', `/v2/pass.test/${image.repository}/manifests/${image.tag}`, 200],
      ['GET', `/v2/pass.test/${image.repository}/blobs/${config}`, 200],
    ];
    for (const [method, path, status] of paths) {
      const res = await rawRequest(pc.url, method, path);
      expect({
        method,
        path,
        status: res.status,
        nosniff: res.headers['x-content-type-options'],
        policy: res.headers['content-security-policy'],
      }).toEqual({ method, path, status, nosniff: 'nosniff', policy: POLICY });
    }
    // Passthrough stays byte for byte otherwise: the upstream's own Content-Type.
    const passed = await rawRequest(
      pc.url,
      'GET',
      `/v2/pass.test/${image.repository}/manifests/${image.tag}`,
    );
    expect(passed.headers['content-type']).toBe(HTML);
    expect(passed.body.equals(image.manifest)).toBe(true);
    // The status page runs its scripts.
    const page = await rawRequest(pc.url, 'GET', '/');
    expect(page.status).toBe(200);
    expect(String(page.headers['content-security-policy'] ?? '')).not.toContain('sandbox');
  });
});
