/**
 * A blob asked for in several ranges at once (containers/image's partial pull of a zstd:chunked
 * layer): one `multipart/byteranges` part per range, in the order asked, compared with what the
 * real upstream (distribution 2.8, Go's http.ServeContent) answers to the same header; from
 * storage, and from a fetch under way, which then keeps the whole blob.
 */
import { request } from 'node:http';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { ociError, rawRequest, type RawResponse } from '../helpers/http.js';
import { pushRandomBlob } from '../helpers/images.js';
import { waitFor } from '../helpers/net.js';
import { capturedLog, startPullcache, type TestPullcache } from '../helpers/pullcache.js';
import { Recorder } from '../helpers/recorder.js';
import { TestRegistry } from '../helpers/registry.js';

interface Parsed {
  status: number;
  /** Each part's Content-Range and bytes; one entry for a single-range or whole answer. */
  parts: { range: string | undefined; bytes: Buffer }[];
}

/** An answer's parts, checked for the framing a Go client (mime/multipart) reads. */
function parse(res: RawResponse): Parsed {
  const type = String(res.headers['content-type'] ?? '');
  expect(Number(res.headers['content-length'])).toBe(res.body.length);
  const boundary = /^multipart\/byteranges; boundary=([^;\s]+)$/.exec(type)?.[1];
  if (!boundary) {
    const range = res.headers['content-range'] as string | undefined;
    return { status: res.status, parts: [{ range, bytes: res.body }] };
  }
  const parts: Parsed['parts'] = [];
  const body = res.body;
  const delimiter = Buffer.from(`--${boundary}`);
  let at = body.indexOf(delimiter);
  expect(at).toBe(0);
  for (;;) {
    at += delimiter.length;
    if (body.subarray(at, at + 2).toString() === '--') break;
    const headEnd = body.indexOf('\r\n\r\n', at);
    const head = body.subarray(at + 2, headEnd).toString();
    const range = /^Content-Range: (.*)$/im.exec(head)?.[1];
    const length = /^bytes (\d+)-(\d+)\//.exec(range ?? '');
    const size = Number(length![2]) - Number(length![1]) + 1;
    const start = headEnd + 4;
    parts.push({ range, bytes: body.subarray(start, start + size) });
    at = start + size;
    expect(body.subarray(at, at + 2).toString()).toBe('\r\n');
    at += 2;
    expect(body.subarray(at, at + delimiter.length).equals(delimiter)).toBe(true);
  }
  expect(body.subarray(at + 2).toString()).toBe('\r\n');
  return { status: res.status, parts };
}

describe('several ranges of a blob at once', () => {
  let registry: TestRegistry;
  let recorder: Recorder;
  let pc: TestPullcache;
  const logged = capturedLog('info');

  beforeAll(async () => {
    registry = await TestRegistry.start();
    recorder = await Recorder.start(registry.url);
    pc = await startPullcache({ upstreams: { 'docker.io': { url: recorder.url } } }, undefined, {
      log: logged.log,
    });
  });
  afterAll(async () => {
    await pc?.stop();
    await recorder?.close();
    await registry?.close();
  });

  const blobGets = () => recorder.count('GET', /\/blobs\/sha256:/);
  const path = (digest: string) => `/v2/org/app/blobs/${digest}`;
  /** The same request of the upstream itself, and of pullcache, parsed. */
  const both = async (digest: string, range: string) => {
    const token = registry.tokens.pushToken('org/app');
    const upstream = await rawRequest(registry.url, 'GET', path(digest), {
      range,
      authorization: `Bearer ${token}`,
    });
    const ours = await rawRequest(pc.url, 'GET', path(digest), { range });
    return { upstream: parse(upstream), ours: parse(ours), raw: ours };
  };

  test('from storage: a part per range in the order asked, as the upstream answers, 1024 of them too', async () => {
    const blob = await pushRandomBlob(registry, 'org/app', 3 << 20);
    const whole = await rawRequest(pc.url, 'GET', path(blob.digest));
    expect(whole.body.equals(blob.bytes)).toBe(true);
    recorder.reset();
    const size = blob.bytes.length;
    const many = Array.from({ length: 1024 }, (_, i) => `${i * 3000}-${i * 3000 + 999}`);
    for (const range of [
      'bytes=0-99,1000-1999,-50',
      // Out of order and a suffix: a stored file seeks from part to part.
      `bytes=2000000-2099999,0-9,${size - 10}-`,
      // Ends past the blob are clipped, ranges starting past it dropped.
      `bytes=5-9,${size - 5}-${size + 100},${size + 1}-`,
      `bytes=${many.join(',')}`,
    ]) {
      const { upstream, ours, raw } = await both(blob.digest, range);
      expect(ours.status).toBe(206);
      expect(ours.parts.length).toBeGreaterThan(1);
      expect(ours).toEqual(upstream);
      expect(raw.headers['docker-content-digest']).toBe(blob.digest);
      for (const part of ours.parts) {
        const [, first, last] = /^bytes (\d+)-(\d+)\/(\d+)$/.exec(part.range!)!;
        expect(part.bytes.equals(blob.bytes.subarray(Number(first), Number(last) + 1))).toBe(true);
      }
    }
    expect(blobGets()).toBe(0);
  });

  test('one range left is a single-part answer, none is 416, overlaps past the size the whole blob', async () => {
    const blob = await pushRandomBlob(registry, 'org/app', 100_000);
    await rawRequest(pc.url, 'GET', path(blob.digest));
    const one = await both(blob.digest, 'bytes=10-19,200000-');
    expect(one.ours).toEqual(one.upstream);
    expect(one.ours).toEqual({
      status: 206,
      parts: [{ range: 'bytes 10-19/100000', bytes: blob.bytes.subarray(10, 20) }],
    });
    const overlapping = await both(blob.digest, 'bytes=0-,0-');
    expect(overlapping.ours).toEqual(overlapping.upstream);
    expect(overlapping.ours.status).toBe(200);
    expect(overlapping.ours.parts[0]!.bytes.equals(blob.bytes)).toBe(true);
    const none = await rawRequest(pc.url, 'GET', path(blob.digest), {
      range: 'bytes=100000-,200000-',
    });
    expect({ status: none.status, code: await ociError(none) }).toEqual({
      status: 416,
      code: 'RANGE_INVALID',
    });
    expect(none.headers['content-range']).toBe('bytes */100000');
  });

  test('a cold blob: the parts follow its one fetch, which keeps it whole', async () => {
    const blob = await pushRandomBlob(registry, 'org/app', 2 << 20);
    recorder.reset();
    const range = 'bytes=10-19,1048576-1049599,-7';
    const heads = () => recorder.count('HEAD', /\/blobs\/sha256:/);
    const cold = parse(await rawRequest(pc.url, 'GET', path(blob.digest), { range }));
    expect(cold.status).toBe(206);
    expect(cold.parts.map((p) => p.range)).toEqual([
      `bytes 10-19/${2 << 20}`,
      `bytes 1048576-1049599/${2 << 20}`,
      `bytes ${(2 << 20) - 7}-${(2 << 20) - 1}/${2 << 20}`,
    ]);
    expect(cold.parts[0]!.bytes.equals(blob.bytes.subarray(10, 20))).toBe(true);
    expect(cold.parts[1]!.bytes.equals(blob.bytes.subarray(1048576, 1049600))).toBe(true);
    expect(cold.parts[2]!.bytes.equals(blob.bytes.subarray(-7))).toBe(true);
    // Kept whole: the next answers come from storage.
    const warm = await both(blob.digest, range);
    expect(warm.ours).toEqual(warm.upstream);
    expect(warm.ours).toEqual(cold);
    expect(blobGets()).toBe(1);
    expect(heads()).toBe(1); // the size first (a suffix: the whole blob is opened), one GET
    expect(recorder.blobBytes()).toBe(2 << 20);

    // Out of order, a fetch under way cannot seek back: the whole blob, still from one fetch.
    const other = await pushRandomBlob(registry, 'org/app', 1 << 20);
    recorder.reset();
    const unordered = await rawRequest(pc.url, 'GET', path(other.digest), {
      range: 'bytes=500000-500009,0-9',
    });
    expect(unordered.status).toBe(200);
    expect(unordered.body.equals(other.bytes)).toBe(true);
    expect(blobGets()).toBe(1);
    expect(heads()).toBe(1);

    // Listed in order: the covering range is asked for as one range is, its size first (HEAD),
    // so that ranges past the end are refused without a download.
    const third = await pushRandomBlob(registry, 'org/app', 1 << 20);
    recorder.reset();
    const past = await rawRequest(pc.url, 'GET', path(third.digest), {
      range: 'bytes=2000000-2000009,3000000-',
    });
    expect(past.status).toBe(416);
    expect({ gets: blobGets(), heads: heads() }).toEqual({ gets: 0, heads: 1 });
    // Out of order too: the size first, then nothing downloaded.
    const unsatisfiable = await rawRequest(pc.url, 'GET', path(third.digest), {
      range: 'bytes=5000000-5000009,4000000-4000009',
    });
    expect(unsatisfiable.status).toBe(416);
    expect({ gets: blobGets(), heads: heads() }).toEqual({ gets: 0, heads: 2 });
  });

  test('a suffix range of a cold blob, and a HEAD then a range: the upstream is asked the size once', async () => {
    const heads = () => recorder.count('HEAD', /\/blobs\/sha256:/);
    const blob = await pushRandomBlob(registry, 'org/app', 1 << 20);
    recorder.reset();
    // The size first, for the suffix's start (zstd:chunked's footer is read this way), then the
    // fetch: one HEAD, not one for the size and another for the range.
    const tail = await rawRequest(pc.url, 'GET', path(blob.digest), { range: 'bytes=-100' });
    expect(tail.status).toBe(206);
    expect(tail.headers['content-range']).toBe(
      `bytes ${(1 << 20) - 100}-${(1 << 20) - 1}/${1 << 20}`,
    );
    expect(tail.body.equals(blob.bytes.subarray(-100))).toBe(true);
    expect({ gets: blobGets(), heads: heads() }).toEqual({ gets: 1, heads: 1 });

    const other = await pushRandomBlob(registry, 'org/app', 1 << 20);
    recorder.reset();
    expect((await rawRequest(pc.url, 'HEAD', path(other.digest))).status).toBe(200);
    const part = await rawRequest(pc.url, 'GET', path(other.digest), { range: 'bytes=10-19' });
    expect(part.status).toBe(206);
    expect(part.body.equals(other.bytes.subarray(10, 20))).toBe(true);
    expect({ gets: blobGets(), heads: heads() }).toEqual({ gets: 1, heads: 1 });
    // The size told was org/app's: another repository is asked for its own word, and has not it.
    const elsewhere = await rawRequest(pc.url, 'GET', `/v2/org/none/blobs/${other.digest}`, {
      range: 'bytes=-100',
    });
    expect(elsewhere.status).toBe(404);
    expect(heads()).toBe(2);
  });

  test('a client that leaves in the middle of the parts is no warning, and the server serves on', async () => {
    const blob = await pushRandomBlob(registry, 'org/app', 8 << 20);
    await rawRequest(pc.url, 'GET', path(blob.digest));
    const ranges = Array.from({ length: 1000 }, (_, i) => `${i * 8000}-${i * 8000 + 3999}`);
    await new Promise<void>((resolve, reject) => {
      const req = request(`${pc.url}${path(blob.digest)}`, {
        headers: { range: `bytes=${ranges.join(',')}` },
      });
      req.on('response', (res) => {
        expect(res.statusCode).toBe(206);
        res.once('data', () => {
          req.destroy();
          resolve();
        });
      });
      req.on('error', () => {});
      req.on('close', () => resolve());
      req.end();
      setTimeout(() => reject(new Error('no answer')), 5000).unref();
    });
    const lineOf = () =>
      logged.lines.find(
        (l) =>
          String((l.req as { url?: string } | undefined)?.url).includes(blob.digest) &&
          (l.res as { statusCode?: number } | undefined)?.statusCode === 206,
      );
    await waitFor(async () => lineOf() !== undefined, 'the request line');
    const line = lineOf()!;
    expect({ level: line.level, msg: line.msg }).toEqual({ level: 40, msg: 'request failed' });
    expect(logged.lines.filter((l) => l.msg === 'blob stream broke off')).toEqual([]);
    const again = await rawRequest(pc.url, 'GET', path(blob.digest), { range: 'bytes=0-9,20-29' });
    expect(parse(again).parts.map((p) => p.bytes.toString('hex'))).toEqual([
      blob.bytes.subarray(0, 10).toString('hex'),
      blob.bytes.subarray(20, 30).toString('hex'),
    ]);
  });
});
