/**
 * Requests Node's HTTP parser refuses before any route sees them, a CONNECT, and an Expect the
 * server does not meet: each is answered with an OCI error as JSON (not a bare status line, not a
 * dropped connection), and the server goes on serving. Real parts: raw sockets, a pullcache with
 * no upstream it needs.
 */
import { connect } from 'node:net';
import { afterAll, beforeAll, expect, test } from 'vitest';
import { startPullcache, type TestPullcache } from '../helpers/pullcache.js';

let pc: TestPullcache;

beforeAll(async () => {
  pc = await startPullcache({ upstreams: { 'docker.io': { url: 'http://127.0.0.1:9' } } });
});
afterAll(async () => {
  await pc?.stop();
});

/** Sends `raw` as is and reads the whole answer, until the server closes. */
function exchange(
  raw: string | Buffer,
): Promise<{ status: number; headers: string; body: string }> {
  const url = new URL(pc.url);
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    const socket = connect(Number(url.port), url.hostname, () => socket.write(raw));
    socket.on('data', (chunk: Buffer) => chunks.push(chunk));
    socket.on('error', reject);
    socket.on('close', () => {
      const text = Buffer.concat(chunks).toString('latin1');
      const split = text.indexOf('\r\n\r\n');
      resolve({
        status: Number(text.slice(9, 12)),
        headers: text.slice(0, split).toLowerCase(),
        body: text.slice(split + 4),
      });
    });
  });
}

const request = (line: string, headers: string[] = []) =>
  [line, 'Host: 127.0.0.1', ...headers, '', ''].join('\r\n');

test.each([
  [
    'a raw UTF-8 byte in the path',
    Buffer.from('GET /v2/caf\xc3\xa9/manifests/v1 HTTP/1.1\r\nHost: x\r\n\r\n', 'latin1'),
    400,
  ],
  ['a header line without its colon', request('GET /v2/ HTTP/1.1', ['no colon here']), 400],
  ['an unknown method', request('BREW /v2/ HTTP/1.1'), 400],
  [
    'two different Content-Lengths',
    request('POST /v2/ HTTP/1.1', ['Content-Length: 1', 'Content-Length: 2']),
    400,
  ],
  ['headers over 64 KiB', request('GET /v2/ HTTP/1.1', [`X-Big: ${'a'.repeat(65 * 1024)}`]), 431],
])('%s: an OCI error as JSON, with its 4xx', async (_what, raw, status) => {
  const answer = await exchange(raw);
  expect(answer.status).toBe(status);
  expect(answer.headers).toContain('content-type: application/json');
  expect(answer.headers).toContain('docker-distribution-api-version: registry/2.0');
  expect(JSON.parse(answer.body)).toMatchObject({ errors: [{ code: 'INVALID_REQUEST' }] });
});

test('CONNECT is refused with 405 and what is allowed, nothing dialled', async () => {
  const answer = await exchange(request('CONNECT 127.0.0.1:9 HTTP/1.1'));
  expect(answer.status).toBe(405);
  expect(answer.headers).toContain('allow: get, head');
  expect(JSON.parse(answer.body)).toMatchObject({ errors: [{ code: 'UNSUPPORTED' }] });
});

test('an Expect other than 100-continue is 417 as an OCI error', async () => {
  const answer = await exchange(
    request('GET /v2/ HTTP/1.1', ['Expect: bogus', 'Connection: close']),
  );
  expect(answer.status).toBe(417);
  expect(JSON.parse(answer.body)).toMatchObject({ errors: [{ code: 'INVALID_REQUEST' }] });
});

test('the server goes on serving', async () => {
  expect((await fetch(`${pc.url}/v2/`)).status).toBe(200);
});
