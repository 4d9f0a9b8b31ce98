import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { open } from 'node:fs/promises';
import { createServer, get, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { afterAll, beforeAll, expect, test } from 'vitest';
import { FileRange, sendFilled } from '../../src/storage/file-range.js';
import { TURN_BUDGET, turnSlot } from '../../src/storage/turn-budget.js';

let dir: string;
let file: string;
const bytes = randomBytes(5 * 1024 * 1024 + 123);
let server: Server;
let url: string;
let respond: (res: ServerResponse) => void;

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'pullcache-range-'));
  file = join(dir, 'data');
  writeFileSync(file, bytes);
  server = createServer((_req, res) => respond(res));
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  url = `http://127.0.0.1:${(server.address() as AddressInfo).port}/`;
});
afterAll(async () => {
  server.closeAllConnections();
  await new Promise((r) => server.close(r));
  rmSync(dir, { recursive: true, force: true });
});

function fetchAll(): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    get(url, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => resolve(Buffer.concat(chunks)));
      res.on('error', reject);
    }).on('error', reject);
  });
}

test('sendTo writes the range to a response, reusing its buffers, and closes the file', async () => {
  const handle = await open(file);
  const range = new FileRange(handle, 1000, bytes.length - 7);
  const sent = new Promise<void>((resolve, reject) => {
    respond = (res) => {
      res.setHeader('Content-Length', bytes.length - 7 - 1000);
      range.sendTo(res).then(() => {
        res.end();
        resolve();
      }, reject);
    };
  });
  const body = await fetchAll();
  await sent;
  expect(body.equals(bytes.subarray(1000, bytes.length - 7))).toBe(true);
  expect(handle.fd).toBe(-1); // closed
});

test('sendTo rejects when the client goes away, and closes the file', async () => {
  const handle = await open(file);
  const range = new FileRange(handle, 0, Infinity);
  const sent = new Promise<unknown>((resolve) => {
    respond = (res) => {
      res.setHeader('Content-Length', bytes.length);
      range.sendTo(res).then(
        () => resolve('finished'),
        (err: unknown) => resolve(err),
      );
    };
  });
  await new Promise<void>((resolve) => {
    const req = get(url, (res) => {
      res.once('data', () => {
        req.destroy(); // gone after the first bytes
        resolve();
      });
    });
    req.on('error', () => {});
  });
  const outcome = await sent;
  // What the blob route takes for "the client went away": the close, or the write's own error.
  expect(['ERR_STREAM_PREMATURE_CLOSE', 'ECONNRESET', 'EPIPE']).toContain(
    (outcome as NodeJS.ErrnoException).code,
  );
  expect(handle.fd).toBe(-1);
});

test('as a Readable it streams the same range, to the end of the file when no end is given', async () => {
  for (const [start, end, expected] of [
    [4096, 2 * 1024 * 1024 + 5, bytes.subarray(4096, 2 * 1024 * 1024 + 5)],
    [bytes.length - 10, Infinity, bytes.subarray(bytes.length - 10)],
    [300, 300, Buffer.alloc(0)],
  ] as const) {
    const chunks: Buffer[] = [];
    for await (const chunk of new FileRange(await open(file), start, end))
      chunks.push(chunk as Buffer);
    expect(Buffer.concat(chunks).equals(expected)).toBe(true);
  }
});

test('sendTo to a client already gone rejects at once and closes the file', async () => {
  const handle = await open(file);
  const range = new FileRange(handle, 0, Infinity);
  const dest = new Writable({ write: (_chunk, _enc, done) => done() });
  dest.destroy();
  await new Promise((r) => setImmediate(r)); // its 'close' is past
  await expect(range.sendTo(dest)).rejects.toMatchObject({ code: 'ERR_STREAM_PREMATURE_CLOSE' });
  await new Promise((r) => setImmediate(r));
  expect(handle.fd).toBe(-1);
});

test('while many responses are sent at once, sendTo reads in smaller buffers, and each is whole', async () => {
  // Writables that take each chunk a turn later, so that all six sends are under way at once.
  const sinks = Array.from({ length: 6 }, () => {
    const chunks: Buffer[] = [];
    const dest = new Writable({
      write: (chunk: Buffer, _enc, done) => {
        chunks.push(Buffer.from(chunk));
        setImmediate(done);
      },
    });
    return { chunks, dest };
  });
  // Every file open first, then every send started at once.
  const handles = await Promise.all(sinks.map(() => open(file)));
  await Promise.all(
    sinks.map(({ dest }, i) => new FileRange(handles[i]!, 0, Infinity).sendTo(dest)),
  );
  for (const { chunks } of sinks) expect(Buffer.concat(chunks).equals(bytes)).toBe(true);
  // While more than four were under way, reads were 256 KiB; with four or fewer, 1 MiB. Which
  // send read what depends on when each got its turn (a loaded machine reorders them), so the
  // test asks only that both happened.
  const sizes = new Set(sinks.flatMap(({ chunks }) => chunks.map((c) => c.length)));
  expect(sizes.has(256 * 1024)).toBe(true);
  expect(sizes.has(1024 * 1024)).toBe(true);
});

test('the next send reads into the buffers the last one gave back, and a failed send gives none back', async () => {
  const size = 64 * 1024 + 7; // a size of its own, so no other send shares its spares
  const sink = () => new Writable({ write: (_chunk, _enc, done) => setImmediate(done) });
  const used = async (dest: Writable) => {
    const memories = new Set<ArrayBufferLike>();
    let left = 3;
    await sendFilled(dest, size, async (buffer) => {
      memories.add(buffer.buffer);
      return left-- > 0 ? buffer.length : 0;
    });
    return memories;
  };
  const first = await used(sink());
  expect(first.size).toBe(2);
  const second = await used(sink());
  expect([...second].every((m) => first.has(m))).toBe(true);
  // A send that fails (its client gone) keeps its buffers out: a write may still hold them.
  const failing = sink();
  const memories = new Set<ArrayBufferLike>();
  await expect(
    sendFilled(failing, size, async (buffer) => {
      memories.add(buffer.buffer);
      failing.destroy();
      return buffer.length;
    }),
  ).rejects.toMatchObject({ code: 'ERR_STREAM_PREMATURE_CLOSE' });
  const after = await used(sink());
  expect([...after].some((m) => memories.has(m))).toBe(false);
});

/** Counts turns of the event loop (one per check phase) until stopped. */
function turnCounter() {
  const counter = { turn: 0, stop: () => (running = false) };
  let running = true;
  const tick = () => {
    counter.turn++;
    if (running) setImmediate(tick);
  };
  setImmediate(tick);
  return counter;
}

test('a send whose bytes are at hand copies at most the turn budget per turn of the event loop', async () => {
  // Bytes from memory into a sink that takes them at once: with nothing to wait for, the send
  // would otherwise write all 16 MiB in one turn, and nothing else would run meanwhile.
  const chunk = 256 * 1024;
  const perTurn = new Map<number, number>();
  const turns = turnCounter();
  let written = 0;
  const dest = new Writable({
    write: (c: Buffer, _enc, done) => {
      perTurn.set(turns.turn, (perTurn.get(turns.turn) ?? 0) + c.length);
      written += c.length;
      done();
    },
  });
  let left = 64;
  await sendFilled(dest, chunk, async (buffer) => (left-- > 0 ? buffer.length : 0));
  turns.stop();
  expect(written).toBe(64 * chunk);
  // A turn copies what the last one left waiting (up to the budget, plus the chunk that crosses
  // it) and, in its poll phase, up to the budget again: the counter's turns can see both.
  expect(Math.max(...perTurn.values())).toBeLessThanOrEqual(2 * TURN_BUDGET + chunk);
  expect(perTurn.size).toBeGreaterThanOrEqual((64 * chunk) / (2 * TURN_BUDGET + chunk));
});

test('slots past the turn budget are given at the ends of turns, in the order asked', async () => {
  const turns = turnCounter();
  await new Promise((r) => setImmediate(r)); // a turn of its own: the budget is whole
  const mib = 1024 * 1024;
  const asked = Math.ceil((3 * TURN_BUDGET) / mib) + 2;
  const given: { i: number; turn: number }[] = [];
  await Promise.all(
    Array.from({ length: asked }, async (_, i) => {
      const slot = turnSlot(mib);
      if (slot) await slot;
      given.push({ i, turn: turns.turn });
    }),
  );
  turns.stop();
  expect(given.map((g) => g.i)).toEqual(given.map((_, i) => i));
  const atOnce = given.filter((g) => g.turn === given[0]!.turn).length;
  expect(atOnce).toBe(TURN_BUDGET / mib);
  expect(new Set(given.map((g) => g.turn)).size).toBeGreaterThanOrEqual(3);
});
