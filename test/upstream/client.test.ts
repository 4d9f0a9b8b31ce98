import { randomBytes } from 'node:crypto';
import type { ServerResponse } from 'node:http';
import { createServer as createNetServer } from 'node:net';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { upstreamSchema } from '../../src/config/schema.js';
import { silentLogger } from '../../src/log/logger.js';
import { parseDigest, type Digest } from '../../src/oci/digest.js';
import { parseRepository } from '../../src/oci/reference.js';
import { realmMayReceiveCredentials } from '../../src/upstream/auth.js';
import { RegistryClient, type ClientOptions } from '../../src/upstream/client.js';
import { ReceiveSlabs } from '../../src/upstream/receive-slabs.js';
import { deferred } from '../../src/proxy/deferred.js';
import {
  UpstreamDeniedError,
  UpstreamInvalidError,
  UpstreamNotFoundError,
  UpstreamRateLimitedError,
  UpstreamUnavailableError,
} from '../../src/upstream/errors.js';
import { fakeServer } from '../helpers/fake-server.js';
import {
  makeImage,
  makeIndex,
  pushImage,
  pushManifest,
  sha256,
  type Image,
} from '../helpers/images.js';
import { freePort } from '../helpers/net.js';
import { TestRegistry } from '../helpers/registry.js';

const repo = parseRepository;
const digest = (d: string) => parseDigest(d).digest;

function client(
  url: string,
  extra: Record<string, unknown> = {},
  name = 'test',
  options: Pick<ClientOptions, 'tokenTimeout'> = {},
) {
  return new RegistryClient({
    name,
    config: upstreamSchema.parse({ url, ...extra }),
    log: silentLogger(),
    password: typeof extra.password === 'string' ? extra.password : undefined,
    retryDelay: 10,
    ...options,
  });
}

async function drain(stream: NodeJS.ReadableStream): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const chunk of stream) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks);
}

describe('against a real registry with token auth', () => {
  let registry: TestRegistry;
  let docker: Image;
  let oci: Image;
  let list: Image;
  let secret: Image;

  beforeAll(async () => {
    registry = await TestRegistry.start();
    docker = makeImage('library/alpine', '3.20', 'docker', [30_000]);
    oci = makeImage('org/oci-app', 'v1', 'oci', [10_000, 20_000, 5_000]);
    list = makeIndex('org/multi', 'latest', 'docker', ['amd64', 'arm64']);
    secret = makeImage('private/app', 'v1', 'docker', [8_000]);
    for (const image of [docker, oci, list, secret]) await pushImage(registry, image);
    for (let i = 0; i < 25; i++)
      await pushManifest(
        registry,
        'org/oci-app',
        `t${String(i).padStart(2, '0')}`,
        oci.manifest,
        oci.mediaType,
      );
  });
  afterAll(async () => registry.close());

  test('anonymous pull of a manifest by tag gives the bytes as pushed, with digest and media type', async () => {
    const c = client(registry.url);
    const m = await c.getManifest(repo('library/alpine'), '3.20');
    expect(m.bytes.equals(docker.manifest)).toBe(true);
    expect(m.digest).toBe(docker.digest);
    expect(m.mediaType).toBe(docker.mediaType);
    await c.close();
  });

  test('manifests of each media type, by tag and by digest', async () => {
    const c = client(registry.url);
    for (const image of [docker, oci, list, list.children![0]!]) {
      const byDigest = await c.getManifest(repo(image.repository), image.digest);
      expect(byDigest.mediaType).toBe(image.mediaType);
      expect(byDigest.bytes.equals(image.manifest)).toBe(true);
    }
    const head = await c.headManifest(repo('org/multi'), 'latest');
    expect(head).toEqual({
      digest: list.digest,
      mediaType: list.mediaType,
      size: list.manifest.length,
    });
    await c.close();
  });

  test('timeouts at 0 are off: a pull (its token, manifest and blob GETs) goes through', async () => {
    const c = client(registry.url, { timeouts: { connect: 0, headers: 0, bodyIdle: 0 } });
    const m = await c.getManifest(repo('org/oci-app'), 'v1');
    expect(m.digest).toBe(oci.digest);
    const blob = oci.blobs[0]!;
    const { stream } = await c.getBlob(repo('org/oci-app'), digest(blob.digest));
    expect((await drain(stream)).equals(blob.bytes)).toBe(true);
    await c.close();
  });

  test('blobs: HEAD gives the size, GET streams the exact bytes', async () => {
    const c = client(registry.url);
    for (const blob of oci.blobs) {
      expect(await c.headBlob(repo('org/oci-app'), digest(blob.digest))).toEqual({
        size: blob.bytes.length,
      });
      const { size, stream } = await c.getBlob(repo('org/oci-app'), digest(blob.digest));
      expect(size).toBe(blob.bytes.length);
      expect((await drain(stream)).equals(blob.bytes)).toBe(true);
    }
    await c.close();
  });

  test('unknown manifests and blobs are UpstreamNotFoundError', async () => {
    const c = client(registry.url);
    await expect(c.getManifest(repo('library/alpine'), 'nope')).rejects.toBeInstanceOf(
      UpstreamNotFoundError,
    );
    await expect(
      c.headBlob(repo('library/alpine'), digest(sha256('missing'))),
    ).rejects.toBeInstanceOf(UpstreamNotFoundError);
    await c.close();
  });

  test('a private repository is denied without credentials and served with them', async () => {
    const anonymous = client(registry.url);
    await expect(anonymous.getManifest(repo('private/app'), 'v1')).rejects.toBeInstanceOf(
      UpstreamDeniedError,
    );
    await anonymous.close();
    const wrong = client(registry.url, { username: 'reader', password: 'wrong' });
    await expect(wrong.getManifest(repo('private/app'), 'v1')).rejects.toBeInstanceOf(
      UpstreamDeniedError,
    );
    await wrong.close();
    const reader = client(registry.url, { username: 'reader', password: 'read-secret' });
    const m = await reader.getManifest(repo('private/app'), 'v1');
    expect(m.digest).toBe(secret.digest);
    const { stream } = await reader.getBlob(repo('private/app'), digest(secret.blobs[1]!.digest));
    expect((await drain(stream)).equals(secret.blobs[1]!.bytes)).toBe(true);
    await reader.close();
  });

  test('one token per scope is fetched and reused, also by concurrent requests', async () => {
    const c = client(registry.url);
    const scope = 'repository:org/oci-app:pull';
    const before = registry.tokens.count(scope);
    await Promise.all(Array.from({ length: 8 }, () => c.headManifest(repo('org/oci-app'), 'v1')));
    for (const blob of oci.blobs) await c.headBlob(repo('org/oci-app'), digest(blob.digest));
    expect(registry.tokens.count(scope) - before).toBe(1);
    await c.close();
  });

  test('an expired token is renewed with exactly one retry', async () => {
    const c = client(registry.url);
    const scope = 'repository:library/alpine:pull';
    // distribution allows 60 s of leeway on exp: this token is accepted for about 2 s more, while
    // expires_in still says 300, so the client keeps it and meets the registry's refusal.
    registry.tokens.actualLifetime = -58;
    try {
      await c.headManifest(repo('library/alpine'), '3.20');
      const after = registry.tokens.count(scope);
      await new Promise((r) => setTimeout(r, 3000));
      registry.tokens.actualLifetime = undefined;
      await c.headManifest(repo('library/alpine'), '3.20');
      expect(registry.tokens.count(scope) - after).toBe(1);
    } finally {
      registry.tokens.actualLifetime = undefined;
    }
    await c.close();
  });

  test('a token is not used past its expiry', async () => {
    const c = client(registry.url);
    const scope = 'repository:org/multi:pull';
    registry.tokens.expiresIn = 2;
    try {
      const before = registry.tokens.count(scope);
      await c.headManifest(repo('org/multi'), 'latest');
      await c.headManifest(repo('org/multi'), 'latest');
      expect(registry.tokens.count(scope) - before).toBe(1);
      await new Promise((r) => setTimeout(r, 1600));
      await c.headManifest(repo('org/multi'), 'latest');
      expect(registry.tokens.count(scope) - before).toBe(2);
    } finally {
      registry.tokens.expiresIn = 300;
    }
    await c.close();
  });

  test('tag lists follow Link pagination', async () => {
    const c = client(registry.url);
    const tags = await c.listTags(repo('org/oci-app'), { pageSize: 7 });
    expect(tags).toHaveLength(26);
    expect(new Set(tags).size).toBe(26);
    expect(tags).toContain('v1');
    expect(tags).toContain('t24');
    await c.close();
  });
});

/** A token service's answer: the token "t", for a minute. */
function giveToken(res: ServerResponse): void {
  res.writeHead(200, { 'content-type': 'application/json' }).end('{"token":"t","expires_in":60}');
}

/**
 * A registry that asks for a Bearer token (`Bearer <challenge>`) and answers a manifest HEAD
 * that carries the token "t".
 */
function bearerRegistry(challenge: string) {
  return fakeServer((req, res) => {
    if (req.headers.authorization === 'Bearer t')
      res.writeHead(200, { 'docker-content-digest': sha256('x') }).end();
    else res.writeHead(401, { 'www-authenticate': `Bearer ${challenge}` }).end();
  });
}

/** A registry that asks for Basic u:p and then redirects every request to `target`. */
function basicRedirectingTo(target: string) {
  return fakeServer((req, res) => {
    if (req.headers.authorization !== `Basic ${Buffer.from('u:p').toString('base64')}`) {
      res.writeHead(401, { 'www-authenticate': 'Basic realm="test"' }).end();
      return;
    }
    res.writeHead(307, { location: `${target}/object?sig=1` }).end();
  });
}

describe('faults a real registry cannot produce', () => {
  const blob = randomBytes(300_000);
  const blobDigest = digest(sha256(blob));

  test('a body cut off mid-blob is resumed with Range and the bytes are identical', async () => {
    let gets = 0;
    const server = await fakeServer((req, res) => {
      gets++;
      const range = /^bytes=(\d+)-$/.exec(req.headers.range ?? '');
      if (range) {
        const start = Number(range[1]);
        res.writeHead(206, {
          'content-length': blob.length - start,
          'content-range': `bytes ${start}-${blob.length - 1}/${blob.length}`,
        });
        res.end(blob.subarray(start));
        return;
      }
      res.writeHead(200, { 'content-length': blob.length });
      res.write(blob.subarray(0, 100_000), () => setTimeout(() => res.destroy(), 20));
    });
    const c = client(server.url);
    const { stream } = await c.getBlob(repo('a/b'), blobDigest);
    expect((await drain(stream)).equals(blob)).toBe(true);
    expect(gets).toBe(2);
    expect(server.requests[1]!.headers.range).toMatch(/^bytes=\d+-$/);
    await c.close();
    await server.close();
  });

  test('a Connection: close body that arrives with its FIN before the consumer reads neither crashes nor loses bytes', async () => {
    // The shape of undici issue 5360, which crashes the process with an uncatchable assertion
    // when the parser is paused: headers, a body over undici's 64 KiB buffer, and the FIN at once.
    const body = randomBytes(100_000);
    const server = createNetServer((socket) => {
      socket.once('data', () => {
        socket.end(
          Buffer.concat([
            Buffer.from(
              `HTTP/1.1 200 OK\r\nContent-Length: ${body.length}\r\nConnection: close\r\n\r\n`,
            ),
            body,
          ]),
        );
      });
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    const port = (server.address() as { port: number }).port;
    const c = client(`http://127.0.0.1:${port}`);
    const { stream } = await c.getBlob(repo('a/b'), digest(sha256(body)));
    await new Promise((r) => setTimeout(r, 300)); // busy elsewhere, as a cache write can be
    expect((await drain(stream)).equals(body)).toBe(true);
    await c.close();
    await new Promise((resolve) => server.close(resolve));
  });

  test('a consumer far behind the upstream pauses the body instead of buffering it all', async () => {
    const large = randomBytes(32 * 1024 * 1024);
    const server = await fakeServer((_req, res) => {
      res.writeHead(200, { 'content-length': large.length });
      res.end(large);
    });
    const c = client(server.url);
    // Nothing released: every slab read into stays lent, so `taken` counts what was received.
    const slabs = new ReceiveSlabs();
    const { stream } = await c.getBlob(repo('a/b'), digest(sha256(large)), { slabs });
    const chunks: Buffer[] = [];
    let takenWhileStalled = 0;
    for await (const chunk of stream) {
      if (chunks.length === 0) {
        await new Promise((r) => setTimeout(r, 500)); // a disk that lags
        takenWhileStalled = slabs.taken;
      }
      chunks.push(chunk as Buffer);
    }
    expect(Buffer.concat(chunks).equals(large)).toBe(true);
    // 4 MiB queued pauses the socket: a handful of 1 MiB slabs, not the 32 MiB sent.
    expect(takenWhileStalled).toBeGreaterThan(0);
    expect(takenWhileStalled).toBeLessThanOrEqual(8);
    expect(slabs.taken).toBeGreaterThanOrEqual(32);
    expect(server.requests.length).toBe(1);
    await c.close();
    await server.close();
  });

  test('an upstream that ignores Range is re-read and the first bytes skipped', async () => {
    let gets = 0;
    const server = await fakeServer((_req, res) => {
      gets++;
      res.writeHead(200, { 'content-length': blob.length });
      if (gets === 1)
        res.write(blob.subarray(0, 150_000), () => setTimeout(() => res.destroy(), 20));
      else res.end(blob);
    });
    const c = client(server.url);
    const { stream } = await c.getBlob(repo('a/b'), blobDigest);
    expect((await drain(stream)).equals(blob)).toBe(true);
    expect(gets).toBe(2);
    await c.close();
    await server.close();
  });

  test('a redirect to another origin drops the Authorization header', async () => {
    const storage = await fakeServer((req, res) => {
      if (req.headers.authorization) res.writeHead(400).end('authorization not allowed');
      else res.writeHead(200, { 'content-length': blob.length }).end(blob);
    });
    const registry = await basicRedirectingTo(storage.url);
    const c = client(registry.url, { username: 'u', password: 'p' });
    const { stream } = await c.getBlob(repo('a/b'), blobDigest);
    expect((await drain(stream)).equals(blob)).toBe(true);
    expect(storage.requests.every((r) => r.headers.authorization === undefined)).toBe(true);
    await c.close();
    await Promise.all([storage.close(), registry.close()]);
  });

  test('a redirect whose body is still coming is cut, not read beside the blob into the same slabs', async () => {
    const large = randomBytes(8 * 1024 * 1024);
    const storage = await fakeServer((_req, res) => {
      res.writeHead(200, { 'content-length': large.length });
      res.end(large);
    });
    const redirectClosed = deferred<void>();
    const registry = await fakeServer((req, res) => {
      req.socket.once('close', () => redirectClosed.resolve());
      // The 307's body comes in two parts: the rest only once the blob is on its way.
      const text = Buffer.alloc(30_000, 'r');
      res.writeHead(307, { location: `${storage.url}/object`, 'content-length': text.length });
      res.write(text.subarray(0, 1000));
      setTimeout(() => res.end(text.subarray(1000)), 30);
    });
    const c = client(registry.url);
    const slabs = new ReceiveSlabs();
    const { stream } = await c.getBlob(repo('a/b'), digest(sha256(large)), { slabs });
    const chunks: Buffer[] = [];
    for await (const chunk of stream) {
      await new Promise((r) => setTimeout(r, 2)); // a consumer a little behind: views wait in the queue
      chunks.push(Buffer.from(chunk as Buffer));
      slabs.release(chunk as Buffer);
    }
    expect(Buffer.concat(chunks).equals(large)).toBe(true);
    await redirectClosed.promise; // cut, not kept
    await c.close();
    await Promise.all([storage.close(), registry.close()]);
  });

  test('a consumer that stops early lets go of the upstream connection at once', async () => {
    const large = randomBytes(16 * 1024 * 1024);
    const closed = deferred<void>();
    const server = await fakeServer((req, res) => {
      req.socket.once('close', () => closed.resolve());
      res.writeHead(200, { 'content-length': large.length });
      res.end(large);
    });
    const c = client(server.url, { timeouts: { bodyIdle: '60s' } });
    const { stream } = await c.getBlob(repo('a/b'), digest(sha256(large)));
    for await (const _chunk of stream) break; // a failed write, say: the fetch stops reading
    const timeout = setTimeout(() => closed.reject(new Error('still connected after 5 s')), 5000);
    await closed.promise;
    clearTimeout(timeout);
    await c.close();
    await server.close();
  });

  test('a corrupted byte is an error, not data', async () => {
    const bad = Buffer.from(blob);
    bad[12345] = bad[12345]! ^ 0xff;
    const server = await fakeServer((_req, res) =>
      res.writeHead(200, { 'content-length': bad.length }).end(bad),
    );
    const c = client(server.url);
    const { stream } = await c.getBlob(repo('a/b'), blobDigest);
    await expect(drain(stream)).rejects.toBeInstanceOf(UpstreamInvalidError);
    await c.close();
    await server.close();
  });

  test('a manifest whose bytes do not match Docker-Content-Digest is refused', async () => {
    const server = await fakeServer((_req, res) =>
      res
        .writeHead(200, {
          'content-type': 'application/vnd.oci.image.manifest.v1+json',
          'docker-content-digest': sha256('other'),
        })
        .end('{"schemaVersion":2}'),
    );
    const c = client(server.url);
    await expect(c.getManifest(repo('a/b'), 'latest')).rejects.toBeInstanceOf(UpstreamInvalidError);
    await c.close();
    await server.close();
  });

  test('a manifest HEAD without Docker-Content-Digest names no digest by tag, the one asked for by digest; a malformed one is refused', async () => {
    const sent: Record<string, string> = {};
    const server = await fakeServer((_req, res) =>
      res
        .writeHead(200, { 'content-type': 'application/vnd.oci.image.manifest.v1+json', ...sent })
        .end(),
    );
    const c = client(server.url);
    const head = await c.headManifest(repo('a/b'), 'latest');
    expect(head).toMatchObject({ mediaType: 'application/vnd.oci.image.manifest.v1+json' });
    expect(head.digest).toBeUndefined();
    expect((await c.headManifest(repo('a/b'), sha256('x'))).digest).toBe(sha256('x'));
    sent['docker-content-digest'] = 'sha256:not-a-digest';
    await expect(c.headManifest(repo('a/b'), 'latest')).rejects.toBeInstanceOf(
      UpstreamInvalidError,
    );
    await c.close();
    await server.close();
  });

  test('a manifest larger than the cap is refused', async () => {
    const server = await fakeServer((_req, res) =>
      res.writeHead(200, { 'content-type': 'application/json' }).end(Buffer.alloc(5000, 32)),
    );
    const c = client(server.url, { maxManifestSize: '4KiB' });
    await expect(c.getManifest(repo('a/b'), 'latest')).rejects.toBeInstanceOf(UpstreamInvalidError);
    await c.close();
    await server.close();
  });

  test('429 becomes UpstreamRateLimitedError with Retry-After and the RateLimit figures', async () => {
    const server = await fakeServer((_req, res) =>
      res
        .writeHead(429, {
          'retry-after': '120',
          'ratelimit-limit': '100;w=21600',
          'ratelimit-remaining': '0;w=21600',
          'docker-ratelimit-source': '203.0.113.7',
        })
        .end('{"errors":[{"code":"TOOMANYREQUESTS"}]}'),
    );
    const c = client(server.url);
    const err = await c.getManifest(repo('a/b'), 'latest').catch((e: unknown) => e);
    expect(err).toBeInstanceOf(UpstreamRateLimitedError);
    expect((err as UpstreamRateLimitedError).headers['Retry-After']).toBe('120');
    expect(c.rateLimit).toMatchObject({
      limit: 100,
      remaining: 0,
      window: 21600,
      retryAfterSeconds: 120,
      source: '203.0.113.7',
    });
    await c.close();
    await server.close();
  });

  test('a blob HEAD without a Content-Length gives no size, not an empty blob', async () => {
    const server = await fakeServer((_req, res) => {
      res.removeHeader('content-length');
      res.writeHead(200, { 'transfer-encoding': 'chunked' }).end();
    });
    const c = client(server.url);
    expect(await c.headBlob(repo('a/b'), blobDigest)).toEqual({ size: undefined });
    await c.close();
    await server.close();
  });

  test('5xx is UpstreamUnavailableError', async () => {
    const server = await fakeServer((_req, res) => res.writeHead(503).end());
    const c = client(server.url);
    await expect(c.headManifest(repo('a/b'), 'latest')).rejects.toBeInstanceOf(
      UpstreamUnavailableError,
    );
    await c.close();
    await server.close();
  });

  test('a refused port fails fast once the health check opens', async () => {
    const port = await freePort();
    const c = client(`http://127.0.0.1:${port}`);
    for (let i = 0; i < 3; i++)
      await expect(c.headManifest(repo('a/b'), 'x')).rejects.toBeInstanceOf(
        UpstreamUnavailableError,
      );
    expect(c.isDown).toBe(true);
    expect(c.healthState).toBe('open');
    const started = performance.now();
    await expect(c.headManifest(repo('a/b'), 'x')).rejects.toThrow(/failing fast/);
    expect(performance.now() - started).toBeLessThan(50);
    await c.close();
  });

  test('a token service that answers 5xx is UpstreamUnavailableError, said once', async () => {
    const realm = await fakeServer((_req, res) => res.writeHead(503).end());
    const registry = await bearerRegistry(`realm="${realm.url}/token"`);
    const c = client(registry.url);
    const err = await c.headManifest(repo('a/b'), 'latest').catch((e: unknown) => e);
    expect(err).toBeInstanceOf(UpstreamUnavailableError);
    expect((err as Error).message).toBe(
      'upstream test is unavailable: token service answered HTTP 503',
    );
    await c.close();
    await Promise.all([realm.close(), registry.close()]);
  });

  test('a caller that gives up does not fail the others waiting for the same token', async () => {
    const answer = deferred<void>();
    const realm = await fakeServer((_req, res) => void answer.promise.then(() => giveToken(res)));
    const registry = await bearerRegistry(`realm="${realm.url}/token"`);
    const c = client(registry.url);
    const gone = new AbortController();
    const first = c.headManifest(repo('a/b'), 'latest', { signal: gone.signal });
    const second = c.headManifest(repo('a/b'), 'latest');
    while (realm.requests.length === 0) await new Promise((r) => setTimeout(r, 5));
    gone.abort(new Error('client gone'));
    await expect(first).rejects.toThrow('client gone');
    answer.resolve();
    await expect(second).resolves.toMatchObject({ digest: sha256('x') });
    expect(realm.requests).toHaveLength(1);
    await c.close();
    await Promise.all([realm.close(), registry.close()]);
  });

  test("a redirect target's 401 does not replace the upstream's challenge", async () => {
    const elsewhere = await fakeServer((_req, res) => giveToken(res));
    const storage = await fakeServer((_req, res) =>
      res.writeHead(401, { 'www-authenticate': `Bearer realm="${elsewhere.url}/token"` }).end(),
    );
    const registry = await basicRedirectingTo(storage.url);
    const c = client(registry.url, { username: 'u', password: 'p' });
    for (let i = 0; i < 2; i++)
      await expect(c.getBlob(repo('a/b'), blobDigest)).rejects.toBeInstanceOf(UpstreamDeniedError);
    expect(elsewhere.requests).toHaveLength(0);
    expect(c.authScheme).toBe('basic');
    await c.close();
    await Promise.all([elsewhere.close(), storage.close(), registry.close()]);
  });

  test('close does not wait for a token service that took the request and says nothing', async () => {
    const realm = await fakeServer(() => {}); // never answers
    const registry = await bearerRegistry(`realm="${realm.url}/token"`);
    const c = client(registry.url);
    const pending = c.headManifest(repo('a/b'), 'latest');
    pending.catch(() => {});
    while (realm.requests.length === 0) await new Promise((r) => setTimeout(r, 5));
    const started = performance.now();
    await c.close();
    // The headers timeout (30 s) would have held it; the grace is 2 s.
    expect(performance.now() - started).toBeLessThan(10_000);
    await expect(pending).rejects.toBeDefined();
    await Promise.all([realm.close(), registry.close()]);
  });

  test('a token request has a deadline of its own, even with the timeouts off', async () => {
    const realm = await fakeServer(() => {}); // takes the request, never answers
    const registry = await bearerRegistry(`realm="${realm.url}/token"`);
    const c = client(registry.url, { timeouts: { headers: 0, bodyIdle: 0 } }, 'test', {
      tokenTimeout: 300,
    });
    const started = performance.now();
    const err = await c.headManifest(repo('a/b'), 'latest').catch((e: unknown) => e);
    expect(err).toBeInstanceOf(UpstreamUnavailableError);
    expect((err as Error).message).toMatch(/token service did not answer within 0.3 s/);
    expect(performance.now() - started).toBeLessThan(5_000);
    // The scope is not held by the request that never ended: the next caller asks afresh.
    await expect(c.headManifest(repo('a/b'), 'latest')).rejects.toThrow(/did not answer/);
    expect(realm.requests).toHaveLength(2);
    await c.close();
    await Promise.all([realm.close(), registry.close()]);
  });

  test("a tag list whose pages link back, or that never ends, is the upstream's fault, not a short list", async () => {
    let page = 0;
    const server = await fakeServer((req, res) => {
      const looping = req.url!.includes('/loop/');
      const n = Number(/[?&]last=t(\d+)/.exec(req.url!)?.[1] ?? -1) + 1;
      page++;
      res
        .writeHead(200, {
          'content-type': 'application/json',
          // The loop's second page links back to its first; the other always has one more.
          link:
            looping && n > 0
              ? `</v2/a/loop/tags/list?n=1>; rel="next"`
              : `</v2/a/${looping ? 'loop' : 'endless'}/tags/list?n=1&last=t${n}>; rel="next"`,
        })
        .end(JSON.stringify({ name: 'a', tags: [`t${n}`, 'x'.repeat(100)] }));
    });
    const c = client(server.url, { maxManifestSize: '1KiB' });
    await expect(c.listTags(repo('a/loop'), { pageSize: 1 })).rejects.toThrow(
      /a page links back to a page already read/,
    );
    expect(page).toBe(2);
    // 16 KiB in all: about 120 pages of 140 bytes, then the list is refused whole.
    page = 0;
    const err = await c.listTags(repo('a/endless')).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(UpstreamInvalidError);
    expect((err as Error).message).toMatch(/more than/);
    expect(page).toBeGreaterThan(100);
    expect(page).toBeLessThan(130);
    await c.close();
    await server.close();
  });

  test('a tags page is held to the manifest size limit, and one that is not JSON is invalid', async () => {
    const tags = Array.from({ length: 200 }, (_, i) => `tag-${i}`);
    let body = JSON.stringify({ name: 'a/b', tags });
    const server = await fakeServer((_req, res) =>
      res.writeHead(200, { 'content-type': 'application/json' }).end(body),
    );
    const small = client(server.url, { maxManifestSize: '1KiB' });
    await expect(small.listTags(repo('a/b'))).rejects.toThrow(/more than the 1024/);
    const c = client(server.url);
    expect(await c.listTags(repo('a/b'))).toEqual(tags);
    body = '<html>not json</html>';
    await expect(c.listTags(repo('a/b'))).rejects.toBeInstanceOf(UpstreamInvalidError);
    body = 'null';
    expect(await c.listTags(repo('a/b'))).toEqual([]);
    await Promise.all([small.close(), c.close()]);
    await server.close();
  });

  test('credentials go only to a realm on the upstream domain', async () => {
    const realm = await fakeServer((_req, res) => giveToken(res), 'localhost');
    const registry = await bearerRegistry(`realm="${realm.url}/token",service="s"`);
    const c = client(registry.url, { username: 'u', password: 'p' });
    await c.headManifest(repo('a/b'), 'latest');
    expect(realm.requests).toHaveLength(1);
    expect(realm.requests[0]!.headers.authorization).toBeUndefined();
    expect(realm.requests[0]!.url).toContain('scope=repository%3Aa%2Fb%3Apull');
    await c.close();
    const allowed = client(registry.url, {
      username: 'u',
      password: 'p',
      authRealms: [`${realm.url}/`],
    });
    await allowed.headManifest(repo('a/b'), 'latest');
    expect(realm.requests[1]!.headers.authorization).toBe(
      `Basic ${Buffer.from('u:p').toString('base64')}`,
    );
    await allowed.close();
    await Promise.all([realm.close(), registry.close()]);
  });
});

describe('which token realms receive the upstream credentials', () => {
  const may = (upstream: string, realm: string, allowed: string[] = []) =>
    realmMayReceiveCredentials(new URL(upstream), new URL(realm), allowed);

  test("the upstream's own host, and auth.docker.io for Docker Hub; not another host of its domain", () => {
    const cases: [string, string, boolean][] = [
      ['https://ghcr.io', 'https://ghcr.io/token', true],
      ['https://registry-1.docker.io', 'https://auth.docker.io/token', true],
      ['https://registry.gitlab.com', 'https://gitlab.com/jwt/auth', true],
      ['https://myreg.azurecr.io', 'https://myreg.azurecr.io/oauth2/token', true],
      // Another tenant of a shared domain.
      ['https://myreg.azurecr.io', 'https://attacker.azurecr.io/token', false],
      [
        'https://1234.dkr.ecr.us-east-1.amazonaws.com',
        'https://5678.dkr.ecr.us-east-1.amazonaws.com/',
        false,
      ],
      ['https://registry.example.co.uk', 'https://auth.other.co.uk/token', false],
      ['https://registry.example.com', 'https://auth.example.com/token', false],
      ['https://registry-1.docker.io', 'https://evil.docker.io/token', false],
      // Never over a weaker scheme, never with user information.
      ['https://ghcr.io', 'http://ghcr.io/token', false],
      ['https://ghcr.io', 'https://user:pw@ghcr.io/token', false],
    ];
    for (const [upstream, realm, expected] of cases)
      expect({ upstream, realm, may: may(upstream, realm) }).toEqual({
        upstream,
        realm,
        may: expected,
      });
  });

  test('authRealms entries are matched by origin and by path segment, not as string prefixes', () => {
    const upstream = 'https://registry.example.com';
    const cases: [string[], string, boolean][] = [
      [['http://auth.good.example'], 'http://auth.good.example/token?scope=x', true],
      [['https://auth.good.example/auth'], 'https://auth.good.example/auth', true],
      [['https://auth.good.example/auth'], 'https://auth.good.example/auth/token', true],
      [['https://auth.good.example/auth/'], 'https://auth.good.example/auth/token', true],
      [['https://auth.good.example:8443'], 'https://auth.good.example:8443/token', true],
      // What a string prefix let through: user information naming the good host, a longer
      // host name, a longer path segment; and another scheme or port.
      [['http://auth.good.example'], 'http://auth.good.example@evil:8080/token', false],
      [['https://auth.good.example'], 'https://auth.good.example.evil.net/', false],
      [['https://auth.good.example/auth'], 'https://auth.good.example/authx', false],
      [['https://auth.good.example/auth'], 'https://auth.good.example/auth/../evil', false],
      [['https://auth.good.example'], 'http://auth.good.example/token', false],
      [['https://auth.good.example'], 'https://auth.good.example:8443/token', false],
      [['https://auth.good.example'], 'https://u:p@auth.good.example/token', false],
    ];
    for (const [allowed, realm, expected] of cases)
      expect({ allowed, realm, may: may(upstream, realm, allowed) }).toEqual({
        allowed,
        realm,
        may: expected,
      });
  });
});

export type { Digest };
