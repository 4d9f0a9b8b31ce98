/**
 * The admin API's requests as a browser, a script or a confused client may send them: a change
 * only as JSON and never from a page of another site (a form, text/plain, another Origin, a name
 * rebound to 127.0.0.1), bodies it cannot read as 4xx INVALID_REQUEST (never a 500), a GET's
 * body never read, and the images' upstream filter checked.
 */
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { basic, htpasswdFile } from '../helpers/htpasswd.js';
import { ociError, rawRequest, type RawResponse } from '../helpers/http.js';
import { makeImage, pushImage, type Image } from '../helpers/images.js';
import { capturedLog, startPullcache, type TestPullcache } from '../helpers/pullcache.js';
import { TestRegistry } from '../helpers/registry.js';

/** A request with exactly these headers (Host and Origin included) and this body. */
const send = rawRequest;

/** The status and OCI error code of a response (no code for a 2xx). */
async function answer(res: RawResponse) {
  return {
    status: res.status,
    code: res.status < 300 ? undefined : await ociError(res),
  };
}

const JSON_TYPE = { 'content-type': 'application/json' };

describe('the admin API without client authentication', () => {
  let registry: TestRegistry;
  let image: Image;
  let pc: TestPullcache;
  let log: ReturnType<typeof capturedLog>;
  /** The port of pc, for Host and Origin headers. */
  let port: string;

  beforeAll(async () => {
    registry = await TestRegistry.start();
    image = makeImage('org/app', 'v1', 'oci', [1000]);
    await pushImage(registry, image);
    log = capturedLog('info');
    pc = await startPullcache(
      { upstreams: { 'docker.io': { url: registry.url }, 'ghcr.test': { url: registry.url } } },
      undefined,
      { log: log.log },
    );
    port = new URL(pc.url).port;
    // One image cached, for the changes to find.
    for (const path of [
      '/v2/org/app/manifests/v1',
      ...image.blobs.map((b) => `/v2/org/app/blobs/${b.digest}`),
    ])
      expect((await send(pc.url, 'GET', path)).status).toBe(200);
  });
  afterAll(async () => {
    await pc?.stop();
    await registry?.close();
  });

  const images = async () =>
    JSON.parse((await send(pc.url, 'GET', '/_pullcache/v1/images')).body.toString()) as {
      repository: string;
      upstream: string;
    }[];
  /** Error-level lines logged since `from`. */
  const errorsLogged = (from: number) =>
    log.lines.slice(from).filter((l) => (l.level as number) >= 50);

  test('a change without a JSON content type is 415 INVALID_REQUEST and changes nothing', async () => {
    const cases: [string, string, Record<string, string>, string | undefined][] = [
      // What `curl -d` sends: a form.
      ['POST', '/gc', { 'content-type': 'application/x-www-form-urlencoded' }, '{"dryRun":true}'],
      // What a page of another site may send without asking.
      ['POST', '/gc', { 'content-type': 'text/plain' }, '{"dryRun":false}'],
      ['POST', '/gc', {}, undefined],
      ['POST', '/recount', {}, undefined],
      ['POST', '/remove', { 'content-type': 'text/plain' }, '{"references":["org/app"]}'],
      ['POST', '/pins', { 'content-type': 'multipart/form-data; boundary=x' }, '--x--'],
      ['DELETE', '/pins', { 'content-type': 'text/plain' }, '{"references":["org/app"]}'],
      ['POST', '/gc', { 'content-type': 'application/json-patch+json' }, '{}'],
    ];
    for (const [method, path, headers, body] of cases) {
      const res = await send(pc.url, method, `/_pullcache/v1${path}`, headers, body);
      expect({ method, path, headers, ...(await answer(res)) }).toEqual({
        method,
        path,
        headers,
        status: 415,
        code: 'INVALID_REQUEST',
      });
      expect(res.body.toString()).toContain('Content-Type: application/json');
    }
    expect((await images()).map((i) => i.repository)).toEqual(['org/app']);
    const usage = await send(pc.url, 'GET', '/_pullcache/v1/usage');
    expect(JSON.parse(usage.body.toString())).toMatchObject({ images: 1 });

    // As JSON, the same changes are taken.
    const gc = await send(pc.url, 'POST', '/_pullcache/v1/gc', JSON_TYPE, '{"dryRun":true}');
    expect(gc.status).toBe(200);
    expect(JSON.parse(gc.body.toString())).toMatchObject({ dryRun: true });
    const charset = { 'content-type': 'application/json; charset=utf-8' };
    expect((await send(pc.url, 'POST', '/_pullcache/v1/recount', charset)).status).toBe(200);
    expect((await send(pc.url, 'POST', '/_pullcache/v1/recount', JSON_TYPE, '{}')).status).toBe(
      200,
    );
  });

  test('a change with an Origin of another host is 403 DENIED; one from its own page is taken', async () => {
    const gc = (headers: Record<string, string>) =>
      send(pc.url, 'POST', '/_pullcache/v1/gc', { ...JSON_TYPE, ...headers }, '{"dryRun":true}');
    for (const origin of [
      'http://evil.example',
      `http://evil.example:${port}`,
      `http://localhost:${port}`, // not the host asked (127.0.0.1)
      `http://127.0.0.1:${Number(port) + 1}`,
      'null',
      'not a url',
    ]) {
      expect({ origin, ...(await answer(await gc({ origin }))) }).toEqual({
        origin,
        status: 403,
        code: 'DENIED',
      });
    }
    const pins = await send(
      pc.url,
      'DELETE',
      '/_pullcache/v1/pins',
      { ...JSON_TYPE, origin: 'http://evil.example' },
      '{"references":["org/app"]}',
    );
    expect(await answer(pins)).toEqual({ status: 403, code: 'DENIED' });

    // The status page's own requests carry its origin: the host asked.
    expect((await gc({ origin: `http://127.0.0.1:${port}` })).status).toBe(200);
    expect((await gc({ origin: `https://127.0.0.1:${port}` })).status).toBe(200);
    expect(
      (await gc({ origin: `http://localhost:${port}`, host: `localhost:${port}` })).status,
    ).toBe(200);
  });

  test('without client authentication a change must name the server by a loopback name (DNS rebinding)', async () => {
    const gc = (host: string) =>
      send(pc.url, 'POST', '/_pullcache/v1/gc', { ...JSON_TYPE, host }, '{"dryRun":true}');
    // A page of evil.example whose name now resolves to 127.0.0.1: its own origin, its own Host.
    const rebound = await send(
      pc.url,
      'POST',
      '/_pullcache/v1/gc',
      { ...JSON_TYPE, host: `evil.example:${port}`, origin: `http://evil.example:${port}` },
      '{"dryRun":true}',
    );
    expect(await answer(rebound)).toEqual({ status: 403, code: 'DENIED' });
    expect(rebound.body.toString()).toContain('loopback name');
    for (const host of [
      'evil.example',
      `registry.example.com:${port}`,
      '10.0.0.1',
      '127.0.0.1.nip.io',
    ])
      expect({ host, ...(await answer(await gc(host))) }).toEqual({
        host,
        status: 403,
        code: 'DENIED',
      });
    for (const host of [`127.0.0.1:${port}`, `localhost:${port}`, 'LOCALHOST', `[::1]:${port}`])
      expect({ host, status: (await gc(host)).status }).toEqual({ host, status: 200 });
    // Reads are anyone's without client authentication, by any name.
    const read = await send(pc.url, 'GET', '/_pullcache/v1/images', { host: 'evil.example' });
    expect(read.status).toBe(200);
  });

  test('bodies it cannot read are 4xx INVALID_REQUEST with their own status, logged below error', async () => {
    const from = log.lines.length;
    const gc = (headers: Record<string, string>, body: string | Buffer) =>
      send(pc.url, 'POST', '/_pullcache/v1/gc', headers, body);
    const cases: [string, RawResponse, number][] = [
      ['over the limit', await gc(JSON_TYPE, `{"dryRun":true,"x":"${'x'.repeat(1 << 20)}"}`), 413],
      [
        'charset latin-9',
        await gc({ 'content-type': 'application/json; charset=latin-9' }, '{}'),
        415,
      ],
      [
        'Content-Encoding compress',
        await gc({ ...JSON_TYPE, 'content-encoding': 'compress' }, '{}'),
        415,
      ],
      ['malformed JSON', await gc(JSON_TYPE, '{bad json'), 400],
      ['not an object', await gc(JSON_TYPE, '"dryRun"'), 400],
      ['a path that does not decode', await send(pc.url, 'GET', '/_pullcache/ui/%zz'), 400],
    ];
    for (const [what, res, status] of cases) {
      expect({ what, ...(await answer(res)) }).toEqual({ what, status, code: 'INVALID_REQUEST' });
      const message = (JSON.parse(res.body.toString()) as { errors: { message: string }[] })
        .errors[0]!.message;
      expect(message).not.toMatch(/internal error|malformed request/);
    }
    expect(errorsLogged(from)).toEqual([]);
    // A body that fits is still read (the wrong field named).
    const wrong = await gc(JSON_TYPE, '{"dryrun":true}');
    expect(await answer(wrong)).toEqual({ status: 400, code: 'INVALID_REQUEST' });
  });

  test('a GET with a body answers as without one: the body is never read', async () => {
    const from = log.lines.length;
    for (const path of ['/images', '/usage', '/pins']) {
      for (const body of ['{bad json', `{"x":"${'x'.repeat(2 << 20)}"}`]) {
        const res = await send(pc.url, 'GET', `/_pullcache/v1${path}`, JSON_TYPE, body);
        expect({ path, size: body.length, status: res.status }).toEqual({
          path,
          size: body.length,
          status: 200,
        });
      }
    }
    expect(errorsLogged(from)).toEqual([]);
  });

  test('a pin while the pins file cannot be read is 503 UNAVAILABLE naming the file, not a 500', async () => {
    const file = join(pc.root, 'lifecycle', 'pins.json');
    mkdirSync(dirname(file), { recursive: true });
    writeFileSync(file, '{"pins": [');
    try {
      const from = log.lines.length;
      const res = await send(
        pc.url,
        'POST',
        '/_pullcache/v1/pins',
        { ...JSON_TYPE, host: `localhost:${port}` },
        JSON.stringify({ references: ['org/app:v1'] }),
      );
      expect(res.status).toBe(503);
      const body = JSON.parse(res.body.toString()) as {
        errors: { code: string; message: string }[];
      };
      expect(body.errors[0]!.code).toBe('UNAVAILABLE');
      expect(body.errors[0]!.message).toMatch(/pins file .*cannot be read/);
      expect(log.lines.slice(from).some((l) => l.msg === 'internal error')).toBe(false);
    } finally {
      rmSync(file, { force: true });
    }
  });

  test('images?upstream= names one configured upstream: repeated is 400, unknown UPSTREAM_UNKNOWN', async () => {
    const get = (query: string) => send(pc.url, 'GET', `/_pullcache/v1/images${query}`);
    expect(await answer(await get('?upstream=nosuch&upstream=docker.io'))).toEqual({
      status: 400,
      code: 'INVALID_REQUEST',
    });
    expect(await answer(await get('?upstream=docker.io&upstream=docker.io'))).toEqual({
      status: 400,
      code: 'INVALID_REQUEST',
    });
    const unknown = await get('?upstream=nosuch');
    expect(await answer(unknown)).toEqual({ status: 400, code: 'UPSTREAM_UNKNOWN' });
    expect(unknown.body.toString()).toContain('nosuch');
    expect(await answer(await get('?upstream='))).toEqual({
      status: 400,
      code: 'UPSTREAM_UNKNOWN',
    });
    // A configured one filters; none lists everything.
    const listed = async (query: string) =>
      (JSON.parse((await get(query)).body.toString()) as { upstream: string }[]).map(
        (i) => i.upstream,
      );
    expect(await listed('?upstream=docker.io')).toEqual(['docker.io']);
    expect(await listed('?upstream=ghcr.test')).toEqual([]);
    expect(await listed('')).toEqual(['docker.io']);
  });

  test('a reference whose first part looks like a host names that upstream: unconfigured, 400 UPSTREAM_UNKNOWN', async () => {
    const change = (method: string, path: string, references: string[]) =>
      send(pc.url, method, `/_pullcache/v1${path}`, JSON_TYPE, JSON.stringify({ references }));
    for (const [method, path] of [
      ['POST', '/pins'],
      ['DELETE', '/pins'],
      ['POST', '/remove'],
    ] as const) {
      // quay.io is not configured: never docker.io's repository "quay.io/org/app".
      const res = await change(method, path, ['quay.io/org/app:v1']);
      expect({ method, path, ...(await answer(res)) }).toEqual({
        method,
        path,
        status: 400,
        code: 'UPSTREAM_UNKNOWN',
      });
      expect(res.body.toString()).toContain('quay.io');
    }
    const pins = await send(pc.url, 'GET', '/_pullcache/v1/pins');
    expect(JSON.parse(pins.body.toString())).toEqual({ pins: [] });
    // A configured upstream's, or the default upstream's (pins are kept as written).
    const pinned = await change('POST', '/pins', ['ghcr.test/org/app:v1', 'org/app:v1']);
    expect(JSON.parse(pinned.body.toString())).toMatchObject({
      pins: ['ghcr.test/org/app:v1', 'org/app:v1'],
    });
    expect((await change('DELETE', '/pins', ['ghcr.test/org/app:v1', 'org/app:v1'])).status).toBe(
      200,
    );
  });

  test('a pin stored before a config change is still listed, as it was stored', async () => {
    // Pinned by an earlier version as the default upstream's "quay.io/org/app", and one of an
    // upstream since removed from the config: both are in force, so both are listed.
    const root = mkdtempSync(join(tmpdir(), 'pullcache-pins-'));
    mkdirSync(join(root, 'lifecycle'));
    const stored = [
      { upstream: 'docker.io', repository: 'quay.io/org/app', reference: 'quay.io/org/app' },
      {
        upstream: 'gone.test',
        repository: 'org/app',
        reference: 'gone.test/org/app:v1',
        tag: 'v1',
      },
    ];
    writeFileSync(join(root, 'lifecycle', 'pins.json'), JSON.stringify(stored));
    const again = await startPullcache({ upstreams: { 'docker.io': { url: registry.url } } }, root);
    try {
      const listed = await send(again.url, 'GET', '/_pullcache/v1/pins');
      expect(JSON.parse(listed.body.toString())).toEqual({
        pins: ['quay.io/org/app', 'gone.test/org/app:v1'],
      });
    } finally {
      await again.stop();
      rmSync(root, { recursive: true, force: true });
    }
  });
});

describe('the admin API with client authentication', () => {
  let registry: TestRegistry;
  let pc: TestPullcache;
  const alice = basic('alice', 'alice-pw');

  beforeAll(async () => {
    registry = await TestRegistry.start();
    pc = await startPullcache({
      upstreams: { 'docker.io': { url: registry.url } },
      auth: {
        htpasswd: htpasswdFile({ alice: 'alice-pw' }, 4),
        rules: [{ users: ['alice'], actions: ['pull', 'admin'] }],
      },
    });
  });
  afterAll(async () => {
    await pc?.stop();
    await registry?.close();
  });

  test('a user may change the cache by any name, but not from a page of another site, nor as a form', async () => {
    const port = new URL(pc.url).port;
    const gc = (headers: Record<string, string>) =>
      send(pc.url, 'POST', '/_pullcache/v1/gc', { ...alice, ...headers }, '{"dryRun":true}');
    const host = `registry.example.com:${port}`;
    expect((await gc({ ...JSON_TYPE, host })).status).toBe(200);
    expect((await gc({ ...JSON_TYPE, host, origin: `https://${host}` })).status).toBe(200);
    expect(await answer(await gc({ ...JSON_TYPE, host, origin: 'https://evil.example' }))).toEqual({
      status: 403,
      code: 'DENIED',
    });
    expect(await answer(await gc({ 'content-type': 'text/plain', host }))).toEqual({
      status: 415,
      code: 'INVALID_REQUEST',
    });
  });
});
