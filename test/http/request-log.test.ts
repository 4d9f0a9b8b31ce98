/**
 * The request line of an answer that did not go as it should: a blob cut off mid-transfer (the
 * client left, or the upstream broke off under it) is "request failed" at error level with the
 * bytes really sent, and a failed answer says why (the error's message), on both paths (the
 * manifest fast path and express).
 */
import { request, type ClientRequest } from 'node:http';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { rawRequest } from '../helpers/http.js';
import { pushRandomBlob } from '../helpers/images.js';
import { freePort, waitFor } from '../helpers/net.js';
import { capturedLog, startPullcache, type TestPullcache } from '../helpers/pullcache.js';
import { TestRegistry } from '../helpers/registry.js';
import { Throttle } from '../helpers/throttle.js';

type Line = Record<string, unknown> & { req?: { url?: string } };
type Blob = Awaited<ReturnType<typeof pushRandomBlob>>;

describe('the request line of failed and cut answers', () => {
  let registry: TestRegistry;
  /** docker.io: a slow upstream, so that a client can leave mid-blob. */
  let slow: Throttle;
  /** cut.test: the same, whose connections are cut mid-blob. */
  let breaking: Throttle;
  let pc: TestPullcache;
  let lines: Line[];
  let left: Blob;
  let broken: Blob;

  beforeAll(async () => {
    registry = await TestRegistry.start();
    left = await pushRandomBlob(registry, 'org/app', 1_000_000);
    broken = await pushRandomBlob(registry, 'org/app', 1_000_000);
    slow = await Throttle.start(registry.url);
    breaking = await Throttle.start(registry.url);
    for (const t of [slow, breaking]) t.bytesPerSecond = 32 * 1024;
    const captured = capturedLog('info');
    lines = captured.lines as Line[];
    pc = await startPullcache(
      {
        upstreams: {
          'docker.io': { url: slow.url },
          // No retries: a cut fetch is not resumed, and a refused one fails at once.
          'cut.test': { url: breaking.url, retries: 0 },
          'down.test': { url: `http://127.0.0.1:${await freePort()}`, retries: 0 },
        },
        routing: { default: 'docker.io' },
      },
      undefined,
      { log: captured.log },
    );
  });
  afterAll(async () => {
    await pc?.stop();
    await slow?.close();
    await breaking?.close();
    await registry?.close();
  });

  /** The request line of `path` (written when its answer closes), the first after `since`. */
  const lineOf = async (path: string, since = 0): Promise<Line> => {
    const find = () =>
      lines
        .slice(since)
        .find((l) => (l.msg === 'request' || l.msg === 'request failed') && l.req?.url === path);
    await waitFor(async () => find() !== undefined, `the request line of ${path}`);
    return find()!;
  };

  /**
   * GETs `path` and calls `then` with the request once the first bytes of the body came; resolves
   * when the answer ends, whole or cut.
   */
  const getUntilFirstBytes = (path: string, then: (req: ClientRequest) => void) =>
    new Promise<{ status: number; received: number }>((resolve) => {
      let received = 0;
      let status = 0;
      const req = request(`${pc.url}${path}`, (res) => {
        status = res.statusCode ?? 0;
        res.once('data', () => then(req));
        res.on('data', (chunk: Buffer) => (received += chunk.length));
        res.on('error', () => {});
        res.on('close', () => resolve({ status, received }));
      });
      req.on('error', () => resolve({ status, received }));
      req.end();
    });

  test('a blob the client leaves mid-transfer is "request failed", with the bytes really sent', async () => {
    const path = `/v2/org/app/blobs/${left.digest}`;
    const got = await getUntilFirstBytes(path, (req) => req.destroy());
    expect(got.status).toBe(200);
    const line = await lineOf(path);
    // The fetch goes on for the cache: let it end soon.
    slow.bytesPerSecond = 64 * 1024 * 1024;
    expect(line).toMatchObject({
      level: 40, // a warning: its client left, nothing for the operator to mend
      msg: 'request failed',
      res: { statusCode: 200 },
      upstream: 'docker.io',
      cache: 'miss',
      err: 'the client closed the connection before the answer ended',
    });
    expect(line.bytes).toBeGreaterThan(0);
    expect(line.bytes).toBeLessThan(left.bytes.length / 2);
  });

  test('a whole answer is "request" at info, an error answered to the client too', async () => {
    // The blob the client left, whole this time (following its fetch, then from storage).
    const whole = `/v2/org/app/blobs/${left.digest}`;
    for (let i = 0; i < 2; i++) {
      const since = lines.length;
      expect((await rawRequest(pc.url, 'GET', whole)).body.equals(left.bytes)).toBe(true);
      expect(await lineOf(whole, since)).toMatchObject({
        level: 30,
        msg: 'request',
        res: { statusCode: 200 },
        bytes: left.bytes.length,
      });
    }
    const since = lines.length;
    const missing = `/v2/org/app/blobs/sha256:${'0'.repeat(64)}`;
    expect((await rawRequest(pc.url, 'GET', missing)).status).toBe(404);
    expect(await lineOf(missing, since)).toMatchObject({
      level: 30,
      msg: 'request',
      res: { statusCode: 404 },
      errorCode: 'BLOB_UNKNOWN',
    });
  });

  test('a blob the upstream breaks off mid-transfer is "request failed", saying why', async () => {
    const path = `/v2/cut.test/org/app/blobs/${broken.digest}`;
    const got = await getUntilFirstBytes(path, () => void breaking.close());
    expect(got.status).toBe(200);
    expect(got.received).toBeLessThan(broken.bytes.length);
    const line = await lineOf(path);
    expect(line).toMatchObject({
      level: 50,
      msg: 'request failed',
      res: { statusCode: 200 },
      upstream: 'cut.test',
      err: expect.stringMatching(/\S/),
    });
    expect(line.bytes).toBeLessThan(broken.bytes.length);
  });

  test('a failed answer says why, on the manifest fast path and through express', async () => {
    for (const path of [
      '/v2/down.test/org/app/manifests/v1',
      '/v2/down.test/org/app/tags/list',
      `/v2/down.test/org/app/blobs/sha256:${'1'.repeat(64)}`,
    ]) {
      const res = await rawRequest(pc.url, 'GET', path);
      expect({ path, status: res.status }).toEqual({ path, status: 503 });
      const sent = (JSON.parse(res.body.toString()) as { errors: { message: string }[] }).errors[0]!
        .message;
      expect(sent).toMatch(/upstream down\.test is unavailable: \S/);
      expect(await lineOf(path)).toMatchObject({
        level: 50,
        msg: 'request failed',
        errorCode: 'UNAVAILABLE',
        err: sent,
      });
    }
  });
});
