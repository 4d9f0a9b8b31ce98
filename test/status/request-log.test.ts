/**
 * The request log and the refused requests against the real test registry: no credential a
 * client put in a URL reaches them, and an answer its client cut says so, counting only the body
 * bytes that went out (in the log line and in the served-bytes metrics alike).
 */
import { createServer, request, type Server } from 'node:http';
import type { Socket } from 'node:net';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { redactedUrl } from '../../src/log/url.js';
import type { Status } from '../../src/status/status.js';
import { makeImage, pushImage, type Image } from '../helpers/images.js';
import { waitFor } from '../helpers/net.js';
import { scrape, sum } from '../helpers/prometheus.js';
import { capturedLog, startPullcache, type TestPullcache } from '../helpers/pullcache.js';
import { TestRegistry } from '../helpers/registry.js';

/**
 * A forwarder in front of the registry that answers a blob GET with the registry's status and
 * headers, then holds its body until `release()`: a fetch whose answer has started and sent no
 * byte of the blob yet (a slow upstream, as a real one is at times).
 */
class HeldBlobs {
  url = '';
  private readonly held: (() => void)[] = [];
  private readonly sockets = new Set<Socket>();
  private constructor(private readonly server: Server) {}

  static async start(target: string): Promise<HeldBlobs> {
    const to = new URL(target);
    const server = createServer((req, res) => {
      const upstream = request(
        {
          host: to.hostname,
          port: to.port,
          method: req.method,
          path: req.url,
          headers: req.headers,
        },
        (answer) => {
          res.writeHead(answer.statusCode ?? 502, answer.headers);
          res.flushHeaders();
          if (req.method === 'GET' && /\/blobs\/sha256:/.test(req.url ?? '')) {
            answer.pause();
            forwarder.held.push(() => answer.pipe(res));
          } else answer.pipe(res);
        },
      );
      upstream.on('error', () => res.destroy());
      req.pipe(upstream);
    });
    const forwarder = new HeldBlobs(server);
    server.on('connection', (s) => {
      forwarder.sockets.add(s);
      s.on('close', () => forwarder.sockets.delete(s));
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    const address = server.address();
    forwarder.url = `http://127.0.0.1:${typeof address === 'object' && address ? address.port : 0}`;
    return forwarder;
  }

  release(): void {
    for (const go of this.held.splice(0)) go();
  }

  async close(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }
}

describe('the request log', () => {
  let registry: TestRegistry;
  let held: HeldBlobs;
  let pc: TestPullcache;
  let lines: Record<string, unknown>[];
  let image: Image;

  beforeAll(async () => {
    registry = await TestRegistry.start();
    image = makeImage('org/app', 'v1', 'oci', [200_000]);
    await pushImage(registry, image);
    held = await HeldBlobs.start(registry.url);
    const captured = capturedLog('info');
    lines = captured.lines;
    pc = await startPullcache(
      { upstreams: { 'docker.io': { url: held.url, tagTTL: '1h' } } },
      undefined,
      { log: captured.log },
    );
  });
  afterAll(async () => {
    await pc?.stop();
    await held?.close();
    await registry?.close();
  });

  const lineOf = async (id: string) => {
    await waitFor(async () => lines.some((l) => (l.req as { id?: string })?.id === id), id);
    return lines.find((l) => (l.req as { id?: string })?.id === id)!;
  };

  test('a credential in a query is in no log line and no refused request; the rest of the URL is', async () => {
    const secrets = ['tok-S1', 'sig-S2', 'pw-S3', 'tok-S4'];
    const query = `?access_token=${secrets[0]}&X-Amz-Signature=${secrets[1]}&n=5&password=${secrets[2]}`;
    const ok = await fetch(`${pc.url}/v2/org/app/manifests/v1${query}`, {
      headers: { accept: image.mediaType, 'x-request-id': 'with-secrets' },
    });
    expect(ok.status).toBe(200);
    await ok.arrayBuffer();
    expect((await lineOf('with-secrets')).req).toMatchObject({
      url: '/v2/org/app/manifests/v1?access_token=[redacted]&X-Amz-Signature=[redacted]&n=5&password=[redacted]',
    });
    // Through express (a refusal): its line, and the refused request the status page shows.
    const refused = await fetch(`${pc.url}/v2/org/app/manifests/v1?token=${secrets[3]}`, {
      method: 'DELETE',
      headers: { 'x-request-id': 'refused-with-secret' },
    });
    expect(refused.status).toBe(405);
    expect((await lineOf('refused-with-secret')).req).toMatchObject({
      url: '/v2/org/app/manifests/v1?token=[redacted]',
    });
    const status = (await (await fetch(`${pc.url}/_pullcache/v1/status`)).json()) as Status;
    expect(status.recent.refused[0]).toMatchObject({
      method: 'DELETE',
      path: '/v2/org/app/manifests/v1?token=[redacted]',
    });
    const everything = JSON.stringify([lines, status]);
    for (const secret of secrets)
      expect({ secret, shown: everything.includes(secret) }).toEqual({
        secret,
        shown: false,
      });
  });

  test('an answer its client cut says so, and counts the body bytes sent, not its headers', async () => {
    const layer = image.blobs[1]!;
    const served = async () =>
      sum((await scrape(pc.url)).samples, 'pullcache_served_bytes_total', {
        kind: 'blob',
        cache: 'miss',
      });
    const before = await served();
    const client = new AbortController();
    const res = await fetch(`${pc.url}/v2/org/app/blobs/${layer.digest}`, {
      headers: { 'x-request-id': 'cut-by-client' },
      signal: client.signal,
    });
    // The headers came, no byte of the body can have: the upstream holds it.
    expect(res.status).toBe(200);
    client.abort();
    const line = await lineOf('cut-by-client');
    expect(line).toMatchObject({
      // A warning: a client that leaves is nothing for the operator to mend.
      level: 40,
      msg: 'request failed',
      res: { statusCode: 200 },
      cache: 'miss',
      bytes: 0,
      err: expect.stringMatching(/client closed the connection/),
    });
    expect(await served()).toBe(before);
    held.release();
  });
});

test('redactedUrl blanks the values of credential parameters only, however their names are spelt', () => {
  expect(redactedUrl('/v2/a/tags/list?n=10&last=b')).toBe('/v2/a/tags/list?n=10&last=b');
  expect(redactedUrl('/v2/a/blobs/x')).toBe('/v2/a/blobs/x');
  expect(redactedUrl(undefined)).toBe(undefined);
  expect(redactedUrl('/x?acc%65ss_token=s&ns=docker.io&flag&Api-Key=k&code=c')).toBe(
    '/x?acc%65ss_token=[redacted]&ns=docker.io&flag&Api-Key=[redacted]&code=[redacted]',
  );
  expect(redactedUrl('/x?refresh_token=a=b&scope=repository:a:pull')).toBe(
    '/x?refresh_token=[redacted]&scope=repository:a:pull',
  );
});
