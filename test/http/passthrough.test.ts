/**
 * What a passthrough upstream is sent after the name: each segment checked (a reference, a
 * digest, an upload id) and sent decoded, so that no `..%2F` leaves the repository the lists and
 * rules were asked about; a cross-repository mount's `from` checked as a pull of it would be,
 * and named as the upstream knows it; the `/v2/` ping of a default passthrough upstream; with
 * client authentication, no upstream challenge relayed to the client; and the URLs of an answer
 * (Location, Link) pointed back at pullcache as the client addressed the request.
 */
import { mkdtempSync } from 'node:fs';
import { createServer } from 'node:http';
import { connect, type AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { fakeServer, type FakeServer } from '../helpers/fake-server.js';
import { basic, htpasswdFile } from '../helpers/htpasswd.js';
import { ociError, rawRequest } from '../helpers/http.js';
import { makeImage, pushBlob, pushImage, type Image } from '../helpers/images.js';
import { freePort } from '../helpers/net.js';
import { capturedLog, startPullcache, type TestPullcache } from '../helpers/pullcache.js';
import { Recorder } from '../helpers/recorder.js';
import { TestRegistry } from '../helpers/registry.js';
import { expectDirHolds, skopeo, skopeoCopy } from '../helpers/skopeo.js';

describe('passthrough requests', () => {
  let registry: TestRegistry;
  let recorder: Recorder;
  let app: Image;
  let secret: Image;
  /** No client authentication; passthru.test (denying secret/**) is the default upstream. */
  let open: TestPullcache;
  /**
   * Client authentication, passthru.test the default upstream: bob pushes to its public/*, and
   * may pull nothing else; anonymous callers pull its public/*.
   */
  let ruled: TestPullcache;
  const bob = basic('bob', 'bob-pw');
  /** What the upstream's token gives the client: a push to public/app, pulls everywhere. */
  let pusher: Record<string, string>;

  beforeAll(async () => {
    registry = await TestRegistry.start();
    recorder = await Recorder.start(registry.url);
    app = makeImage('public/app', 'v1', 'oci', [1000]);
    secret = makeImage('secret/app', 'latest', 'oci', [1500]);
    for (const image of [app, secret]) await pushImage(registry, image);
    // public/lib has the secret layer too (a mount from there is allowed).
    await pushBlob(registry, 'public/lib', secret.blobs[1]!);
    pusher = {
      authorization: `Bearer ${registry.tokens.sign(
        'pusher',
        [
          'repository:public/app:pull,push',
          'repository:public/lib:pull',
          'repository:secret/app:pull',
          'repository:other/app:pull',
        ].join(' '),
      )}`,
    };
    const upstreams = {
      'docker.io': { url: registry.url },
      'passthru.test': {
        url: recorder.url,
        mode: 'passthrough',
        repositories: { deny: ['secret/**'] },
      },
    };
    open = await startPullcache({ upstreams, routing: { default: 'passthru.test' } });
    ruled = await startPullcache({
      upstreams,
      routing: { default: 'passthru.test' },
      auth: {
        htpasswd: htpasswdFile({ bob: 'bob-pw' }, 4),
        anonymous: true,
        rules: [
          {
            users: ['bob'],
            upstreams: ['passthru.test'],
            repositories: ['public/*'],
            actions: ['pull', 'admin'],
          },
          {
            users: ['anonymous'],
            upstreams: ['passthru.test'],
            repositories: ['public/*'],
            actions: ['pull'],
          },
        ],
      },
    });
  });
  afterAll(async () => {
    await open?.stop();
    await ruled?.stop();
    await recorder?.close();
    await registry?.close();
  });

  const answer = async (
    pc: TestPullcache,
    method: string,
    path: string,
    headers: Record<string, string> = {},
  ) => {
    const res = await rawRequest(pc.url, method, path, headers);
    return { path, status: res.status, code: res.status >= 400 ? await ociError(res) : undefined };
  };

  test('a reference, digest or upload id that is not one is refused before the upstream is asked', async () => {
    const blob = secret.blobs[1]!.digest;
    const climb = (rest: string) => `..%2F..%2Fsecret%2Fapp%2F${rest.replaceAll('/', '%2F')}`;
    const cases: [string, string, number, string][] = [
      ['GET', `/v2/public/app/manifests/${climb('manifests/latest')}`, 404, 'MANIFEST_UNKNOWN'],
      ['HEAD', `/v2/public/app/manifests/${climb('manifests/latest')}`, 404, ''],
      ['PUT', `/v2/public/app/manifests/${climb('manifests/latest')}`, 404, 'MANIFEST_UNKNOWN'],
      ['GET', '/v2/public/app/manifests/%2e%2e', 404, 'MANIFEST_UNKNOWN'],
      ['GET', '/v2/public/app/manifests/doc%ker', 404, 'MANIFEST_UNKNOWN'],
      ['GET', '/v2/public/app/manifests/sha256:..%2F..', 400, 'DIGEST_INVALID'],
      ['GET', `/v2/public/app/blobs/${climb(`blobs/${blob}`)}`, 400, 'DIGEST_INVALID'],
      ['GET', '/v2/public/app/blobs/sha256%zz', 400, 'DIGEST_INVALID'],
      ['GET', `/v2/public/app/referrers/${climb(blob)}`, 400, 'DIGEST_INVALID'],
      [
        'PATCH',
        `/v2/public/app/blobs/uploads/${climb('blobs/uploads/x')}`,
        404,
        'BLOB_UPLOAD_UNKNOWN',
      ],
      ['PUT', '/v2/public/app/blobs/uploads/..', 404, 'BLOB_UPLOAD_UNKNOWN'],
      ['PUT', '/v2/public/app/blobs/uploads/%2e%2e', 404, 'BLOB_UPLOAD_UNKNOWN'],
      ['GET', '/v2/public/app/blobs/uploads/a%zz', 404, 'BLOB_UPLOAD_UNKNOWN'],
    ];
    recorder.reset();
    for (const [method, path, status, code] of cases) {
      const got = await answer(open, method, path);
      expect({ method, ...got }).toEqual({
        method,
        path,
        status,
        code: method === 'HEAD' ? 'not OCI JSON: ' : code,
      });
    }
    expect(recorder.requests).toEqual([]);

    // What is one goes on, decoded.
    const valid: [string, string, string][] = [
      ['GET', '/v2/public/app/manifests/v1', '/v2/public/app/manifests/v1'],
      [
        'GET',
        `/v2/public/app/manifests/${app.digest.replace(':', '%3A')}`,
        `/v2/public/app/manifests/${app.digest}`,
      ],
      [
        'HEAD',
        `/v2/public/app/blobs/${app.blobs[1]!.digest}`,
        `/v2/public/app/blobs/${app.blobs[1]!.digest}`,
      ],
      ['GET', '/v2/public/app/tags/list', '/v2/public/app/tags/list'],
      [
        'PATCH',
        '/v2/public/app/blobs/uploads/3f2504e0-4f89-11d3-9a0c-0305e82c3301',
        '/v2/public/app/blobs/uploads/3f2504e0-4f89-11d3-9a0c-0305e82c3301',
      ],
    ];
    for (const [method, path, sent] of valid) {
      recorder.reset();
      await rawRequest(open.url, method, path, pusher);
      expect(recorder.requests.map((r) => `${r.method} ${r.path}`)).toEqual([`${method} ${sent}`]);
    }
  });

  test("the client's hop-by-hop headers are not passed on: its Transfer-Encoding, TE, what its Connection names, its Proxy-Authorization", async () => {
    // Open: the upstream's token goes on, and its answer comes back. With client authentication
    // no credential goes on (the upstream then refuses): what matters is what it was sent.
    for (const [pc, authorization, status] of [
      [open, pusher.authorization!, 'HTTP/1.1 200 OK'],
      [ruled, bob.authorization, 'HTTP/1.1 403 Forbidden'],
    ] as const) {
      recorder.reset();
      const url = new URL(pc.url);
      const raw = await new Promise<string>((resolve, reject) => {
        // Written, not ended: the answer comes before the server closes (Connection: close).
        const socket = connect(Number(url.port), url.hostname, () =>
          socket.write(
            [
              'GET /v2/public/app/manifests/v1 HTTP/1.1',
              `Host: ${url.host}`,
              'Accept: application/vnd.oci.image.manifest.v1+json',
              `Authorization: ${authorization}`,
              'Transfer-Encoding: gzip, chunked',
              'TE: trailers',
              'Connection: close, X-Drop',
              'X-Drop: 1',
              'X-Kept: 1',
              `Proxy-Authorization: ${basic('proxy-user', 'proxy-pw').authorization}`,
              '',
              '0',
              '',
              '',
            ].join('\r\n'),
          ),
        );
        let got = '';
        socket.on('data', (chunk: Buffer) => (got += chunk.toString('latin1')));
        socket.on('end', () => resolve(got));
        socket.on('error', reject);
      });
      // Before, the upstream refused a `gzip, chunked` body it was sent as such: 501.
      expect(raw.split('\r\n')[0]).toBe(status);
      const sent = recorder.headers.at(-1)!;
      expect(sent['x-kept']).toBe('1');
      for (const name of ['transfer-encoding', 'te', 'x-drop', 'proxy-authorization'])
        expect({ name, value: sent[name] }).toEqual({ name, value: undefined });
    }
  });

  test("a mount's `from` is refused where a pull of it would be, and sent as the upstream names it", async () => {
    const digest = secret.blobs[1]!.digest;
    const mount = (pc: TestPullcache, query: string, headers: Record<string, string>) =>
      answer(pc, 'POST', `/v2/public/app/blobs/uploads/?${query}`, headers);
    recorder.reset();
    // Denied by the lists, however it is named.
    for (const from of ['secret/app', 'passthru.test/secret/app', 'secret%2Fapp'])
      expect(await mount(open, `mount=${digest}&from=${from}`, pusher)).toMatchObject({
        status: 403,
        code: 'DENIED',
      });
    expect(await mount(open, `from=secret/app&mount=${digest}`, pusher)).toMatchObject({
      status: 403,
    });
    // Malformed.
    expect(await mount(open, `mount=${digest}&from=Secret/App`, pusher)).toMatchObject({
      status: 400,
      code: 'NAME_INVALID',
    });
    expect(await mount(open, `mount=${digest}&from=public/lib&from=x`, pusher)).toMatchObject({
      status: 400,
      code: 'NAME_INVALID',
    });
    expect(await mount(open, 'mount=sha256:nope&from=public/lib', pusher)).toMatchObject({
      status: 400,
      code: 'DIGEST_INVALID',
    });
    expect(recorder.requests).toEqual([]);

    // Refused by the rules: bob may pull (and push to) public/* only.
    const prefixed = (query: string) =>
      answer(ruled, 'POST', `/v2/passthru.test/public/app/blobs/uploads/?${query}`, bob);
    expect(await prefixed(`mount=${digest}&from=passthru.test/other/app`)).toEqual({
      path: expect.any(String),
      status: 403,
      code: 'DENIED',
    });
    expect(recorder.requests).toEqual([]);

    // Allowed: the upstream mounts it from public/lib (201), named as it knows it.
    expect(await mount(open, `mount=${digest}&from=public/lib`, pusher)).toMatchObject({
      status: 201,
    });
    expect(
      await mount(open, `mount=${digest}&from=passthru.test/public/lib`, pusher),
    ).toMatchObject({ status: 201 });
    // From another upstream's repository, or from nowhere named: an upload instead (202).
    expect(await mount(open, `mount=${digest}&from=docker.io/secret/app`, pusher)).toMatchObject({
      status: 202,
    });
    expect(await mount(open, `mount=${digest}`, pusher)).toMatchObject({ status: 202 });
    expect(recorder.count('POST', /^\/v2\/public\/app\/blobs\/uploads\/$/)).toBe(4);
  });

  test('the ping goes to a default passthrough upstream that answers, and is answered here when it cannot be reached', async () => {
    // It answers (401, its challenge): the client learns the upstream's auth from it.
    const ping = await fetch(`${open.url}/v2/`);
    expect(ping.status).toBe(401);
    expect(ping.headers.get('www-authenticate')).toMatch(/^Bearer realm=/);

    // Down (a closed port) or silent (a timeout): the ping is answered here, with a warning (once a minute), and
    // the cached upstream still serves.
    const silent = createServer(() => {}); // takes connections, never answers
    await new Promise<void>((resolve) => silent.listen(0, '127.0.0.1', resolve));
    const cases = [
      [`http://127.0.0.1:${await freePort()}`, /ECONNREFUSED/],
      [`http://127.0.0.1:${(silent.address() as AddressInfo).port}`, /socket hang up/],
    ] as const;
    try {
      for (const [url, reason] of cases) {
        const captured = capturedLog('info');
        const down = await startPullcache(
          {
            upstreams: {
              'docker.io': { url: registry.url },
              'passthru.test': { url, mode: 'passthrough', timeouts: { headers: '500ms' } },
            },
            routing: { default: 'passthru.test' },
          },
          undefined,
          { log: captured.log },
        );
        try {
          const local = await fetch(`${down.url}/v2/`);
          expect({ url, status: local.status, body: await local.text() }).toEqual({
            url,
            status: 200,
            body: '{}',
          });
          expect(
            captured.lines.find((l) => /\/v2\/ answered by pullcache/.test(String(l.msg))),
          ).toMatchObject({
            level: 40,
            upstream: 'passthru.test',
            err: expect.stringMatching(reason),
          });
          const dir = mkdtempSync(join(tmpdir(), 'pullcache-passthrough-'));
          await skopeoCopy(down.host, 'docker.io/public/app:v1', dir);
          expectDirHolds(dir, app);
          // Every pull pings first: the warning is not repeated per ping while it stays down.
          expect((await fetch(`${down.url}/v2/`)).status).toBe(200);
          expect(
            captured.lines.filter((l) => /\/v2\/ answered by pullcache/.test(String(l.msg))),
          ).toHaveLength(1);
        } finally {
          await down.stop();
        }
      }
    } finally {
      silent.closeAllConnections();
      silent.close();
    }
  });

  test("with client authentication, the upstream's challenge never reaches the client: pullcache's own, or 403 to a caller with credentials", async () => {
    // The registry takes no request without its own token, and pullcache sends none of the
    // client's: every request below is asked of it, and answered 401 with its realm.
    const ours = `Bearer realm="${ruled.url}/_pullcache/token",service="pullcache"`;
    /** A token of pullcache's realm, as clients ask for one after its challenge. */
    const tokenFor = async (headers: Record<string, string>) => {
      const res = await rawRequest(ruled.url, 'GET', '/_pullcache/token', headers);
      expect(res.status).toBe(200);
      const { token } = JSON.parse(res.body.toString()) as { token: string };
      return { authorization: `Bearer ${token}` };
    };
    const asAnonymous = await tokenFor({});
    const asBob = await tokenFor(bob);
    const manifest = '/v2/public/app/manifests/v1';
    const cases: [string, string, Record<string, string>, number][] = [
      // No credential at all: pullcache's challenge, which a client may answer.
      ['GET', manifest, {}, 401],
      ['HEAD', manifest, {}, 401],
      ['GET', '/v2/passthru.test/public/app/tags/list', {}, 401],
      // Credentials pullcache took (a password, its tokens): refused, not sent round again.
      ['GET', manifest, bob, 403],
      ['GET', manifest, asBob, 403],
      ['HEAD', `/v2/public/app/blobs/${app.blobs[1]!.digest}`, asBob, 403],
      ['GET', manifest, asAnonymous, 403],
      ['POST', '/v2/public/app/blobs/uploads/', bob, 403], // a push: bob has admin there
    ];
    for (const [method, path, headers, status] of cases) {
      recorder.reset();
      const res = await rawRequest(ruled.url, method, path, headers);
      const body = res.body.toString();
      expect({
        method,
        path,
        status: res.status,
        code: method === 'HEAD' ? undefined : await ociError(res),
        challenge: res.headers['www-authenticate'],
        realm: body.includes(registry.tokens.url),
      }).toEqual({
        method,
        path,
        status,
        code: method === 'HEAD' ? undefined : status === 401 ? 'UNAUTHORIZED' : 'DENIED',
        challenge: status === 401 ? ours : undefined,
        realm: false,
      });
      expect(recorder.requests.map((r) => `${r.method} ${r.status}`)).toEqual([`${method} 401`]);
      expect(recorder.headers.every((h) => h.authorization === undefined)).toBe(true);
    }
    // The ping is pullcache's: its challenge, not the upstream's; the upstream is not asked.
    recorder.reset();
    const ping = await rawRequest(ruled.url, 'GET', '/v2/');
    expect({ status: ping.status, challenge: ping.headers['www-authenticate'] }).toEqual({
      status: 401,
      challenge: ours,
    });
    expect((await rawRequest(ruled.url, 'GET', '/v2/', bob)).status).toBe(200);
    expect(recorder.requests).toEqual([]);

    // Without client authentication pullcache stays transparent: the upstream's challenge comes
    // back, and the client's own credentials go on.
    recorder.reset();
    const challenged = await rawRequest(open.url, 'GET', manifest);
    expect(challenged.status).toBe(401);
    expect(challenged.headers['www-authenticate']).toContain(registry.tokens.url);
    const pulled = await rawRequest(open.url, 'GET', manifest, {
      ...pusher,
      accept: app.mediaType,
    });
    expect(pulled.status).toBe(200);
    expect(pulled.body.equals(app.manifest)).toBe(true);
    expect(recorder.headers.map((h) => h.authorization)).toEqual([undefined, pusher.authorization]);
  });

  describe("an answer's URLs", () => {
    /**
     * distribution 2.8 (the real upstream above) answers a tags list whole, without a Link,
     * whatever `n` says: this one pages it as distribution 3, Docker Hub and ghcr.io do, `n` at
     * a time (2 when not given), with a Link to the next page written as `link` says.
     */
    let paged: FakeServer;
    let link: (next: string) => string;
    const tags = ['v1', 'v2', 'v3', 'v4', 'v5'];
    /** docker.io (the real upstream, cached) is the default; paged.test is passthrough. */
    let pc: TestPullcache;

    beforeAll(async () => {
      paged = await fakeServer((req, res) => {
        const url = new URL(req.url ?? '/', 'http://fake');
        res.setHeader('content-type', 'application/json');
        if (req.method === 'POST' && url.pathname === '/v2/org/app/blobs/uploads/') {
          res.writeHead(202, { location: '/v2/org/app/blobs/uploads/u1?_state=s1' }).end();
          return;
        }
        if (url.pathname !== '/v2/org/app/tags/list') {
          res.writeHead(404).end(JSON.stringify({ errors: [{ code: 'NAME_UNKNOWN' }] }));
          return;
        }
        const n = Number(url.searchParams.get('n') ?? 2);
        const last = url.searchParams.get('last');
        const from = last === null ? 0 : tags.indexOf(last) + 1;
        const page = tags.slice(from, from + n);
        if (from + n < tags.length)
          res.setHeader('link', link(`/v2/org/app/tags/list?last=${page.at(-1)}&n=${n}`));
        res.end(JSON.stringify({ name: 'org/app', tags: page }));
      });
      pc = await startPullcache({
        upstreams: {
          'docker.io': { url: registry.url },
          'paged.test': { url: paged.url, mode: 'passthrough' },
        },
        routing: { default: 'docker.io' },
      });
    });
    afterAll(async () => {
      await pc?.stop();
      await paged?.close();
    });

    /**
     * Every page of a tags list from `first` on, each Link followed as crane, skopeo and regctl
     * follow it: its target's path and query, asked of the host they dialled.
     */
    const follow = async (first: string) => {
      const pages: { path: string; status: number; tags?: string[]; link?: string }[] = [];
      for (let path: string | undefined = first; path !== undefined && pages.length < 5;) {
        const res = await rawRequest(pc.url, 'GET', path);
        const body = JSON.parse(res.body.toString()) as { tags?: string[] };
        const next = res.headers.link as string | undefined;
        pages.push({ path, status: res.status, tags: body.tags, link: next });
        const target = next === undefined ? undefined : /^<([^>]*)>/.exec(next)?.[1];
        const url = target === undefined ? undefined : new URL(target, 'http://dialled');
        path = url && `${url.pathname}${url.search}`;
      }
      return pages;
    };

    test('the Link to the next page points at pullcache as the client addressed it, and following it reaches the same repository', async () => {
      // Relative, as distribution writes it; absolute, naming the upstream itself.
      for (const written of [(next: string) => next, (next: string) => `${paged.url}${next}`]) {
        link = (next) => `<${written(next)}>; rel="next"`;
        for (const [first, name, ns] of [
          ['/v2/paged.test/org/app/tags/list?n=2', 'paged.test/org/app', ''],
          ['/v2/org/app/tags/list?n=2&ns=paged.test', 'org/app', '&ns=paged.test'],
        ] as const) {
          paged.requests.length = 0;
          const at = (last: string) => `/v2/${name}/tags/list?last=${last}&n=2${ns}`;
          expect(await follow(first)).toEqual([
            { path: first, status: 200, tags: ['v1', 'v2'], link: `<${at('v2')}>; rel="next"` },
            { path: at('v2'), status: 200, tags: ['v3', 'v4'], link: `<${at('v4')}>; rel="next"` },
            { path: at('v4'), status: 200, tags: ['v5'], link: undefined },
          ]);
          // Every page from the upstream's org/app (`ns` goes on too, as the client sent it).
          expect(paged.requests.map((r) => r.url)).toEqual([
            `/v2/org/app/tags/list?n=2${ns}`,
            `/v2/org/app/tags/list?last=v2&n=2${ns}`,
            `/v2/org/app/tags/list?last=v4&n=2${ns}`,
          ]);
        }
      }
      // A real client: skopeo asks without `n`, and follows each page's Link.
      link = (next) => `<${next}>; rel="next"`;
      const listed = await skopeo(
        'list-tags',
        '--tls-verify=false',
        `docker://${pc.host}/paged.test/org/app`,
      );
      expect(JSON.parse(listed)).toMatchObject({ Tags: tags });
    });

    test("each link's target is pointed at pullcache, the rest of the header kept as written, and Location keeps `ns` too", async () => {
      const own = (path: string) => `${paged.url.replace('//', '//user:secret@')}${path}#top`;
      link = (next) =>
        [
          `<${paged.url}${next}>; rel="next"; title="page 2, <of 3>; \\"tags\\""`,
          '<https://elsewhere.example/v2/org/app/tags/list?last=v2>;rel=alternate',
          ` ,<?last=v4&n=2&ns=docker.io> ; rel="last"`,
          `<${own('/v2/org/app/tags/list')}>; rel="first"`,
          '<../../x/tags/list>; anchor="/v2/"',
          '</storage/blob-1>; rel="blob"',
        ].join(', ');
      const expected = (name: string, ns: string) =>
        [
          `</v2/${name}/tags/list?last=v2&n=2${ns}>; rel="next"; title="page 2, <of 3>; \\"tags\\""`,
          // Another host's: as the upstream wrote it, as a Location to another host is.
          '<https://elsewhere.example/v2/org/app/tags/list?last=v2>;rel=alternate',
          ` ,</v2/${name}/tags/list?last=v4&n=2${ns}> ; rel="last"`,
          `</v2/${name}/tags/list${ns.replace('&', '?')}>; rel="first"`,
          `</v2/${name.replace('/app', '/x')}/tags/list${ns.replace('&', '?')}>; anchor="/v2/"`,
          // The upstream's own path outside /v2/: its full URL, not one pullcache would resolve.
          `<${paged.url}/storage/blob-1>; rel="blob"`,
        ].join(', ');
      for (const [path, name, ns] of [
        ['/v2/paged.test/org/app/tags/list?n=2', 'paged.test/org/app', ''],
        ['/v2/org/app/tags/list?n=2&ns=paged.test', 'org/app', '&ns=paged.test'],
      ] as const) {
        const res = await rawRequest(pc.url, 'GET', path);
        expect({ path, link: res.headers.link }).toEqual({ path, link: expected(name, ns) });
      }

      // Not a Link header by RFC 8288: nothing in it can be told from a target, so it goes.
      for (const broken of [
        (next: string) => `<${paged.url}${next}; rel="next"`,
        (next: string) => `<${next}>; rel="next, <${paged.url}${next}>`,
        (next: string) => `<${next}> <${paged.url}${next}>; rel="next"`,
      ]) {
        link = broken;
        const res = await rawRequest(pc.url, 'GET', '/v2/paged.test/org/app/tags/list?n=2');
        expect({ status: res.status, link: res.headers.link }).toEqual({
          status: 200,
          link: undefined,
        });
      }

      // An upload's Location: its `ns` kept, as a Link's is.
      const upload = await rawRequest(pc.url, 'POST', '/v2/org/app/blobs/uploads/?ns=paged.test');
      expect({ status: upload.status, location: upload.headers.location }).toEqual({
        status: 202,
        location: '/v2/org/app/blobs/uploads/u1?_state=s1&ns=paged.test',
      });
    });
  });
});
