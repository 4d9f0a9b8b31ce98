/**
 * Request bodies: a push through a passthrough upstream has no limit on its whole time (Node's
 * 300 s for a whole request cut big layers on slow links while their bytes still flowed), and a
 * body that stops coming is cut after `server.bodyIdleTimeout`, whichever route it is for. The
 * real upstream takes the push; raw sockets play the clients.
 */
import { request } from 'node:http';
import { connect } from 'node:net';
import { randomBytes } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { fakeServer, type FakeServer } from '../helpers/fake-server.js';
import { pushRandomBlob, sha256 } from '../helpers/images.js';
import { startPullcache, type TestPullcache } from '../helpers/pullcache.js';
import { TestRegistry } from '../helpers/registry.js';

describe('request bodies', () => {
  let registry: TestRegistry;
  let pc: TestPullcache;
  let auth: Record<string, string>;
  /** A passthrough upstream that takes a request's headers and then reads nothing, ever. */
  let stuck: FakeServer;

  beforeAll(async () => {
    registry = await TestRegistry.start();
    stuck = await fakeServer(() => {});
    auth = { authorization: `Bearer ${registry.tokens.pushToken('team/app')}` };
    pc = await startPullcache({
      upstreams: {
        'docker.io': { url: registry.url },
        'push.test': { url: registry.url, mode: 'passthrough' },
        'stuck.test': { url: stuck.url, mode: 'passthrough', timeouts: { headers: '1s' } },
      },
      server: { bodyIdleTimeout: '1s' },
    });
  });
  afterAll(async () => {
    await pc?.stop();
    await stuck?.close();
    await registry?.close();
  });

  /** Sends `head` on a raw socket and then nothing; resolves with the ms until the server closes. */
  const stallAfter = (head: string) =>
    new Promise<{ ms: number; answer: string }>((resolve, reject) => {
      const url = new URL(pc.url);
      const started = Date.now();
      let answer = '';
      const socket = connect(Number(url.port), url.hostname, () => socket.write(head));
      socket.on('data', (chunk: Buffer) => (answer += chunk.toString('latin1')));
      // Closed with bytes it had not read (the rest of a body), a socket resets the connection.
      socket.on('error', (err: NodeJS.ErrnoException) => {
        if (err.code !== 'ECONNRESET') reject(err);
      });
      socket.on('close', () => resolve({ ms: Date.now() - started, answer }));
      setTimeout(() => socket.destroy(new Error('still open after 10 s')), 10_000).unref();
    });

  test('a push whose body trickles in for longer than the idle timeout goes through whole', async () => {
    expect(pc.server.requestTimeout).toBe(0);
    const start = await fetch(`${pc.url}/v2/push.test/team/app/blobs/uploads/`, {
      method: 'POST',
      headers: auth,
    });
    expect(start.status).toBe(202);
    const location = new URL(start.headers.get('location')!, pc.url);
    const blob = randomBytes(16 * 1024);
    // 16 pieces, 250 ms apart: 4 s in all, each gap well under the 1 s idle timeout.
    const patched = await new Promise<{ status: number; location: string }>((resolve, reject) => {
      const req = request(
        location,
        {
          method: 'PATCH',
          headers: { ...auth, 'content-type': 'application/octet-stream' },
        },
        (res) => {
          res.resume();
          res.on('end', () =>
            resolve({ status: res.statusCode ?? 0, location: String(res.headers.location) }),
          );
        },
      );
      req.on('error', reject);
      let piece = 0;
      const timer = setInterval(() => {
        req.write(blob.subarray(piece * 1024, (piece + 1) * 1024));
        if (++piece === 16) {
          clearInterval(timer);
          req.end();
        }
      }, 250);
    });
    expect(patched.status).toBe(202);
    const digest = sha256(blob);
    const done = new URL(patched.location, pc.url);
    done.searchParams.set('digest', digest);
    const put = await fetch(done, { method: 'PUT', headers: auth });
    expect(put.status).toBe(201);
    const stored = await fetch(`${registry.url}/v2/team/app/blobs/${digest}`, { headers: auth });
    expect(Buffer.from(await stored.arrayBuffer()).equals(blob)).toBe(true);
  });

  test('a body that stops half-way is cut after the idle timeout, a passthrough push or not', async () => {
    const start = await fetch(`${pc.url}/v2/push.test/team/app/blobs/uploads/`, {
      method: 'POST',
      headers: auth,
    });
    const location = new URL(start.headers.get('location')!, pc.url);
    const pushed = await stallAfter(
      [
        `PATCH ${location.pathname}${location.search} HTTP/1.1`,
        'Host: 127.0.0.1',
        `Authorization: ${auth.authorization}`,
        'Content-Length: 100000',
        '',
        'only these bytes',
      ].join('\r\n'),
    );
    expect(pushed.ms).toBeGreaterThanOrEqual(900);
    expect(pushed.ms).toBeLessThan(5000);
    // A cache-mode route answers without reading the body; what follows it is cut as well.
    const refused = await stallAfter(
      [
        'PUT /v2/team/app/manifests/v1 HTTP/1.1',
        'Host: 127.0.0.1',
        'Content-Length: 100000',
        '',
        '{"schemaVersion":',
      ].join('\r\n'),
    );
    expect(refused.answer).toMatch(/^HTTP\/1\.1 405 /);
    expect(refused.ms).toBeLessThan(5000);
    // Pipelined after a whole one, on the same connection: watched as its own. (Not through a
    // passthrough upstream: one that stops reading the forwarded body holds it, which the
    // upstream's own timeout ends, not this one.)
    const put = (length: number, body: string) =>
      [
        'PUT /v2/team/app/manifests/v1 HTTP/1.1',
        'Host: 127.0.0.1',
        `Content-Length: ${length}`,
        '',
        body,
      ].join('\r\n');
    const pipelined = await stallAfter(put(3, 'abc') + put(100, 'de'));
    expect(pipelined.answer.match(/HTTP\/1\.1 405 /g)).toHaveLength(2);
    expect(pipelined.ms).toBeLessThan(5000);
    // An upstream that stops reading the forwarded body holds it (not the client's silence) only
    // until pullcache has answered (503 after the upstream's own timeout): then it is cut too.
    const held = await stallAfter(
      [
        'PATCH /v2/stuck.test/team/app/blobs/uploads/x HTTP/1.1',
        'Host: 127.0.0.1',
        `Content-Length: ${64 << 20}`,
        '',
        'x'.repeat(16 << 20),
      ].join('\r\n'),
    );
    expect(held.answer).toMatch(/^HTTP\/1\.1 503 /);
    expect(held.ms).toBeLessThan(8000);
    // And the server goes on serving.
    expect((await fetch(`${pc.url}/v2/`)).status).toBe(200);
  });

  test('a body that came whole is no stall, read or not: a slow download after it is not cut', async () => {
    const blob = await pushRandomBlob(registry, 'team/app', 8 << 20);
    await fetch(`${pc.url}/v2/team/app/blobs/${blob.digest}`).then((r) => r.arrayBuffer());
    const body = await new Promise<Buffer>((resolve, reject) => {
      const req = request(`${pc.url}/v2/team/app/blobs/${blob.digest}`, {
        method: 'GET',
        headers: { 'content-length': '1' },
      });
      req.on('response', (res) => {
        const chunks: Buffer[] = [];
        res.once('data', (chunk: Buffer) => {
          chunks.push(chunk);
          res.pause();
          setTimeout(() => {
            res.on('data', (c: Buffer) => chunks.push(c));
            res.resume();
          }, 3000);
        });
        res.on('end', () => resolve(Buffer.concat(chunks)));
        res.on('error', reject);
      });
      req.on('error', reject);
      req.end('x');
    });
    expect(sha256(body)).toBe(blob.digest);
  });
});
