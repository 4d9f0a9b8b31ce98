/**
 * The blob path's own HTTP/1.1 GETs (src/upstream/raw-get.ts, raw-connection.ts, raw-body.ts):
 * framing, kept connections, timeouts, reused receive buffers and TLS. The registry tests
 * (client.test.ts and the proxy tests) take every blob through it too; these are the faults a
 * registry does not make.
 */
import { execFile } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer as createHttpServer } from 'node:http';
import { createServer as createHttpsServer } from 'node:https';
import { createServer as createNetServer, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterEach, describe, expect, test } from 'vitest';
import type { RawBody } from '../../src/upstream/raw-body.js';
import { RawAgent } from '../../src/upstream/raw-get.js';
import { ReceiveSlabs } from '../../src/upstream/receive-slabs.js';
import { fakeServer } from '../helpers/fake-server.js';
import { TestCa } from '../helpers/tls.js';

const TIMEOUTS = { connect: 2000, headers: 2000, bodyIdle: 2000 };

/** The body whole, and how it ended. */
async function read(
  body: RawBody,
  options: { slabs?: ReceiveSlabs; stallMs?: number } = {},
): Promise<{
  bytes: Buffer;
  end: { kind: string; error?: unknown };
  views: Buffer[];
  /** How many distinct buffers the views were of. */
  memories: number;
}> {
  const views: Buffer[] = [];
  const memories = new Set<ArrayBufferLike>();
  const drain = body.drain();
  for (;;) {
    const next = await drain.next();
    if (next.done)
      return { bytes: Buffer.concat(views), end: next.value, views, memories: memories.size };
    memories.add(next.value.buffer);
    if (views.length === 0 && options.stallMs)
      await new Promise((r) => setTimeout(r, options.stallMs));
    views.push(Buffer.from(next.value));
    options.slabs?.release(next.value);
  }
}

async function netServer(
  onSocket: (socket: Socket) => void,
): Promise<{ url: string; server: Server }> {
  const server = createNetServer(onSocket);
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return { url: `http://127.0.0.1:${(server.address() as { port: number }).port}`, server };
}

const cleanup: (() => unknown)[] = [];
afterEach(async () => {
  for (const fn of cleanup.splice(0).reverse()) await fn();
});

function started<T extends { close(): unknown }>(thing: T): T {
  cleanup.push(() => thing.close());
  return thing;
}

describe('framing', () => {
  test('a chunked body comes whole, each piece a view of the slabs, not a copy', async () => {
    const body = randomBytes(3 * 1024 * 1024 + 17);
    const server = started(
      await fakeServer((_req, res) => {
        res.writeHead(200); // no length: chunked
        for (let at = 0; at < body.length; at += 100_000)
          res.write(body.subarray(at, at + 100_000));
        res.end();
      }),
    );
    const agent = started(new RawAgent(TIMEOUTS));
    const slabs = new ReceiveSlabs();
    const res = await agent.get(new URL(`${server.url}/blob`), { headers: {}, slabs });
    expect(res.statusCode).toBe(200);
    expect(res.headers['transfer-encoding']).toBe('chunked');
    const drain = res.body.drain();
    const received: Buffer[] = [];
    // Whether each piece is a view of a slab: only the first read of a connection, asked for
    // before the request existed, is copied out of a shared buffer.
    const lent: boolean[] = [];
    for (let next = await drain.next(); !next.done; next = await drain.next()) {
      // A view of a 1 MiB slab, or a copy of its own size.
      lent.push(next.value.buffer.byteLength === 1024 * 1024);
      received.push(Buffer.from(next.value));
      slabs.release(next.value);
    }
    expect(Buffer.concat(received).equals(body)).toBe(true);
    const firstLent = lent.indexOf(true);
    expect(firstLent).toBeGreaterThanOrEqual(0);
    expect(firstLent).toBeLessThan(8);
    expect(lent.slice(firstLent).every(Boolean)).toBe(true);
  });

  test('a body without length or chunks runs until the server closes', async () => {
    const body = randomBytes(500_000);
    const { url, server } = await netServer((socket) =>
      socket.once('data', () =>
        socket.end(
          Buffer.concat([Buffer.from('HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n'), body]),
        ),
      ),
    );
    cleanup.push(() => server.close());
    const agent = started(new RawAgent(TIMEOUTS));
    const res = await agent.get(new URL(`${url}/blob`), { headers: {} });
    const { bytes, end } = await read(res.body);
    expect(end.kind).toBe('end');
    expect(bytes.equals(body)).toBe(true);
  });

  test('a body cut short of its Content-Length is an error, not an end', async () => {
    const { url, server } = await netServer((socket) =>
      socket.once('data', () =>
        socket.end(
          Buffer.concat([
            Buffer.from('HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n'),
            randomBytes(600),
          ]),
        ),
      ),
    );
    cleanup.push(() => server.close());
    const agent = started(new RawAgent(TIMEOUTS));
    const res = await agent.get(new URL(`${url}/blob`), { headers: {} });
    const { bytes, end } = await read(res.body);
    expect(bytes.length).toBe(600);
    expect(end.kind).toBe('error');
    expect((end.error as { code?: string }).code).toBe('UND_ERR_SOCKET');
  });

  test('a 1xx answer is skipped for the response that follows it', async () => {
    const { url, server } = await netServer((socket) =>
      socket.once('data', () =>
        socket.write(
          'HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n' +
            'HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello',
        ),
      ),
    );
    cleanup.push(() => server.close());
    const agent = started(new RawAgent(TIMEOUTS));
    const res = await agent.get(new URL(`${url}/blob`), { headers: {} });
    expect(res.statusCode).toBe(200);
    const { bytes, end } = await read(res.body);
    expect(end.kind).toBe('end');
    expect(bytes.toString()).toBe('hello');
  });

  test('a malformed response and a header value with a line break are refused', async () => {
    const { url, server } = await netServer((socket) =>
      socket.once('data', () => socket.end('SPDY/9 what\r\n\r\n')),
    );
    cleanup.push(() => server.close());
    const agent = started(new RawAgent(TIMEOUTS));
    await expect(agent.get(new URL(`${url}/blob`), { headers: {} })).rejects.toMatchObject({
      code: 'HPE_INVALID',
    });
    await expect(
      agent.get(new URL(`${url}/blob`), { headers: { authorization: 'Bearer x\r\nhost: evil' } }),
    ).rejects.toThrow(/line break/);
  });
});

describe('connections', () => {
  test('a kept connection carries the next GET, and one the server closed is asked again on a new one', async () => {
    const body = randomBytes(200_000);
    let connections = 0;
    const server = createHttpServer((_req, res) => {
      res.writeHead(200, { 'content-length': body.length });
      res.end(body);
    });
    server.on('connection', () => connections++);
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    cleanup.push(() => {
      server.closeAllConnections();
      return new Promise((resolve) => server.close(resolve));
    });
    const url = new URL(`http://127.0.0.1:${(server.address() as { port: number }).port}/blob`);
    const agent = started(new RawAgent(TIMEOUTS));
    for (let i = 0; i < 3; i++) {
      const res = await agent.get(url, { headers: {} });
      expect((await read(res.body)).bytes.equals(body)).toBe(true);
    }
    expect(connections).toBe(1);
    // The server closes the kept connection: the next GET goes on a new one, and succeeds.
    server.closeIdleConnections();
    await new Promise((r) => setTimeout(r, 50));
    const res = await agent.get(url, { headers: {} });
    expect((await read(res.body)).bytes.equals(body)).toBe(true);
    expect(connections).toBe(2);
  });

  test('the slabs are read into again once the consumer releases its views', async () => {
    const body = randomBytes(32 * 1024 * 1024);
    const server = started(
      await fakeServer((_req, res) => {
        res.writeHead(200, { 'content-length': body.length });
        res.end(body);
      }),
    );
    const agent = started(new RawAgent(TIMEOUTS));
    const slabs = new ReceiveSlabs();
    const res = await agent.get(new URL(`${server.url}/blob`), { headers: {}, slabs });
    const { bytes, memories } = await read(res.body, { slabs });
    expect(createHash('sha256').update(bytes).digest('hex')).toBe(
      createHash('sha256').update(body).digest('hex'),
    );
    // 32 MiB through a few 1 MiB slabs (without release: 32 or more, see client.test.ts), and
    // perhaps one buffer of a read copied out.
    expect(slabs.taken).toBeGreaterThanOrEqual(32);
    expect(memories).toBeLessThanOrEqual(5);
  });
});

test('every slab goes back: a skipped 401 on a kept connection, then a body read to its end', async () => {
  const body = randomBytes(3 * 1024 * 1024);
  const server = started(
    await fakeServer((req, res) => {
      if (!req.headers.authorization) {
        // A body in two reads: the second goes into a slab (a response's first read goes into
        // a scratch buffer, asked for before the request).
        const refusal = Buffer.alloc(40_000, 'x');
        res.writeHead(401, { 'www-authenticate': 'Bearer realm="x"', 'content-length': 40_000 });
        res.write(refusal.subarray(0, 1000));
        setTimeout(() => res.end(refusal.subarray(1000)), 20);
        return;
      }
      res.writeHead(200, { 'content-length': body.length });
      res.end(body);
    }),
  );
  const agent = started(new RawAgent(TIMEOUTS));
  const slabs = new ReceiveSlabs();
  const url = new URL(`${server.url}/blob`);
  const refused = await agent.get(url, { headers: {}, slabs });
  expect(refused.statusCode).toBe(401);
  await new Promise((r) => setTimeout(r, 100)); // skipped only once it has ended
  refused.body.resume();
  const res = await agent.get(url, { headers: { authorization: 'Bearer t' }, slabs });
  expect((await read(res.body, { slabs })).bytes.equals(body)).toBe(true);
  expect(slabs.outstanding).toBe(0);
});

describe('timeouts and aborts', () => {
  test('a handshake that never completes is a connect timeout; an abort during it, its reason', async () => {
    const { url, server } = await netServer((socket) => socket.resume()); // takes, never answers
    cleanup.push(() => server.close());
    const agent = started(new RawAgent({ ...TIMEOUTS, connect: 300 }));
    const https = new URL(`${url.replace('http:', 'https:')}/blob`);
    await expect(agent.get(https, { headers: {} })).rejects.toMatchObject({
      code: 'UND_ERR_CONNECT_TIMEOUT',
    });
    const abort = new AbortController();
    setTimeout(() => abort.abort(new Error('client went away')), 50);
    await expect(agent.get(https, { headers: {}, signal: abort.signal })).rejects.toThrow(
      'client went away',
    );
  });

  test('headers that never come are a headers timeout', async () => {
    const { url, server } = await netServer(() => {});
    cleanup.push(() => server.close());
    const agent = started(new RawAgent({ ...TIMEOUTS, headers: 300 }));
    await expect(agent.get(new URL(`${url}/blob`), { headers: {} })).rejects.toMatchObject({
      code: 'UND_ERR_HEADERS_TIMEOUT',
    });
  });

  test('a body that stops is a body timeout; a consumer that stops is not', async () => {
    const big = randomBytes(16 * 1024 * 1024);
    const server = started(
      await fakeServer((req, res) => {
        res.writeHead(200, { 'content-length': big.length });
        if (req.url === '/stalls')
          res.write(big.subarray(0, 1000)); // then nothing
        else res.end(big);
      }),
    );
    const agent = started(new RawAgent({ ...TIMEOUTS, bodyIdle: 300 }));
    const stalled = await agent.get(new URL(`${server.url}/stalls`), { headers: {} });
    const cut = await read(stalled.body);
    expect(cut.end.kind).toBe('error');
    expect((cut.end.error as { code?: string }).code).toBe('UND_ERR_BODY_TIMEOUT');
    // Our consumer busy for 3 idle timeouts: the socket is paused, and no timeout is ours.
    const slow = await agent.get(new URL(`${server.url}/whole`), { headers: {} });
    const whole = await read(slow.body, { stallMs: 1000 });
    expect(whole.end.kind).toBe('end');
    expect(whole.bytes.equals(big)).toBe(true);
  });

  test('the last byte may be waited for longer than the rest (lastByteIdle), and only the last', async () => {
    const blob = randomBytes(4 * 1024 * 1024);
    const server = started(
      await fakeServer((req, res) => {
        res.writeHead(200, { 'content-length': blob.length });
        // As a peer does: all but the last byte, then the last once its blob is stored.
        if (req.url === '/last-late') {
          res.write(blob.subarray(0, blob.length - 1));
          setTimeout(() => res.end(blob.subarray(blob.length - 1)), 900);
        } else res.write(blob.subarray(0, blob.length - 2)); // then nothing: two bytes short
      }),
    );
    const agent = started(new RawAgent({ ...TIMEOUTS, bodyIdle: 300, lastByteIdle: 3000 }));
    const late = await read(
      (await agent.get(new URL(`${server.url}/last-late`), { headers: {} })).body,
    );
    expect(late.end.kind).toBe('end');
    expect(late.bytes.equals(blob)).toBe(true);
    const asked = performance.now();
    const short = await read(
      (await agent.get(new URL(`${server.url}/two-short`), { headers: {} })).body,
    );
    expect((short.end.error as { code?: string }).code).toBe('UND_ERR_BODY_TIMEOUT');
    expect(performance.now() - asked).toBeLessThan(2000);
    // Without it, the last byte gets bodyIdle like any other.
    const plain = started(new RawAgent({ ...TIMEOUTS, bodyIdle: 300 }));
    const cut = await read(
      (await plain.get(new URL(`${server.url}/last-late`), { headers: {} })).body,
    );
    expect((cut.end.error as { code?: string }).code).toBe('UND_ERR_BODY_TIMEOUT');
  });

  test('an abort before the headers rejects with its reason and closes the connection', async () => {
    let closed!: () => void;
    const gone = new Promise<void>((resolve) => (closed = resolve));
    const { url, server } = await netServer((socket) => socket.resume().on('close', closed));
    cleanup.push(() => server.close());
    const agent = started(new RawAgent(TIMEOUTS));
    const abort = new AbortController();
    const asked = agent.get(new URL(`${url}/blob`), { headers: {}, signal: abort.signal });
    setTimeout(() => abort.abort(new Error('client went away')), 100);
    await expect(asked).rejects.toThrow('client went away');
    await gone;
  });
});

describe('TLS', () => {
  test('a blob over HTTPS is read into the slabs in views of many records, verified against the system trust (NODE_EXTRA_CA_CERTS), and an unknown CA is refused', async () => {
    const ca = TestCa.create();
    cleanup.push(() => ca.remove());
    const cert = ca.issue();
    const body = randomBytes(5 * 1024 * 1024);
    const server = createHttpsServer(
      { cert: readFileSync(cert.certPath), key: readFileSync(cert.keyPath) },
      (_req, res) => {
        res.writeHead(200, { 'content-length': body.length });
        res.end(body);
      },
    );
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    cleanup.push(() => new Promise((resolve) => server.close(resolve)));
    const port = (server.address() as { port: number }).port;
    // A process of its own: node reads NODE_EXTRA_CA_CERTS only when it starts.
    const dir = mkdtempSync(join(tmpdir(), 'pullcache-raw-tls-'));
    cleanup.push(() => rmSync(dir, { recursive: true, force: true }));
    const script = join(dir, 'get.mts');
    writeFileSync(
      script,
      `import { createHash } from 'node:crypto';
import { RawAgent } from ${JSON.stringify(fileURLToPath(new URL('../../src/upstream/raw-get.ts', import.meta.url)))};
import { ReceiveSlabs } from ${JSON.stringify(fileURLToPath(new URL('../../src/upstream/receive-slabs.ts', import.meta.url)))};
const agent = new RawAgent({ connect: 5000, headers: 5000, bodyIdle: 5000 });
const slabs = new ReceiveSlabs();
try {
  const res = await agent.get(new URL(process.argv[2]), { headers: {}, slabs });
  const hash = createHash('sha256');
  const drain = res.body.drain();
  const memories = new Set();
  let next;
  let views = 0;
  while (!(next = await drain.next()).done) {
    hash.update(next.value);
    memories.add(next.value.buffer);
    slabs.release(next.value);
    views++;
  }
  console.log(res.statusCode, next.value.kind, hash.digest('hex'), memories.size, views);
} catch (err) {
  console.log('error', err.code);
}
agent.close();
`,
    );
    const run = (env: NodeJS.ProcessEnv) =>
      new Promise<string>((resolve, reject) =>
        execFile(
          process.execPath,
          ['--import', 'tsx', script, `https://localhost:${port}/blob`],
          {
            env: { ...process.env, ...env },
            cwd: fileURLToPath(new URL('../..', import.meta.url)),
          },
          (err, stdout, stderr) => (err ? reject(new Error(stderr)) : resolve(stdout.trim())),
        ),
      );
    const trusted = (await run({ NODE_EXTRA_CA_CERTS: ca.certPath })).split(' ');
    expect(trusted.slice(0, 3)).toEqual([
      '200',
      'end',
      createHash('sha256').update(body).digest('hex'),
    ]);
    expect(Number(trusted[3])).toBeLessThanOrEqual(5); // the slabs read into again, over TLS too
    // TLS hands the body out a record (16 KiB) at a time: 320 of them here. The pieces of one
    // turn of the event loop reach the consumer as one view.
    expect(Number(trusted[4])).toBeLessThan(body.length / (16 * 1024) / 4);
    expect(await run({ NODE_EXTRA_CA_CERTS: '' })).toMatch(
      /^error (UNABLE_TO_VERIFY_LEAF_SIGNATURE|SELF_SIGNED_CERT_IN_CHAIN|UNABLE_TO_GET_ISSUER_CERT_LOCALLY)$/,
    );
  });
});
