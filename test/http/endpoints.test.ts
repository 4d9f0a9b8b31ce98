import { createServer, type Server } from 'node:http';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { createApp } from '../../src/http/app.js';
import { rawRequest, ociError, type RawResponse } from '../helpers/http.js';
import { makeImage, pushImage, pushManifest, type Image } from '../helpers/images.js';
import { startPullcache, type TestPullcache } from '../helpers/pullcache.js';
import { TestRegistry } from '../helpers/registry.js';

/** The status, OCI error code and Allow header of a response, for one-line comparisons. */
async function answer(res: RawResponse) {
  return {
    status: res.status,
    code: res.body.length > 0 ? await ociError(res) : undefined,
    allow: res.headers.allow,
  };
}

describe('what each path and method answers', () => {
  let registry: TestRegistry;
  let image: Image;
  let pc: TestPullcache;
  /** The express app alone, without the manifest fast path in front of it. */
  let expressOnly: Server;
  let expressUrl: string;

  beforeAll(async () => {
    registry = await TestRegistry.start();
    image = makeImage('org/app', 'v1', 'oci', [1000]);
    await pushImage(registry, image);
    // `alpine` of ghcr.test (docker.io's is library/alpine, which the registry has not), tagged
    // three times.
    const alpine = makeImage('alpine', 'v1', 'oci', [500]);
    await pushImage(registry, alpine);
    for (const tag of ['v2', 'v3'])
      await pushManifest(registry, 'alpine', tag, alpine.manifest, alpine.mediaType);
    pc = await startPullcache({
      upstreams: {
        'docker.io': { url: registry.url },
        'ghcr.test': { url: registry.url },
        'passthru.test': { url: registry.url, mode: 'passthrough' },
      },
    });
    const { runtime } = pc;
    expressOnly = createServer(
      createApp({
        config: runtime.config,
        log: runtime.log,
        metrics: runtime.metrics,
        services: runtime.services,
        passthrough: runtime.passthrough,
        repositories: runtime.repositories,
        ready: () => Promise.resolve({}),
      }),
    );
    await new Promise<void>((resolve) => expressOnly.listen(0, '127.0.0.1', resolve));
    expressUrl = `http://127.0.0.1:${(expressOnly.address() as { port: number }).port}`;
  });
  afterAll(async () => {
    await new Promise((resolve) => expressOnly?.close(resolve));
    await pc?.stop();
    await registry?.close();
  });

  test('a manifest GET or HEAD with a syntactically invalid tag is 404 MANIFEST_UNKNOWN, on the fast path and through express', async () => {
    for (const base of [pc.url, expressUrl]) {
      for (const tag of ['.INVALID_MANIFEST_NAME', 'bad%21tag', '-leading-dash', 'x'.repeat(129)]) {
        const get = await rawRequest(base, 'GET', `/v2/org/app/manifests/${tag}`);
        expect({ base, tag, ...(await answer(get)) }).toEqual({
          base,
          tag,
          status: 404,
          code: 'MANIFEST_UNKNOWN',
          allow: undefined,
        });
        const head = await rawRequest(base, 'HEAD', `/v2/org/app/manifests/${tag}`);
        expect({ base, tag, status: head.status }).toEqual({ base, tag, status: 404 });
      }
      // The name is still checked first, and a valid tag is still served.
      const badName = await rawRequest(base, 'GET', '/v2/Org/app/manifests/.INVALID_MANIFEST_NAME');
      expect(await answer(badName)).toEqual({
        status: 400,
        code: 'NAME_INVALID',
        allow: undefined,
      });
      const served = await rawRequest(base, 'GET', '/v2/org/app/manifests/v1');
      expect(served.status).toBe(200);
      expect(served.headers['docker-content-digest']).toBe(image.digest);
    }
  });

  test('a reference that does not percent-decode is what it could not be: an unknown manifest, an invalid digest', async () => {
    const cases: [string, string, number, string][] = [
      [pc.url, '/v2/org/app/manifests/doc%ker', 404, 'MANIFEST_UNKNOWN'],
      [expressUrl, '/v2/org/app/manifests/doc%ker', 404, 'MANIFEST_UNKNOWN'],
      [pc.url, '/v2/org/app/manifests/sha256%zz', 404, 'MANIFEST_UNKNOWN'],
      [pc.url, '/v2/org/app/blobs/sha256:%zz', 400, 'DIGEST_INVALID'],
      [pc.url, `/v2/org/app/blobs/${image.blobs[0]!.digest}%zz`, 400, 'DIGEST_INVALID'],
      [pc.url, '/v2/org/app/referrers/sha256%zz', 400, 'DIGEST_INVALID'],
    ];
    for (const [base, path, status, code] of cases) {
      const res = await rawRequest(base, 'GET', path);
      expect({ base, path, ...(await answer(res)) }).toEqual({
        base,
        path,
        status,
        code,
        allow: undefined,
      });
      const head = await rawRequest(base, 'HEAD', path);
      expect({ base, path, status: head.status }).toEqual({ base, path, status });
    }
  });

  test('a tag list asked with ns links its next page with the same ns', async () => {
    const page = async (path: string) => {
      const res = await rawRequest(pc.url, 'GET', path);
      expect({ path, status: res.status }).toEqual({ path, status: 200 });
      const link = res.headers.link as string | undefined;
      return {
        tags: (JSON.parse(res.body.toString()) as { tags: string[] }).tags,
        next: link === undefined ? undefined : /^<([^>]+)>; rel="next"$/.exec(link)?.[1],
      };
    };
    const first = await page('/v2/alpine/tags/list?ns=ghcr.test&n=1');
    expect(first).toEqual({ tags: ['v1'], next: '/v2/alpine/tags/list?last=v1&n=1&ns=ghcr.test' });
    const second = await page(first.next!);
    expect(second).toEqual({ tags: ['v2'], next: '/v2/alpine/tags/list?last=v2&n=1&ns=ghcr.test' });
    expect(await page(second.next!)).toEqual({ tags: ['v3'], next: undefined });
    // Named by its prefix, the Link has it in the path already.
    expect(await page('/v2/ghcr.test/alpine/tags/list?n=2')).toEqual({
      tags: ['v1', 'v2'],
      next: '/v2/ghcr.test/alpine/tags/list?last=v2&n=2',
    });
  });

  test('unknown paths are 404 with a JSON error body, whatever the method', async () => {
    const cases: [string, string][] = [
      ['POST', '/'], // GET / is the status page
      ['GET', '/_pullcache/ui/nothing.js'],
      ['GET', '/foo'],
      ['GET', '/v1/_ping'],
      ['GET', '/favicon.ico'],
      ['POST', '/foo'],
      ['GET', '/v2/foo'],
      ['GET', '/v2/org/app'],
      ['GET', '/v2/org/app/manifests'],
      ['GET', '/v2/org/app/manifests/v1/extra'],
      ['GET', '/v2/org/app/tags'],
      ['DELETE', '/v2/org/app/nothing/v1'],
    ];
    for (const [method, path] of cases) {
      const res = await rawRequest(pc.url, method, path);
      expect({ method, path, ...(await answer(res)) }).toEqual({
        method,
        path,
        status: 404,
        code: 'NOT_FOUND',
        allow: undefined,
      });
      expect(res.headers['content-type']).toMatch(/^application\/json/);
    }
    const head = await rawRequest(pc.url, 'HEAD', '/favicon.ico');
    expect(head.status).toBe(404);
    expect(head.body.length).toBe(0);
  });

  test('a known endpoint asked with a method it does not serve is 405 UNSUPPORTED with Allow', async () => {
    const blob = image.blobs[0]!.digest;
    const upload = '/v2/org/app/blobs/uploads/3f2504e0-4f89-11d3-9a0c-0305e82c3301';
    const cases: [string, string, string][] = [
      ['PUT', '/v2/org/app/manifests/v1', 'GET, HEAD'],
      ['DELETE', `/v2/org/app/manifests/${image.digest}`, 'GET, HEAD'],
      ['DELETE', `/v2/org/app/blobs/${blob}`, 'GET, HEAD'],
      ['POST', '/v2/org/app/blobs/uploads/', ''],
      ['PATCH', upload, ''],
      ['PUT', upload, ''],
      ['GET', upload, ''],
      ['POST', '/v2/org/app/tags/list', 'GET, HEAD'],
      ['POST', '/v2/_catalog', 'GET, HEAD'],
      ['OPTIONS', '/v2/', 'GET, HEAD'],
      ['DELETE', '/v2/', 'GET, HEAD'],
      ['POST', '/healthz', 'GET, HEAD'],
      ['POST', '/readyz', 'GET, HEAD'],
      ['PUT', '/metrics', 'GET, HEAD'],
      // The admin API.
      ['GET', '/_pullcache/v1/gc', 'POST'],
      ['PUT', '/_pullcache/v1/gc', 'POST'],
      ['GET', '/_pullcache/v1/remove', 'POST'],
      ['DELETE', '/_pullcache/v1/remove', 'POST'],
      ['GET', '/_pullcache/v1/recount', 'POST'],
      ['PUT', '/_pullcache/v1/pins', 'GET, HEAD, POST, DELETE'],
      ['PATCH', '/_pullcache/v1/pins', 'GET, HEAD, POST, DELETE'],
      ['POST', '/_pullcache/v1/images', 'GET, HEAD'],
      ['DELETE', '/_pullcache/v1/images', 'GET, HEAD'],
      ['POST', '/_pullcache/v1/usage', 'GET, HEAD'],
      ['POST', '/_pullcache/v1/status', 'GET, HEAD'],
      ['DELETE', '/_pullcache/v1/status', 'GET, HEAD'],
    ];
    for (const [method, path, allow] of cases) {
      const res = await rawRequest(pc.url, method, path);
      expect({ method, path, ...(await answer(res)) }).toEqual({
        method,
        path,
        status: 405,
        code: 'UNSUPPORTED',
        allow,
      });
    }
    // HEAD too, without a body.
    for (const [path, allow] of [
      ['/_pullcache/v1/gc', 'POST'],
      ['/_pullcache/v1/remove', 'POST'],
      ['/_pullcache/v1/recount', 'POST'],
    ]) {
      const res = await rawRequest(pc.url, 'HEAD', path!);
      expect({ path, status: res.status, allow: res.headers.allow }).toEqual({
        path,
        status: 405,
        allow,
      });
    }
    // The endpoints themselves still answer their own methods; an unknown one is still 404.
    expect((await rawRequest(pc.url, 'GET', '/_pullcache/v1/pins')).status).toBe(200);
    expect((await rawRequest(pc.url, 'HEAD', '/_pullcache/v1/status')).status).toBe(200);
    expect(await answer(await rawRequest(pc.url, 'POST', '/_pullcache/v1/nothing'))).toEqual({
      status: 404,
      code: 'NOT_FOUND',
      allow: undefined,
    });
  });

  test('a passthrough upstream still takes pushes on its known endpoints', async () => {
    // The upstream itself answers (401: the push needs its credentials), not pullcache's 405.
    const res = await rawRequest(pc.url, 'POST', '/v2/passthru.test/org/app/blobs/uploads/');
    expect(res.status).toBe(401);
    expect(res.headers['www-authenticate']).toMatch(/^Bearer /);
  });
});
