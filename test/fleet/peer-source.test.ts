/**
 * PeeredBlobSource following a replica that holds a digest's lease, against a plain HTTP server
 * standing in for the peer endpoint (the replicas' end-to-end tests are in replicas.test.ts):
 * the body is read into the fetch's slabs, the signature is sent, bad bytes and a refusal are
 * told apart.
 */
import { randomBytes } from 'node:crypto';
import { createServer, type Server } from 'node:http';
import { Readable } from 'node:stream';
import type { AddressInfo } from 'node:net';
import { afterEach, expect, test } from 'vitest';
import { PEER_PATH, PeeredBlobSource, verifyPeerSignature } from '../../src/fleet/peers.js';
import type { PeerLeases } from '../../src/fleet/peer-leases.js';
import { silentLogger, type Logger } from '../../src/log/logger.js';
import { capturedLog } from '../helpers/pullcache.js';
import { digestOf, type Digest } from '../../src/oci/digest.js';
import type { Repository } from '../../src/oci/reference.js';
import { UpstreamNotFoundError } from '../../src/upstream/errors.js';
import type { BlobStream } from '../../src/upstream/types.js';
import { ReceiveSlabs } from '../../src/upstream/receive-slabs.js';
import { Metrics, type PeerCells } from '../../src/metrics.js';

const SECRET = 'peer-secret';
const REPO = 'library/x' as Repository;
let server: Server | undefined;

afterEach(async () => {
  if (server) await new Promise((r) => server!.close(r));
  server = undefined;
});

/** Requests the stand-in peer received. */
let asked = 0;
/** What the last source made counted (`pullcache_peer_*`). */
let cells: PeerCells;

/** A peer endpoint serving `body` for any digest, to requests signed with SECRET. */
async function peer(body: Buffer, status = 200, secret = SECRET): Promise<string> {
  asked = 0;
  server = createServer((req, res) => {
    asked++;
    const digest = req.url!.slice(PEER_PATH.length);
    if (!verifyPeerSignature(secret, digest, req.headers['pullcache-peer'] as string)) {
      res.writeHead(403).end();
      return;
    }
    res.writeHead(status, { 'content-length': body.length });
    // In pieces, as a fetch under way sends them.
    let at = 0;
    const next = () => {
      if (at >= body.length) return void res.end();
      res.write(body.subarray(at, (at += 256 * 1024)), next);
    };
    next();
  });
  await new Promise<void>((r) => server!.listen(0, '127.0.0.1', r));
  return `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
}

function source(
  holder: string,
  upstreamCalls: string[],
  log: Logger = silentLogger(),
  idleTimeout = 5_000,
): PeeredBlobSource {
  // The peer fetches for the same repository: the upstream is not asked to confirm it.
  const leases = {
    claim: async () => ({ held: false, holder, scope: `upstream/${REPO}` }),
  } as unknown as PeerLeases;
  const upstream = {
    name: 'upstream',
    getBlob: async (_repo: Repository, digest: Digest): Promise<BlobStream> => {
      upstreamCalls.push(digest);
      throw new Error('the upstream was asked');
    },
    headBlob: async () => {
      throw new Error('the upstream was asked to confirm');
    },
  };
  cells = new Metrics().peerCells('upstream');
  return new PeeredBlobSource(upstream, {
    leases,
    secret: SECRET,
    idleTimeout,
    log,
    cells,
  });
}

test("a peer's blob comes in views of the fetch's slabs, read into again once handed back", async () => {
  const blob = randomBytes(6 * 1024 * 1024 + 123);
  const calls: string[] = [];
  const slabs = new ReceiveSlabs();
  const { size, stream } = await source(await peer(blob), calls).getBlob(REPO, digestOf(blob), {
    slabs,
  });
  expect(size).toBe(blob.length);
  const got: Buffer[] = [];
  let notLent = 0;
  for await (const chunk of stream as AsyncIterable<Buffer>) {
    if (!slabs.lends(chunk)) notLent++;
    got.push(Buffer.from(chunk));
    slabs.release(chunk);
  }
  // Only the body bytes of the read that carried the headers are copied (raw-connection.ts,
  // SCRATCH).
  expect(notLent).toBeLessThanOrEqual(1);
  expect(got.length).toBeGreaterThan(4);
  expect(Buffer.concat(got).equals(blob)).toBe(true);
  // 6 MiB through slabs handed back as they were used: a few slabs, not one buffer per read.
  expect(slabs.taken).toBeLessThan(10);
  expect(slabs.outstanding).toBe(0);
  expect(calls).toEqual([]);
  expect([cells.bytes.value, cells.whole.value, cells.cut.value]).toEqual([blob.length, 1, 0]);
});

test('a peer fetching for another repository is followed only once the upstream confirms this one has the blob', async () => {
  const blob = randomBytes(300 * 1024);
  const peerAt = await peer(blob);
  const heads: string[] = [];
  const peered = (has: boolean) =>
    new PeeredBlobSource(
      {
        name: 'upstream',
        getBlob: () => Promise.reject(new Error('the upstream was asked')),
        headBlob: async (repository: Repository, digest: Digest) => {
          heads.push(repository);
          if (!has) throw new UpstreamNotFoundError('upstream', `blob ${digest}`);
          return { size: blob.length };
        },
      },
      {
        leases: {
          claim: async () => ({ held: false, holder: peerAt, scope: 'upstream/private/app' }),
        } as unknown as PeerLeases,
        secret: SECRET,
        idleTimeout: 5_000,
        log: silentLogger(),
      },
    );
  const repo = 'public/app' as Repository;
  // The upstream says public/app has no such blob: refused, and the peer is not asked.
  await expect(peered(false).getBlob(repo, digestOf(blob))).rejects.toBeInstanceOf(
    UpstreamNotFoundError,
  );
  expect(asked).toBe(0);
  // It says yes: the peer's bytes.
  const { stream } = await peered(true).getBlob(repo, digestOf(blob));
  const got: Buffer[] = [];
  for await (const chunk of stream) got.push(Buffer.from(chunk as Buffer));
  expect(Buffer.concat(got).equals(blob)).toBe(true);
  expect(heads).toEqual(['public/app', 'public/app']);
  expect(asked).toBe(1);
});

test('bytes that do not match the digest fail the stream, and the digest goes to the upstream next', async () => {
  const blob = randomBytes(2 * 1024 * 1024);
  const calls: string[] = [];
  const digest = digestOf(blob);
  const peered = source(await peer(Buffer.concat([blob.subarray(1), Buffer.from('x')])), calls);
  const { stream } = await peered.getBlob(REPO, digest, { slabs: new ReceiveSlabs() });
  await expect(
    (async () => {
      for await (const chunk of stream) void chunk;
    })(),
  ).rejects.toThrow(/digest/i);
  expect([cells.whole.value, cells.cut.value]).toEqual([0, 1]);
  await expect(peered.getBlob(REPO, digest)).rejects.toThrow('the upstream was asked');
  expect(calls).toEqual([digest]);
});

test('a peer that refuses (its fetch over, the blob not kept) is passed over for the upstream', async () => {
  const blob = randomBytes(1024);
  const calls: string[] = [];
  const peered = source(await peer(blob, 404), calls);
  await expect(peered.getBlob(REPO, digestOf(blob))).rejects.toThrow('the upstream was asked');
  expect(calls).toEqual([digestOf(blob)]);
  expect(cells.unavailable.value).toBe(1);
});

test('a holder that cannot give the blob has let the lease go: this replica takes it before it fetches', async () => {
  // A replica whose fetch for its own repository failed (the upstream said 404 there) answers
  // 404; its lease is free by the time this one asks again. Fetching without it would leave
  // the next replicas nobody to follow: each would fetch once more.
  const blob = randomBytes(1024);
  const holder = await peer(blob, 404);
  const claims: string[] = [];
  let released = 0;
  const leases = {
    claim: async () => {
      claims.push('asked');
      return claims.length === 1
        ? { held: false, holder, scope: `upstream/${REPO}` }
        : { held: true, release: () => released++ };
    },
  } as unknown as PeerLeases;
  const upstream = {
    name: 'upstream',
    getBlob: async (): Promise<BlobStream> => ({
      size: blob.length,
      stream: Readable.from([blob]),
    }),
    headBlob: async () => {
      throw new Error('the upstream was asked to confirm');
    },
  };
  const peered = new PeeredBlobSource(upstream, {
    leases,
    secret: SECRET,
    idleTimeout: 5_000,
    log: silentLogger(),
  });
  const { stream } = await peered.getBlob(REPO, digestOf(blob));
  expect(claims).toHaveLength(2);
  expect(asked).toBe(1);
  expect(released).toBe(0); // held while the bytes come
  for await (const _ of stream);
  await new Promise((r) => setImmediate(r));
  expect(released).toBe(1);
});

test('a holder that cannot give the blob and still holds the lease is not asked twice', async () => {
  const blob = randomBytes(1024);
  const calls: string[] = [];
  const peered = source(await peer(blob, 404), calls);
  await expect(peered.getBlob(REPO, digestOf(blob))).rejects.toThrow('the upstream was asked');
  expect(asked).toBe(1);
  expect(calls).toEqual([digestOf(blob)]);
});

test('a peer that refuses this replica (another peerSecret) is not asked again for a minute, and is warned of once', async () => {
  const blobs = [randomBytes(1024), randomBytes(1024)];
  const calls: string[] = [];
  const { log, lines } = capturedLog('info');
  const peered = source(await peer(blobs[0]!, 200, 'another secret'), calls, log);
  for (const blob of blobs)
    await expect(peered.getBlob(REPO, digestOf(blob))).rejects.toThrow('the upstream was asked');
  expect(calls).toEqual(blobs.map((b) => digestOf(b)));
  expect(asked).toBe(1);
  // Asked once; the second blob went to the upstream without asking.
  expect(cells.unavailable.value).toBe(1);
  const warned = lines.filter((l) => l.level === 40);
  expect(warned).toHaveLength(1);
  expect(String(warned[0]!.err)).toMatch(
    /refused this replica \(403\): server\.peerSecret differs/,
  );
});

test('a peer that does not answer is not dialled again for a minute', async () => {
  // A port nothing listens on: connections are refused.
  const closed = createServer();
  await new Promise<void>((r) => closed.listen(0, '127.0.0.1', r));
  const port = (closed.address() as AddressInfo).port;
  await new Promise((r) => closed.close(r));
  const blobs = [randomBytes(1024), randomBytes(1024)];
  const calls: string[] = [];
  const { log, lines } = capturedLog('info');
  const peered = source(`http://127.0.0.1:${port}`, calls, log);
  for (const blob of blobs)
    await expect(peered.getBlob(REPO, digestOf(blob))).rejects.toThrow('the upstream was asked');
  expect(calls).toEqual(blobs.map((b) => digestOf(b)));
  const warned = lines.filter((l) => l.level === 40);
  expect(warned).toHaveLength(1);
  expect(String(warned[0]!.err)).toMatch(/ECONNREFUSED/);
  expect(warned[0]!.peer).toBe(`http://127.0.0.1:${port}`);
});

test('a peer whose answer is late (its own upstream slow) is passed over for that blob only', async () => {
  const blobs = [randomBytes(1024), randomBytes(1024)];
  let askedLate = 0;
  server = createServer((_req, res) => {
    askedLate++;
    setTimeout(() => res.writeHead(404).end(), 1000); // later than the headers timeout
  });
  await new Promise<void>((r) => server!.listen(0, '127.0.0.1', r));
  const holder = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  const calls: string[] = [];
  const { log, lines } = capturedLog('info');
  const peered = source(holder, calls, log, 300);
  for (const blob of blobs)
    await expect(peered.getBlob(REPO, digestOf(blob))).rejects.toThrow('the upstream was asked');
  expect(calls).toEqual(blobs.map((b) => digestOf(b)));
  expect(askedLate).toBe(2);
  expect(lines.filter((l) => l.level === 40)).toEqual([]);
});

test('close() ends the connections kept to peers', async () => {
  const blob = randomBytes(64 * 1024);
  const peered = source(await peer(blob), []);
  server!.keepAliveTimeout = 60_000;
  const ended: Promise<void>[] = [];
  server!.on('connection', (socket) => ended.push(new Promise((r) => socket.once('close', r))));
  const { stream } = await peered.getBlob(REPO, digestOf(blob), { slabs: new ReceiveSlabs() });
  for await (const chunk of stream) void chunk;
  expect(ended).toHaveLength(1);
  // Kept for the next blob: still open a while after the body ended.
  const open = await Promise.race([
    ended[0]!.then(() => false),
    new Promise((r) => setTimeout(() => r(true), 200)),
  ]);
  expect(open).toBe(true);
  peered.close();
  // Well before the peer's own keep-alive timeout (set long here) would close it.
  const closed = await Promise.race([
    ended[0]!.then(() => true),
    new Promise((r) => setTimeout(() => r(false), 2_000)),
  ]);
  expect(closed).toBe(true);
});
