/**
 * Conditional and range requests of manifests and blobs as RFC 9110 has them: If-None-Match with
 * weak comparison, lists and `*`, for GET and HEAD alike; If-Range that no longer holds asks for
 * the whole blob; and a range past the end of a blob not cached yet is refused after a HEAD to
 * the upstream, without downloading the blob.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { ociError, rawRequest } from '../helpers/http.js';
import { makeImage, pushImage, pushRandomBlob, type Image } from '../helpers/images.js';
import { startPullcache, type TestPullcache } from '../helpers/pullcache.js';
import { Recorder } from '../helpers/recorder.js';
import { TestRegistry } from '../helpers/registry.js';

const MANIFEST_ACCEPT = 'application/vnd.oci.image.manifest.v1+json';

describe('conditional and range requests', () => {
  let registry: TestRegistry;
  let recorder: Recorder;
  let image: Image;
  let pc: TestPullcache;

  beforeAll(async () => {
    registry = await TestRegistry.start();
    recorder = await Recorder.start(registry.url);
    image = makeImage('org/app', 'v1', 'oci', [20_000]);
    await pushImage(registry, image);
    pc = await startPullcache({ upstreams: { 'docker.io': { url: recorder.url } } });
  });
  afterAll(async () => {
    await pc?.stop();
    await recorder?.close();
    await registry?.close();
  });

  const blobGets = () => recorder.count('GET', /\/blobs\/sha256:/);

  test('a range past the end of a blob not cached yet is 416 after a HEAD, and nothing is downloaded', async () => {
    const blob = await pushRandomBlob(registry, 'org/app', 1 << 20);
    const path = `/v2/org/app/blobs/${blob.digest}`;
    recorder.reset();
    for (const range of [
      'bytes=999999999-',
      `bytes=${blob.bytes.length}-`,
      'bytes=2000000-2000010',
    ]) {
      const res = await rawRequest(pc.url, 'GET', path, { range });
      expect({ range, status: res.status, code: await ociError(res) }).toEqual({
        range,
        status: 416,
        code: 'RANGE_INVALID',
      });
      expect(res.headers['content-range']).toBe(`bytes */${blob.bytes.length}`);
    }
    expect(blobGets()).toBe(0);
    expect(recorder.blobBytes()).toBe(0);
    expect(recorder.count('HEAD', /\/blobs\/sha256:/)).toBeGreaterThan(0);

    // A range inside it is served, from the one fetch of the blob.
    const inside = await rawRequest(pc.url, 'GET', path, { range: 'bytes=1000-1999' });
    expect(inside.status).toBe(206);
    expect(inside.headers['content-range']).toBe(`bytes 1000-1999/${blob.bytes.length}`);
    expect(inside.body.equals(blob.bytes.subarray(1000, 2000))).toBe(true);
    expect(blobGets()).toBe(1);

    // A blob the upstream has not: 404, without a GET either.
    const missing = `sha256:${'0'.repeat(64)}`;
    const unknown = await rawRequest(pc.url, 'GET', `/v2/org/app/blobs/${missing}`, {
      range: 'bytes=5-',
    });
    expect({ status: unknown.status, code: await ociError(unknown) }).toEqual({
      status: 404,
      code: 'BLOB_UNKNOWN',
    });
    expect(blobGets()).toBe(1);
  });

  test('If-None-Match: weak comparison, lists, `*` and the bare digest, GET and HEAD alike', async () => {
    const layer = image.blobs[1]!;
    const targets = [
      { path: '/v2/org/app/manifests/v1', digest: image.digest },
      { path: `/v2/org/app/manifests/${image.digest}`, digest: image.digest },
      { path: `/v2/org/app/blobs/${layer.digest}`, digest: layer.digest },
    ];
    for (const { path, digest } of targets) {
      const matching = [
        `"${digest}"`,
        `W/"${digest}"`,
        `"sha256:${'1'.repeat(64)}", "${digest}"`,
        `"x",W/"${digest}"`,
        '*',
        digest,
      ];
      for (const method of ['GET', 'HEAD']) {
        for (const value of matching) {
          const res = await rawRequest(pc.url, method, path, {
            accept: MANIFEST_ACCEPT,
            'if-none-match': value,
          });
          expect({ path, method, value, status: res.status, bytes: res.body.length }).toEqual({
            path,
            method,
            value,
            status: 304,
            bytes: 0,
          });
          expect(res.headers.etag).toBe(`"${digest}"`);
          expect(res.headers['docker-content-digest']).toBe(digest);
        }
        for (const value of [`"sha256:${'1'.repeat(64)}"`, `"${digest}x"`, `W/"x", "y"`, '']) {
          const res = await rawRequest(pc.url, method, path, {
            accept: MANIFEST_ACCEPT,
            'if-none-match': value,
          });
          expect({ path, method, value, status: res.status }).toEqual({
            path,
            method,
            value,
            status: 200,
          });
        }
      }
    }
  });

  test('a Range under an If-Range that is not the blob ETag (strongly) serves the whole blob', async () => {
    const layer = await pushRandomBlob(registry, 'org/app', 50_000);
    const path = `/v2/org/app/blobs/${layer.digest}`;
    const size = layer.bytes.length;
    recorder.reset();
    // Cold (the first answer comes as it is fetched), then warm.
    for (const round of ['cold', 'warm']) {
      for (const ifRange of [
        `"sha256:${'1'.repeat(64)}"`,
        `W/"${layer.digest}"`,
        'Tue, 15 Nov 1994 08:12:31 GMT',
      ]) {
        const res = await rawRequest(pc.url, 'GET', path, {
          range: 'bytes=100-199',
          'if-range': ifRange,
        });
        expect({ round, ifRange, status: res.status, bytes: res.body.length }).toEqual({
          round,
          ifRange,
          status: 200,
          bytes: size,
        });
        expect(res.headers['content-range']).toBeUndefined();
        expect(res.body.equals(layer.bytes)).toBe(true);
      }
      const matching = await rawRequest(pc.url, 'GET', path, {
        range: 'bytes=100-199',
        'if-range': `"${layer.digest}"`,
      });
      expect({ round, status: matching.status }).toEqual({ round, status: 206 });
      expect(matching.headers['content-range']).toBe(`bytes 100-199/${size}`);
      expect(matching.body.equals(layer.bytes.subarray(100, 200))).toBe(true);
    }
    expect(blobGets()).toBe(1);
  });
});
