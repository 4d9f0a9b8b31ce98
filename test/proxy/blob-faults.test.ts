/**
 * Blob fetch faults a real registry cannot be made to produce, from an in-process upstream:
 * a corrupted byte, a slow body that clients leave or join late, a client that stops reading.
 */
import { randomBytes } from 'node:crypto';
import { request } from 'node:http';
import { readdirSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { parseDigest } from '../../src/oci/digest.js';
import { fakeServer, type FakeServer } from '../helpers/fake-server.js';
import { sha256 } from '../helpers/images.js';
import { waitFor } from '../helpers/net.js';
import { startPullcache, type TestPullcache } from '../helpers/pullcache.js';

interface Served {
  bytes: Buffer;
  /** Bytes sent to upstream clients, as served (corrupted if set). */
  corrupt?: boolean;
  /** Delay between 64 KiB chunks, ms. */
  pace?: number;
  /** Bytes sent so far, all requests counted. */
  sent?: number;
}

describe('blob fetch faults', () => {
  const blobs = new Map<string, Served>();
  let upstream: FakeServer;
  let pc: TestPullcache;
  const gets = (digest: string) =>
    upstream.requests.filter((r) => r.method === 'GET' && r.url.endsWith(digest)).length;

  beforeAll(async () => {
    upstream = await fakeServer((req, res) => {
      if (req.url?.includes('/manifests/')) {
        res
          .writeHead(429, {
            'retry-after': '60',
            'ratelimit-limit': '100;w=21600',
            'ratelimit-remaining': '0;w=21600',
          })
          .end();
        return;
      }
      const digest = /\/blobs\/(sha256:[a-f0-9]{64})$/.exec(req.url ?? '')?.[1];
      const served = digest ? blobs.get(digest) : undefined;
      if (!served) {
        res.writeHead(404).end();
        return;
      }
      res.writeHead(200, { 'content-length': served.bytes.length });
      if (req.method === 'HEAD') {
        res.end();
        return;
      }
      const body = Buffer.from(served.bytes);
      if (served.corrupt) body[body.length >> 1] = body[body.length >> 1]! ^ 1;
      let offset = 0;
      const send = () => {
        if (res.destroyed) return;
        const chunk = body.subarray(offset, offset + 65536);
        offset += chunk.length;
        served.sent = (served.sent ?? 0) + chunk.length;
        if (offset >= body.length) res.end(chunk);
        else res.write(chunk, () => setTimeout(send, served.pace ?? 0));
      };
      send();
    });
    pc = await startPullcache({
      upstreams: { 'docker.io': { url: upstream.url } },
      server: { cacheWriteTimeout: '30s' },
    });
  });
  afterAll(async () => {
    await pc?.stop();
    await upstream?.close();
  });

  function add(size: number, options: Omit<Served, 'bytes'> = {}): string {
    const bytes = randomBytes(size);
    const digest = sha256(bytes);
    blobs.set(digest, { bytes, ...options });
    return digest;
  }

  const uploads = () => readdirSync(join(pc.root, 'uploads')).length;

  test('a corrupted byte upstream cuts every client and keeps nothing', async () => {
    const digest = add(1024 * 1024, { corrupt: true, pace: 5 });
    const results = await Promise.allSettled(
      Array.from({ length: 3 }, async () => {
        const res = await fetch(`${pc.url}/v2/x/corrupt/blobs/${digest}`);
        return Buffer.from(await res.arrayBuffer());
      }),
    );
    for (const result of results) expect(result.status).toBe('rejected');
    expect(gets(digest)).toBe(1);
    expect((await pc.runtime.blobs.stat(parseDigest(digest).digest)).found).toBe(false);
    await waitFor(async () => uploads() === 0, 'the upload session to be removed');
  });

  test('several ranges of a blob being fetched: a bad digest cuts the answer, the server lives on; parts go out as they come', async () => {
    // Nothing of the corrupt blob is in the parts asked for: their bytes are right, but the
    // answer's end waits for the digest check, and it fails. (The follower's failure reached
    // the parts' reader as an 'error' event nobody heard, which stopped the process.)
    const corrupt = add(1024 * 1024, { corrupt: true, pace: 5 });
    for (const range of ['bytes=0-9,500000-500009', 'bytes=-10,0-9', 'bytes=0-9,400-,600-']) {
      await expect(
        fetch(`${pc.url}/v2/x/parts/blobs/${corrupt}`, { headers: { range } }).then((r) =>
          r.arrayBuffer(),
        ),
      ).rejects.toThrow();
    }
    expect((await fetch(`${pc.url}/v2/`)).status).toBe(200);
    // The whole blob opened (a range past the end in the middle): the last part's last byte
    // waits for the check too, not only the closing delimiter.
    const corrupt2 = add(1024 * 1024, { corrupt: true, pace: 5 });
    const received: Buffer[] = [];
    const cut = await new Promise<boolean>((resolve) => {
      request(
        `${pc.url}/v2/x/parts/blobs/${corrupt2}`,
        { headers: { range: 'bytes=0-9,2000000-2000009,20-29' } },
        (res) => {
          res.on('data', (chunk: Buffer) => received.push(chunk));
          res.on('end', () => resolve(false));
          res.on('error', () => resolve(true));
        },
      )
        .on('error', () => resolve(true))
        .end();
    });
    expect(cut).toBe(true);
    const got = Buffer.concat(received).toString('latin1');
    const last = blobs.get(corrupt2)!.bytes.subarray(20, 30).toString('latin1');
    expect(got).toContain(last.slice(0, 9));
    expect(got).not.toContain(last);

    // The first part reaches the client while the fetch is still far from the last.
    const size = 4 * 1024 * 1024;
    const paced = add(size, { pace: 20 });
    const served = blobs.get(paced)!;
    const res = await fetch(`${pc.url}/v2/x/parts/blobs/${paced}`, {
      headers: { range: `bytes=0-9,${size - 10}-` },
    });
    expect(res.status).toBe(206);
    const reader = res.body!.getReader();
    const first = Buffer.from((await reader.read()).value!).toString('latin1');
    expect(first).toContain(`Content-Range: bytes 0-9/${size}`);
    expect(served.sent ?? 0).toBeLessThan(size / 2);
    let rest = '';
    for (let chunk = await reader.read(); !chunk.done; chunk = await reader.read())
      rest += Buffer.from(chunk.value).toString('latin1');
    expect(rest).toContain(served.bytes.subarray(size - 10).toString('latin1'));
    expect(gets(paced)).toBe(1);
  });

  test('a blob the upstream does not have leaves no upload session behind', async () => {
    const digest = sha256(randomBytes(64));
    const res = await fetch(`${pc.url}/v2/x/missing/blobs/${digest}`);
    expect(res.status).toBe(404);
    expect(((await res.json()) as { errors: { code: string }[] }).errors[0]!.code).toBe(
      'BLOB_UNKNOWN',
    );
    await waitFor(async () => uploads() === 0, 'the upload session to be removed');
  });

  test('an upload session made slowly costs no second upstream GET and no byte', async () => {
    // The session is made only after the upstream has sent 3 MiB and half a second has passed.
    // Meanwhile the fetch takes the body up to its write queue, then pauses it (src/upstream/
    // raw-body.ts); it used to cut a body it could not queue and ask for the rest again.
    const digest = add(24 * 1024 * 1024);
    const served = blobs.get(digest)!;
    const store = pc.runtime.blobs;
    const create = store.create.bind(store);
    store.create = async (options) => {
      await waitFor(async () => (served.sent ?? 0) >= 3 * 1024 * 1024, 'upstream bytes');
      await new Promise((r) => setTimeout(r, 500));
      return create(options);
    };
    try {
      const res = await fetch(`${pc.url}/v2/x/slow-session/blobs/${digest}`);
      expect(sha256(Buffer.from(await res.arrayBuffer()))).toBe(digest);
    } finally {
      delete (store as Partial<typeof store>).create; // back to the prototype's
    }
    expect(gets(digest)).toBe(1);
  });

  test('a client that leaves does not stop the fetch: the blob is kept for the next one', async () => {
    const digest = add(2 * 1024 * 1024, { pace: 10 });
    const controller = new AbortController();
    const res = await fetch(`${pc.url}/v2/x/leaver/blobs/${digest}`, { signal: controller.signal });
    const reader = res.body!.getReader();
    await reader.read();
    controller.abort();
    await waitFor(
      async () => (await pc.runtime.blobs.stat(parseDigest(digest).digest)).found,
      'the blob to be committed',
      10_000,
    );
    const again = await fetch(`${pc.url}/v2/x/leaver/blobs/${digest}`);
    expect(sha256(Buffer.from(await again.arrayBuffer()))).toBe(digest);
    expect(gets(digest)).toBe(1);
  });

  test('a client that stops reading slows neither the fetch nor the others, and gets every byte later', async () => {
    const size = 6 * 1024 * 1024;
    const digest = add(size, { pace: 1 });
    const slowBytes: Buffer[] = [];
    let slowResumed = false;
    const slow = new Promise<Buffer>((resolve, reject) => {
      request(`${pc.url}/v2/x/slow/blobs/${digest}`, (res) => {
        res.once('data', (chunk: Buffer) => {
          slowBytes.push(chunk);
          res.pause();
          setTimeout(() => {
            slowResumed = true;
            res.on('data', (c: Buffer) => slowBytes.push(c));
            res.resume();
          }, 1500);
        });
        res.on('end', () => resolve(Buffer.concat(slowBytes)));
        res.on('error', reject);
      })
        .on('error', reject)
        .end();
    });
    await new Promise((r) => setTimeout(r, 50));
    const fast = Buffer.from(
      await (await fetch(`${pc.url}/v2/x/slow/blobs/${digest}`)).arrayBuffer(),
    );
    expect(sha256(fast)).toBe(digest);
    expect(slowResumed).toBe(false); // the fast client finished while the slow one was still paused
    const slowBody = await slow;
    expect(sha256(slowBody)).toBe(digest);
    expect(gets(digest)).toBe(1);
  });

  test('a late joiner gets the blob from its first byte', async () => {
    const digest = add(3 * 1024 * 1024, { pace: 5 });
    const first = fetch(`${pc.url}/v2/x/late/blobs/${digest}`).then(async (r) =>
      Buffer.from(await r.arrayBuffer()),
    );
    await new Promise((r) => setTimeout(r, 150));
    const late = await fetch(`${pc.url}/v2/x/late/blobs/${digest}`, {
      headers: { range: 'bytes=0-' },
    });
    expect(late.status).toBe(206);
    const [a, b] = [await first, Buffer.from(await late.arrayBuffer())];
    expect(sha256(a)).toBe(digest);
    expect(sha256(b)).toBe(digest);
    expect(gets(digest)).toBe(1);
  });

  test('an upstream rate limit on an uncached tag is 429 TOOMANYREQUESTS with Retry-After', async () => {
    const res = await fetch(`${pc.url}/v2/x/limited/manifests/latest`);
    expect(res.status).toBe(429);
    expect(res.headers.get('retry-after')).toBe('60');
    expect(((await res.json()) as { errors: { code: string }[] }).errors[0]!.code).toBe(
      'TOOMANYREQUESTS',
    );
    const metrics = await (await fetch(`${pc.url}/metrics`)).text();
    expect(metrics).toContain('pullcache_upstream_ratelimit_remaining{upstream="docker.io"} 0');
  });

  test('a blob the upstream does not have is BLOB_UNKNOWN', async () => {
    const res = await fetch(`${pc.url}/v2/x/none/blobs/${sha256('absent')}`);
    expect(res.status).toBe(404);
    expect(((await res.json()) as { errors: { code: string }[] }).errors[0]!.code).toBe(
      'BLOB_UNKNOWN',
    );
  });
});
