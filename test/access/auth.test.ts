/**
 * Client authentication and rules end to end, over HTTP against a running pullcache whose
 * upstream is the real test registry: the 401 challenge, credentials from an htpasswd file
 * written by `htpasswd -B`, the rules on every endpoint (the manifest fast path included), the
 * catalog filtered, the admin API guarded, passthrough upstreams, bad headers.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { basic, htpasswdFile } from '../helpers/htpasswd.js';
import { ociError, rawRequest } from '../helpers/http.js';
import { makeImage, pushImage, type Image } from '../helpers/images.js';
import { startPullcache, type TestPullcache } from '../helpers/pullcache.js';
import { Recorder } from '../helpers/recorder.js';
import { TestRegistry } from '../helpers/registry.js';

const MANIFEST_ACCEPT =
  'application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json';

describe('client authentication and rules', () => {
  let registry: TestRegistry;
  let recorder: Recorder;
  /** Default rules (none): every authenticated user pulls everything; no anonymous. */
  let plain: TestPullcache;
  /** With rules, anonymous pulls of library/*, a passthrough upstream. */
  let ruled: TestPullcache;
  let alpine: Image;
  let app: Image;
  let secret: Image;
  let tool: Image;

  const alice = basic('alice', 'alice-pw'); // pull and admin everywhere
  const bob = basic('bob', 'bob-pw'); // pull library/* on docker.io, everything on other.test
  const carol = basic('carol', 'carol-pw'); // a rule refuses her everything
  const dave = basic('dave', 'dave-pw'); // admin of team/* on docker.io only

  beforeAll(async () => {
    registry = await TestRegistry.start();
    recorder = await Recorder.start(registry.url);
    alpine = makeImage('library/alpine', '3.20', 'oci', [2000]);
    app = makeImage('team/app', 'v1', 'oci', [3000]);
    secret = makeImage('corp/secret', 'v1', 'oci', [4000]);
    tool = makeImage('org/tool', 'v2', 'docker', [1500]);
    for (const image of [alpine, app, secret, tool]) await pushImage(registry, image);
    const htpasswd = htpasswdFile({
      alice: 'alice-pw',
      bob: 'bob-pw',
      carol: 'carol-pw',
      dave: 'dave-pw',
    });
    const upstreams = {
      'docker.io': { url: registry.url },
      'other.test': { url: registry.url },
      'passthru.test': { url: recorder.url, mode: 'passthrough' },
    };
    plain = await startPullcache({ upstreams, auth: { htpasswd } });
    ruled = await startPullcache({
      upstreams,
      auth: {
        htpasswd,
        anonymous: true,
        rules: [
          { users: ['alice'], actions: ['pull', 'admin'] },
          { users: ['carol'], actions: [] },
          {
            users: ['dave'],
            upstreams: ['docker.io'],
            repositories: ['team/*'],
            actions: ['pull', 'admin'],
          },
          {
            users: ['anonymous', '*'],
            upstreams: ['docker.io'],
            repositories: ['library/*'],
            actions: ['pull'],
          },
          { users: ['bob'], upstreams: ['other.test', 'passthru.test'], actions: ['pull'] },
        ],
      },
    });
  });
  afterAll(async () => {
    await plain?.stop();
    await ruled?.stop();
    await recorder?.close();
    await registry?.close();
  });

  /** The challenge of a 401 on the registry API: pullcache's own token realm. */
  const challenge = (pc: TestPullcache) =>
    `Bearer realm="${pc.url}/_pullcache/token",service="pullcache"`;
  const token = async (pc: TestPullcache, headers: Record<string, string> = {}) => {
    const res = await rawRequest(pc.url, 'GET', '/_pullcache/token?service=pullcache', headers);
    return {
      status: res.status,
      body: res.body.length ? (JSON.parse(res.body.toString()) as Record<string, unknown>) : {},
    };
  };
  const bearer = (t: unknown) => ({ authorization: `Bearer ${String(t)}` });
  const get = (pc: TestPullcache, path: string, headers: Record<string, string> = {}) =>
    rawRequest(pc.url, 'GET', path, { accept: MANIFEST_ACCEPT, ...headers });
  const answer = async (pc: TestPullcache, method: string, path: string, headers = {}) => {
    const res = await rawRequest(pc.url, method, path, { accept: MANIFEST_ACCEPT, ...headers });
    return {
      path,
      status: res.status,
      code: res.status >= 400 && res.body.length > 0 ? await ociError(res) : undefined,
    };
  };

  test('without credentials, every registry endpoint answers 401 UNAUTHORIZED with a Basic challenge', async () => {
    const paths = [
      '/v2/',
      `/v2/team/app/manifests/v1`, // the manifest fast path, by tag
      `/v2/team/app/manifests/${app.digest}`, // and by digest
      `/v2/team/app/blobs/${app.blobs[0]!.digest}`,
      '/v2/team/app/tags/list',
      `/v2/team/app/referrers/${app.digest}`,
      '/v2/_catalog',
      '/v2/other.test/org/tool/manifests/v2',
      '/v2/passthru.test/org/tool/manifests/v2',
    ];
    for (const path of paths) {
      for (const method of ['GET', 'HEAD']) {
        const res = await rawRequest(plain.url, method, path);
        expect({ path, method, status: res.status }).toEqual({ path, method, status: 401 });
        expect(res.headers['www-authenticate']).toBe(challenge(plain));
        if (method === 'GET') expect(await ociError(res)).toBe('UNAUTHORIZED');
      }
    }
    // Nothing was asked of the upstreams for them.
    expect(recorder.requests).toEqual([]);
  });

  test('/v2/ (what docker login checks) is 200 with valid credentials, 401 with a wrong password or an unknown user', async () => {
    expect((await get(plain, '/v2/', alice)).status).toBe(200);
    for (const wrong of [
      basic('alice', 'nope'),
      basic('mallory', 'alice-pw'),
      basic('alice', ''),
    ]) {
      const res = await get(plain, '/v2/', wrong);
      expect(res.status).toBe(401);
      expect(res.headers['www-authenticate']).toBe(challenge(plain));
      expect(JSON.parse(res.body.toString())).toMatchObject({
        errors: [{ code: 'UNAUTHORIZED', message: 'invalid username or password' }],
      });
    }
  });

  test('the token realm: Basic credentials in, a token out that stands for the user; anonymous tokens only where anonymous callers are served', async () => {
    const issued = await token(plain, alice);
    expect(issued.status).toBe(200);
    expect(issued.body).toMatchObject({ expires_in: 300 });
    expect(issued.body.access_token).toBe(issued.body.token);
    // The token stands for alice: /v2/ (docker login's check) and pulls.
    expect((await get(plain, '/v2/', bearer(issued.body.token))).status).toBe(200);
    expect((await get(plain, '/v2/team/app/manifests/v1', bearer(issued.body.token))).status).toBe(
      200,
    );
    // Wrong credentials get no token; without credentials, only where anonymous callers are served.
    const wrong = await rawRequest(plain.url, 'GET', '/_pullcache/token', basic('alice', 'nope'));
    expect(wrong.status).toBe(401);
    expect(wrong.headers['www-authenticate']).toBe('Basic realm="pullcache", charset="UTF-8"');
    expect((await token(plain)).status).toBe(401);
    // An anonymous token (unsigned: it grants what no credentials do) is nothing where anonymous
    // callers are not served.
    const anonymousToken = `${Buffer.from(JSON.stringify({ s: null, e: Math.floor(Date.now() / 1000) + 300 })).toString('base64url')}.`;
    expect((await get(plain, '/v2/', bearer(anonymousToken))).status).toBe(401);
    expect((await get(plain, '/v2/alpine/manifests/3.20', bearer(anonymousToken))).status).toBe(
      401,
    );
    const anonymous = await token(ruled);
    expect(anonymous.status).toBe(200);
    expect((await get(ruled, '/v2/', bearer(anonymous.body.token))).status).toBe(200);
    expect(
      (await get(ruled, '/v2/alpine/manifests/3.20', bearer(anonymous.body.token))).status,
    ).toBe(200);
    expect(
      (await get(ruled, '/v2/team/app/manifests/v1', bearer(anonymous.body.token))).status,
    ).toBe(401);
    // A token made up, altered, or of one server's user at another with the same file: only the
    // last is taken (replicas share the htpasswd file, so they take each other's tokens).
    const [payload, signature] = String(issued.body.token).split('.');
    const forged = Buffer.from(
      JSON.stringify({ s: 'alice', e: Math.floor(Date.now() / 1000) + 3600 }),
    ).toString('base64url');
    for (const t of [
      `${forged}.${signature}`,
      `${payload}.${signature!.slice(1)}x`,
      'garbage',
      `${payload}.`,
    ]) {
      const res = await get(plain, '/v2/team/app/manifests/v1', bearer(t));
      expect({ t, status: res.status }).toEqual({ t, status: 401 });
      expect(JSON.parse(res.body.toString())).toMatchObject({
        errors: [{ code: 'UNAUTHORIZED', message: 'invalid or expired token' }],
      });
    }
    expect(
      (await get(ruled, '/v2/corp/secret/manifests/v1', bearer(issued.body.token))).status,
    ).toBe(200);
  });

  test('with no rules, an authenticated user pulls everything: manifests by tag and digest, blobs, tags, referrers, catalog', async () => {
    const manifest = await get(plain, '/v2/team/app/manifests/v1', bob);
    expect(manifest.status).toBe(200);
    expect(manifest.body.equals(app.manifest)).toBe(true);
    expect((await get(plain, `/v2/team/app/manifests/${app.digest}`, bob)).status).toBe(200);
    const blob = await get(plain, `/v2/team/app/blobs/${app.blobs[1]!.digest}`, bob);
    expect(blob.body.equals(app.blobs[1]!.bytes)).toBe(true);
    expect(JSON.parse((await get(plain, '/v2/team/app/tags/list', bob)).body.toString())).toEqual({
      name: 'team/app',
      tags: ['v1'],
    });
    expect((await get(plain, `/v2/team/app/referrers/${app.digest}`, bob)).status).toBe(200);
    expect((await get(plain, '/v2/other.test/org/tool/manifests/v2', bob)).status).toBe(200);
    const catalog = JSON.parse((await get(plain, '/v2/_catalog', bob)).body.toString()) as {
      repositories: string[];
    };
    expect(catalog.repositories).toEqual(['other.test/org/tool', 'team/app']);
  });

  test('rules: the first match decides, by user, upstream and repository glob; 403 DENIED for users, 401 for anonymous', async () => {
    const cases: [Record<string, string>, string, number, string | undefined][] = [
      // alice: everything.
      [alice, '/v2/corp/secret/manifests/v1', 200, undefined],
      [alice, '/v2/other.test/org/tool/manifests/v2', 200, undefined],
      // bob: library/* on docker.io (the "*" rule), everything on other.test.
      [bob, '/v2/alpine/manifests/3.20', 200, undefined],
      [bob, '/v2/library/alpine/manifests/3.20', 200, undefined],
      [bob, '/v2/team/app/manifests/v1', 403, 'DENIED'],
      [bob, '/v2/corp/secret/manifests/v1', 403, 'DENIED'],
      [bob, '/v2/other.test/org/tool/manifests/v2', 200, undefined],
      [bob, '/v2/other.test/team/app/manifests/v1', 200, undefined],
      // carol: her own refusing rule comes before the "*" rule.
      [carol, '/v2/alpine/manifests/3.20', 403, 'DENIED'],
      // dave: team/* on docker.io; "*" stays within one component.
      [dave, '/v2/team/app/manifests/v1', 200, undefined],
      [dave, '/v2/team/app/sub/manifests/v1', 403, 'DENIED'],
      [dave, '/v2/other.test/team/app/manifests/v1', 403, 'DENIED'],
      [dave, '/v2/other.test/org/tool/manifests/v2', 403, 'DENIED'],
      [dave, '/v2/alpine/manifests/3.20', 200, undefined], // the rule of any user
      // anonymous: library/* on docker.io only.
      [{}, '/v2/alpine/manifests/3.20', 200, undefined],
      [{}, '/v2/team/app/manifests/v1', 401, 'UNAUTHORIZED'],
      [{}, '/v2/other.test/org/tool/manifests/v2', 401, 'UNAUTHORIZED'],
    ];
    for (const [headers, path, status, code] of cases) {
      for (const method of ['GET', 'HEAD']) {
        const got = await answer(ruled, method, path, headers);
        expect({ user: headers, method, ...got }).toEqual({
          user: headers,
          method,
          path,
          status,
          code: method === 'HEAD' ? undefined : code,
        });
      }
    }
    const refused = await get(ruled, '/v2/team/app/manifests/v1', bob);
    expect(JSON.parse(refused.body.toString())).toMatchObject({
      errors: [{ code: 'DENIED', message: 'user "bob" may not pull docker.io/team/app' }],
    });
  });

  test('the rules hold on every endpoint, not only manifests: blobs, tags, referrers', async () => {
    const blob = secret.blobs[1]!.digest;
    for (const path of [
      `/v2/corp/secret/blobs/${blob}`,
      '/v2/corp/secret/tags/list',
      `/v2/corp/secret/referrers/${secret.digest}`,
    ]) {
      expect(await answer(ruled, 'GET', path, bob)).toEqual({ path, status: 403, code: 'DENIED' });
      expect(await answer(ruled, 'GET', path)).toEqual({ path, status: 401, code: 'UNAUTHORIZED' });
      expect((await answer(ruled, 'GET', path, alice)).status).toBe(200);
    }
    // Refused before anything is looked up: an unknown repository is 403 too, not 404.
    expect((await answer(ruled, 'GET', '/v2/corp/nothing/manifests/v1', bob)).status).toBe(403);
  });

  test('the catalog lists only what the caller may pull', async () => {
    // Fill the cache: alice may pull everything.
    for (const path of [
      '/v2/alpine/manifests/3.20',
      '/v2/team/app/manifests/v1',
      '/v2/corp/secret/manifests/v1',
      '/v2/other.test/org/tool/manifests/v2',
    ])
      expect((await get(ruled, path, alice)).status).toBe(200);
    const catalog = async (headers: Record<string, string>) =>
      (
        JSON.parse((await get(ruled, '/v2/_catalog', headers)).body.toString()) as {
          repositories: string[];
        }
      ).repositories;
    expect(await catalog(alice)).toEqual([
      'corp/secret',
      'library/alpine',
      'other.test/org/tool',
      'other.test/team/app', // pulled by bob above
      'team/app',
    ]);
    expect(await catalog(bob)).toEqual([
      'library/alpine',
      'other.test/org/tool',
      'other.test/team/app',
    ]);
    expect(await catalog(dave)).toEqual(['library/alpine', 'team/app']);
    expect(await catalog(carol)).toEqual([]);
    expect(await catalog({})).toEqual(['library/alpine']);
  });

  test('the admin API: what changes the cache needs the admin action for every image named', async () => {
    const post = (path: string, headers: Record<string, string>, body: unknown) =>
      fetch(`${ruled.url}/_pullcache/v1${path}`, {
        method: 'POST',
        headers: { ...headers, 'content-type': 'application/json' },
        body: JSON.stringify(body),
      });
    await get(ruled, '/v2/team/app/manifests/v1', alice);
    const pin = { references: ['team/app:v1'] };
    // Anonymous: 401 with the challenge; bob (pull only): 403.
    const anonymous = await post('/pins', {}, pin);
    expect(anonymous.status).toBe(401);
    // Outside the registry API, the challenge is Basic (browsers and scripts answer it).
    expect(anonymous.headers.get('www-authenticate')).toBe(
      'Basic realm="pullcache", charset="UTF-8"',
    );
    expect((await post('/pins', bob, pin)).status).toBe(403);
    // dave administers team/* on docker.io: that pin, not one elsewhere, and not gc.
    expect((await post('/pins', dave, pin)).status).toBe(200);
    expect((await post('/pins', dave, { references: ['team/app:v1', 'alpine:3.20'] })).status).toBe(
      403,
    );
    expect((await post('/gc', dave, { dryRun: true })).status).toBe(403);
    expect((await post('/remove', bob, { references: ['team/app:v1'], dryRun: true })).status).toBe(
      403,
    );
    expect((await post('/recount', bob, {})).status).toBe(403);
    // alice administers everything.
    expect((await post('/gc', alice, { dryRun: true })).status).toBe(200);
    expect((await post('/recount', alice, {})).status).toBe(200);
    // What is read lists only what the caller may pull.
    const pins = async (headers: Record<string, string>) =>
      (
        (await (await fetch(`${ruled.url}/_pullcache/v1/pins`, { headers })).json()) as {
          pins: string[];
        }
      ).pins;
    expect(await pins(dave)).toEqual(['team/app:v1']);
    expect(await pins(bob)).toEqual([]);
    const images = (await (
      await fetch(`${ruled.url}/_pullcache/v1/images`, { headers: bob })
    ).json()) as { upstream: string; repository: string }[];
    expect(images.map((i) => `${i.upstream}/${i.repository}`).sort()).toEqual([
      'docker.io/library/alpine',
      'other.test/org/tool',
      'other.test/team/app',
    ]);
    // Without anonymous access, nothing is read without credentials.
    expect((await fetch(`${plain.url}/_pullcache/v1/usage`)).status).toBe(401);
    expect((await fetch(`${plain.url}/_pullcache/v1/usage`, { headers: bob })).status).toBe(200);
    // No rules: nobody administers.
    expect(
      (
        await fetch(`${plain.url}/_pullcache/v1/gc`, {
          method: 'POST',
          headers: { ...alice, 'content-type': 'application/json' },
          body: '{"dryRun":true}',
        })
      ).status,
    ).toBe(403);
  });

  test('passthrough upstreams: pulls need the pull action, pushes admin, and the client credentials never reach the upstream', async () => {
    recorder.reset();
    const path = '/v2/passthru.test/org/tool/manifests/v2';
    expect(await answer(ruled, 'GET', path, dave)).toEqual({ path, status: 403, code: 'DENIED' });
    // bob may pull there: the request goes on, without his Authorization. The registry asks for
    // its own token: its challenge is not relayed (his client would answer it with his
    // credentials for pullcache), and bob, who has logged in already, is refused.
    const res = await get(ruled, path, bob);
    expect(res.status).toBe(403);
    expect(res.headers['www-authenticate']).toBeUndefined();
    expect(recorder.requests.map((r) => r.path)).toEqual(['/v2/org/tool/manifests/v2']);
    expect(recorder.headers.every((h) => h.authorization === undefined)).toBe(true);
    const push = await rawRequest(
      ruled.url,
      'POST',
      '/v2/passthru.test/org/tool/blobs/uploads/',
      bob,
    );
    expect(push.status).toBe(403);
  });

  test('malformed Authorization headers are 400, unknown schemes 401 with the challenge, never 500, on every path', async () => {
    const b64 = (s: string) => Buffer.from(s).toString('base64');
    const cases: [string, number, string][] = [
      ['Basic', 400, 'INVALID_REQUEST'],
      ['Basic !!!notbase64', 400, 'INVALID_REQUEST'],
      ['Basic abc', 400, 'INVALID_REQUEST'],
      [`Basic ${b64('no-colon')}`, 400, 'INVALID_REQUEST'],
      [`Basic ${Buffer.from([0xff, 0xfe, 0x3a, 0x41]).toString('base64')}`, 400, 'INVALID_REQUEST'],
      [`Basic ${b64('alice:\u0000pw')}`, 400, 'INVALID_REQUEST'],
      [`Basic ${b64(`alice:${'x'.repeat(3000)}`)}`, 400, 'INVALID_REQUEST'],
      ['Bearer abc.def.ghi', 401, 'UNAUTHORIZED'],
      ['Digest username="alice"', 401, 'UNAUTHORIZED'],
      ['basicx abc', 401, 'UNAUTHORIZED'],
    ];
    for (const path of ['/v2/', '/v2/alpine/manifests/3.20', '/v2/alpine/tags/list', '/nothing']) {
      for (const [authorization, status, code] of cases) {
        const res = await get(ruled, path, { authorization });
        expect({ path, authorization: authorization.slice(0, 30), status: res.status }).toEqual({
          path,
          authorization: authorization.slice(0, 30),
          status,
        });
        expect(await ociError(res)).toBe(code);
        if (status === 401)
          expect(res.headers['www-authenticate']).toMatch(
            path.startsWith('/v2')
              ? /^Bearer realm="http:\/\/127\.0\.0\.1:\d+\/_pullcache\/token"/
              : /^Basic /,
          );
      }
    }
    // Empty Basic credentials, as containers/image sends when it has none, are no credentials.
    expect(
      (await get(ruled, '/v2/alpine/manifests/3.20', { authorization: `Basic ${b64(':')}` }))
        .status,
    ).toBe(200);
    expect(
      (await get(ruled, '/v2/team/app/manifests/v1', { authorization: `Basic ${b64(':')}` }))
        .status,
    ).toBe(401);
  });

  test('the health, readiness and metrics endpoints need no credentials', async () => {
    for (const path of ['/healthz', '/readyz', '/metrics'])
      expect((await rawRequest(plain.url, 'GET', path)).status).toBe(200);
  });

  test('a verified credential is remembered: requests after the first cost no bcrypt', async () => {
    // Cost 12: about a quarter of a second per bcrypt in plain JavaScript.
    const slow = await startPullcache({
      upstreams: { 'docker.io': { url: registry.url } },
      auth: { htpasswd: htpasswdFile({ erin: 'erin-pw' }, 12) },
    });
    try {
      const erin = basic('erin', 'erin-pw');
      let start = performance.now();
      expect((await get(slow, '/v2/', erin)).status).toBe(200);
      const first = performance.now() - start;
      start = performance.now();
      for (let i = 0; i < 20; i++) expect((await get(slow, '/v2/', erin)).status).toBe(200);
      const twenty = performance.now() - start;
      expect(twenty).toBeLessThan(first);
      // Concurrent first requests with one wrong credential share one verification, and a
      // retried wrong password is refused without another.
      const wrong = basic('erin', 'wrong');
      start = performance.now();
      const answers = await Promise.all(Array.from({ length: 8 }, () => get(slow, '/v2/', wrong)));
      expect(answers.map((a) => a.status)).toEqual(Array(8).fill(401));
      for (let i = 0; i < 8; i++) expect((await get(slow, '/v2/', wrong)).status).toBe(401);
      expect(performance.now() - start).toBeLessThan(2.5 * first);
    } finally {
      await slow.stop();
    }
  });
});
