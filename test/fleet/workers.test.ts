/**
 * `server.workers`: several serving processes on one port, against the real upstream registry
 * (paced by a forwarder so that tests can act while a fetch is under way), run with the real CLI.
 */
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { Agent, request } from 'node:http';
import { availableParallelism, tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import type { ImageInfo, Usage } from '../../src/lifecycle/types.js';
import { parseDigest } from '../../src/oci/digest.js';
import type { Status } from '../../src/status/status.js';
import { paths } from '../../src/storage/paths.js';
import type { RepositoryKey } from '../../src/storage/types.js';
import { fakeServer, type FakeServer } from '../helpers/fake-server.js';
import { fillDisk } from '../helpers/files.js';
import { makeImage, pushImage, pushRandomBlob, sha256, type Image } from '../helpers/images.js';
import { waitFor } from '../helpers/net.js';
import { TestRegistry } from '../helpers/registry.js';
import { Throttle } from '../helpers/throttle.js';
import { cli, configFile } from '../helpers/cli.js';
import {
  get,
  intact,
  pausedDownload,
  startWorkers,
  type Got,
  type WorkersServer,
} from '../helpers/workers.js';

const MiB = 1024 * 1024;
const REPO = 'library/fleet';

/** A kept-alive connection to the worker with this pid (a new connection until one is). */
async function connectionTo(pc: WorkersServer, pid: number): Promise<Agent> {
  for (let i = 0; i < 20; i++) {
    const agent = new Agent({ keepAlive: true, maxSockets: 1 });
    const res = await fetchOn(pc, agent, '/v2/');
    if (res.worker === pid) return agent;
    agent.destroy();
  }
  throw new Error(`no connection reached worker ${pid}`);
}

function fetchOn(
  pc: WorkersServer,
  agent: Agent,
  path: string,
  options: { accept?: string; method?: string; body?: string } = {},
): Promise<Got> {
  return new Promise((resolve, reject) => {
    const headers: Record<string, string> = {};
    if (options.accept) headers.accept = options.accept;
    if (options.body !== undefined) headers['content-type'] = 'application/json';
    const req = request(
      `${pc.url}${path}`,
      { agent, headers, method: options.method ?? 'GET' },
      (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () =>
          resolve({
            status: res.statusCode ?? 0,
            worker: Number(res.headers['pullcache-worker']),
            body: Buffer.concat(chunks),
          }),
        );
        res.on('error', reject);
      },
    );
    req.on('error', reject);
    req.end(options.body);
  });
}

/** Pulls the image as a client would (its manifest by tag, then every blob) on `agent`. */
async function pull(pc: WorkersServer, agent: Agent, image: Image): Promise<void> {
  const manifest = await fetchOn(pc, agent, `/v2/${image.repository}/manifests/${image.tag}`, {
    accept: image.mediaType,
  });
  expect(manifest.status).toBe(200);
  for (const blob of image.blobs) {
    const got = await fetchOn(pc, agent, `/v2/${image.repository}/blobs/${blob.digest}`);
    expect(sha256(got.body)).toBe(blob.digest);
  }
}

/** Where storage keeps the link of `image`'s manifest in its repository. */
function manifestLink(pc: WorkersServer, image: Image): string {
  return join(
    pc.root,
    'data',
    paths.manifestRevisionLink(
      { upstream: 'docker.io', repository: image.repository } as RepositoryKey,
      parseDigest(image.digest).digest,
    ),
  );
}

describe('workers on one host', () => {
  let registry: TestRegistry;
  let throttle: Throttle;
  let pc: WorkersServer;

  beforeAll(async () => {
    registry = await TestRegistry.start();
    throttle = await Throttle.start(registry.url);
    pc = await startWorkers({
      upstream: throttle.url,
      workers: 2,
      yaml: ['    timeouts:', '      bodyIdle: 3s'],
      // A budget far above what the tests store: only its figure in /metrics is looked at.
      top: ['retention:', '  maxSize: 1GiB'],
    });
  }, 60_000);
  afterAll(async () => {
    await pc?.stop();
    await throttle?.close();
    await registry?.close();
  });

  async function blob(size: number): Promise<{ digest: string; bytes: Buffer; url: string }> {
    const { digest, bytes } = await pushRandomBlob(registry, REPO, size);
    return { digest, bytes, url: `${pc.url}/v2/${REPO}/blobs/${digest}` };
  }

  /**
   * GETs on new connections until one is answered by a worker that `want`s it; resolves to the
   * requests made (all still running), the last one that one. A connection the primary hands to
   * a stopped worker gets no answer: it is given up after `patienceMs`.
   */
  async function reach(
    url: string,
    want: (pid: number) => boolean,
    patienceMs = 60_000,
  ): Promise<{ all: Promise<Got>[]; pid: number }> {
    const all: Promise<Got>[] = [];
    for (let i = 0; i < 12; i++) {
      let answered!: (pid: number) => void;
      const header = new Promise<number>((resolve) => (answered = resolve));
      const got = get(url, (res) => answered(Number(res.headers['pullcache-worker'])), patienceMs);
      got.catch(() => answered(0));
      all.push(
        got.catch((err: Error) => ({ status: 0, worker: 0, body: Buffer.alloc(0), error: err })),
      );
      const pid = await header;
      if (pid && want(pid)) return { all, pid };
    }
    throw new Error('no request reached the wanted worker');
  }

  /**
   * An image of one 100 kB layer pushed upstream as `repository`, and a kept-alive connection to
   * each of the two workers, closed after `body`.
   */
  async function onBothWorkers(
    repository: string,
    body: (w: {
      image: Image;
      one: number;
      two: number;
      toOne: Agent;
      toTwo: Agent;
    }) => Promise<void>,
  ): Promise<void> {
    const image = makeImage(repository, 'v1', 'oci', [100_000]);
    await pushImage(registry, image);
    await pc.waitForWorkers(2, 2);
    const [one, two] = pc.workers() as [number, number];
    const toOne = await connectionTo(pc, one);
    const toTwo = await connectionTo(pc, two);
    try {
      await body({ image, one, two, toOne, toTwo });
    } finally {
      toOne.destroy();
      toTwo.destroy();
    }
  }

  test("an image removed through one worker is no longer served from the other's memory", async () => {
    await onBothWorkers('org/removed', async ({ image, toOne, toTwo }) => {
      const byTag = `/v2/${image.repository}/manifests/${image.tag}`;
      const byDigest = `/v2/${image.repository}/manifests/${image.digest}`;
      try {
        // Worker one stores it (its graph knows it); worker two then serves it from storage, and
        // keeps its tag and manifest in memory.
        await pull(pc, toOne, image);
        for (const path of [byTag, byDigest])
          expect((await fetchOn(pc, toTwo, path, { accept: image.mediaType })).status).toBe(200);
        const removed = await fetchOn(pc, toOne, '/_pullcache/v1/remove', {
          method: 'POST',
          body: JSON.stringify({ references: [`${image.repository}:${image.tag}`] }),
        });
        expect(removed.status).toBe(200);
        expect(
          (JSON.parse(removed.body.toString()) as { removed: unknown[] }).removed,
        ).toHaveLength(1);
        // With the upstream down, only memory could still answer for the image.
        throttle.down = true;
        const answers: Record<string, number> = {};
        await waitFor(
          async () => {
            for (const path of [byTag, byDigest])
              answers[path] = (await fetchOn(pc, toTwo, path, { accept: image.mediaType })).status;
            return answers[byTag] !== 200 && answers[byDigest] !== 200;
          },
          'worker two no longer answering for the removed image',
          10_000,
        ).catch((err: Error) => {
          throw new Error(`${err.message}: ${JSON.stringify(answers)}`);
        });
        // Not in storage, and the upstream does not answer.
        expect(answers).toEqual({ [byTag]: 503, [byDigest]: 503 });
      } finally {
        throttle.down = false;
      }
    });
  }, 60_000);

  test('a tag that `pullcache import` moves is served at its new digest by every worker at once', async () => {
    await onBothWorkers('org/moved', async ({ image, toOne, toTwo }) => {
      const byTag = `/v2/${image.repository}/manifests/${image.tag}`;
      const served = async (agent: Agent) =>
        sha256((await fetchOn(pc, agent, byTag, { accept: image.mediaType })).body);
      // The tag moves upstream; a bundle of its new image is made on another cache.
      const moved = makeImage(image.repository, image.tag, 'oci', [50_000]);
      const other = mkdtempSync(join(tmpdir(), 'pullcache-moved-'));
      const bundle = join(other, 'moved.tar');
      try {
        // Both workers serve the tag, and keep it in memory.
        for (const agent of [toOne, toTwo, toOne, toTwo])
          expect(await served(agent)).toBe(image.digest);
        await pushImage(registry, moved);
        const otherConfig = configFile(join(other, 'data'), { 'docker.io': { url: registry.url } });
        expect(
          (await cli('prefetch', '-c', otherConfig, `${image.repository}:${image.tag}`)).code,
        ).toBe(0);
        expect(
          (await cli('export', '-c', otherConfig, '-o', bundle, `${image.repository}:${image.tag}`))
            .code,
        ).toBe(0);
        // With the upstream down, only storage and memory answer for the tag.
        throttle.down = true;
        const imported = await cli('import', '-c', join(pc.root, 'pullcache.yaml'), bundle);
        expect(imported.stderr).toContain('1 tags set');
        expect(imported.code).toBe(0);
        const answers: string[] = [];
        await waitFor(
          async () => {
            answers.splice(0, 2, await served(toOne), await served(toTwo));
            return answers.every((digest) => digest === moved.digest);
          },
          'both workers serving the moved tag',
          10_000,
        ).catch((err: Error) => {
          throw new Error(`${err.message}: ${JSON.stringify(answers)}`);
        });
      } finally {
        throttle.down = false;
        rmSync(other, { recursive: true, force: true });
      }
    });
  }, 60_000);

  test('rm through a worker removes an image another worker stored since its last count', async () => {
    await onBothWorkers('org/stored-elsewhere', async ({ image, two, toOne, toTwo }) => {
      const link = manifestLink(pc, image);
      await pull(pc, toOne, image);
      expect(existsSync(link)).toBe(true);
      // Right after the pull, worker two may not have heard of the image yet (what another
      // worker stores reaches its graph a moment after): when a reference is not in its graph,
      // rm counts storage afresh first. Either way, it removes the image.
      const removed = await fetchOn(pc, toTwo, '/_pullcache/v1/remove', {
        method: 'POST',
        body: JSON.stringify({ references: [`${image.repository}:${image.tag}`] }),
      });
      expect(removed.worker).toBe(two);
      const report = JSON.parse(removed.body.toString()) as {
        removed: { name: string }[];
        problems: string[];
      };
      expect(report.problems).toEqual([]);
      expect(report.removed.map((r) => r.name)).toEqual([
        expect.stringContaining(`${image.repository}:${image.tag}`),
      ]);
      expect(existsSync(link)).toBe(false);
      for (const blob of image.blobs)
        expect(
          existsSync(join(pc.root, 'data', paths.blobData(parseDigest(blob.digest).digest))),
        ).toBe(false);
    });
  }, 60_000);

  test("an image removed through one worker leaves the other's list and usage", async () => {
    await onBothWorkers('org/listed', async ({ image, two, toOne, toTwo }) => {
      const listedByTwo = async () => {
        const got = await fetchOn(pc, toTwo, '/_pullcache/v1/images');
        expect(got.worker).toBe(two);
        const images = JSON.parse(got.body.toString()) as ImageInfo[];
        return images.some((i) => i.references.some((r) => r.includes(image.repository)));
      };
      const usageBytes = async (agent: Agent) =>
        (JSON.parse((await fetchOn(pc, agent, '/_pullcache/v1/usage')).body.toString()) as Usage)
          .bytes;
      const before = await usageBytes(toTwo);
      // Worker one stores it; worker two hears of it, lists it and counts its bytes.
      await pull(pc, toOne, image);
      await waitFor(listedByTwo, 'worker two listing the image');
      await waitFor(async () => (await usageBytes(toTwo)) > before, 'worker two counting it');
      const removed = await fetchOn(pc, toOne, '/_pullcache/v1/remove', {
        method: 'POST',
        body: JSON.stringify({ references: [`${image.repository}:${image.tag}`] }),
      });
      expect(removed.status).toBe(200);
      // Without being told, worker two would list it until its next sweep (10 min by default).
      await waitFor(async () => !(await listedByTwo()), 'worker two leaving it out', 10_000);
      // Both count what they counted before it came (its blobs were its own, and left storage).
      await waitFor(
        async () => (await usageBytes(toOne)) === before && (await usageBytes(toTwo)) === before,
        'both workers counting the bytes of before',
        10_000,
      );
    });
  }, 60_000);

  test('a cold blob asked of both workers is fetched from the upstream once, and followed at once', async () => {
    const b = await blob(24 * MiB);
    throttle.bytesPerSecond = 12 * MiB;
    const sent = throttle.sentBytes;
    const gets = Promise.all(Array.from({ length: 6 }, () => get(b.url)));
    // Under way, followed by both workers: one fetch on the host, not one per worker.
    await waitFor(async () => throttle.sentBytes - sent >= 4 * MiB, 'the fetch under way');
    const metrics = (await get(`${pc.url}/metrics`)).body.toString();
    expect(metrics).toMatch(/^pullcache_fetches_in_flight 1$/m);
    const results = await gets;
    const workers = new Set(results.map((r) => r.worker));
    expect(workers.size).toBe(2);
    for (const r of results) {
      expect(r.status).toBe(200);
      expect(r.error).toBeUndefined();
      expect(sha256(r.body)).toBe(b.digest);
      // Streamed as it arrives: the first bytes long before the 2 s the upstream takes.
      expect(r.firstByteMs).toBeLessThan(1000);
    }
    expect(throttle.gets.get(b.digest)).toBe(1);
  });

  test('a blob another worker fetches for a repository is not served for another that the upstream says lacks it', async () => {
    const { digest, bytes } = await pushRandomBlob(registry, 'team-a/app', 16 * MiB);
    throttle.bytesPerSecond = 8 * MiB;
    const sent = throttle.sentBytes;
    const fetching = get(`${pc.url}/v2/team-a/app/blobs/${digest}`);
    await waitFor(async () => throttle.sentBytes - sent >= 2 * MiB, 'the fetch under way');
    // Asked of both workers (new connections) while the fetch for team-a/app is under way.
    const others = await Promise.all(
      Array.from({ length: 6 }, () => get(`${pc.url}/v2/team-b/app/blobs/${digest}`)),
    );
    expect(new Set(others.map((r) => r.worker)).size).toBe(2);
    for (const r of others) expect(r.status).toBe(404);
    const own = await fetching;
    expect(own.status).toBe(200);
    expect(sha256(own.body)).toBe(sha256(bytes));
    // Nothing of it was linked to team-b/app meanwhile.
    for (let i = 0; i < 4; i++)
      expect((await get(`${pc.url}/v2/team-b/app/blobs/${digest}`)).status).toBe(404);
    expect(throttle.gets.get(digest)).toBe(1);
  });

  test('/metrics shows every worker of the host, whichever answers the scrape', async () => {
    const count = async () => {
      const text = (await get(`${pc.url}/metrics`)).body.toString();
      const line =
        /^pullcache_http_requests_total\{kind="catalog",method="GET",status="200"\} (\d+)$/m;
      return { n: Number(line.exec(text)?.[1] ?? 0), text };
    };
    const before = (await count()).n;
    const answered = new Set<number>();
    for (let i = 0; i < 12; i++) {
      const r = await get(`${pc.url}/v2/_catalog`);
      expect(r.status).toBe(200);
      answered.add(r.worker);
    }
    expect(answered.size).toBe(2);
    // Each scrape, on whichever worker, counts the requests of both.
    for (let i = 0; i < 2; i++) {
      const { n, text } = await count();
      expect(n - before).toBe(12);
      // Gauges every worker sees alike are not added up.
      expect(text).toMatch(/^pullcache_storage_limit_bytes 1073741824$/m);
      expect(text).toMatch(/^pullcache_upstream_down\{upstream="docker.io"\} 0$/m);
    }
  });

  test('the status page shows the host, whichever worker a poll reaches', async () => {
    const b = await blob(1 * MiB);
    throttle.bytesPerSecond = 64 * MiB;
    expect(intact(await get(b.url), b.digest)).toBe(true); // stored now
    const status = async () => {
      const r = await get(`${pc.url}/_pullcache/v1/status`);
      expect(r.status).toBe(200);
      return { worker: r.worker, s: JSON.parse(r.body.toString()) as Status };
    };
    const before = (await status()).s.traffic;
    const answered = new Set<number>();
    for (let i = 0; i < 10; i++) {
      const r = await get(b.url);
      expect(intact(r, b.digest)).toBe(true);
      answered.add(r.worker);
    }
    expect(answered.size).toBe(2);
    const seen = new Map<number, Status>();
    for (let i = 0; i < 8 && seen.size < 2; i++) {
      const { worker, s } = await status();
      seen.set(worker, s);
    }
    expect(seen.size).toBe(2);
    for (const s of seen.values()) {
      // Ten hits over both workers, as each worker tells it.
      expect(s.traffic.hits - before.hits).toBe(10);
      expect(s.traffic.hitBytes - before.hitBytes).toBe(10 * MiB);
      expect(s.history.points.at(-1)!.hits).toBe(s.traffic.hits);
    }
  });

  test('killing the worker that fetches a blob cuts every client of it, and a retry fetches afresh', async () => {
    const b = await blob(24 * MiB);
    throttle.bytesPerSecond = 6 * MiB;
    const holder = await reach(b.url, () => true);
    const follower = await reach(b.url, (pid) => pid !== holder.pid);
    await waitFor(async () => throttle.sentBytes > 0, 'the fetch under way');
    process.kill(holder.pid, 'SIGKILL');
    const cut = await Promise.all([...holder.all, ...follower.all]);
    for (const r of cut) {
      // Never wrong bytes: cut short, or (never here: the fetch was far from done) intact.
      expect(r.error ?? intact(r, b.digest)).toBeTruthy();
    }
    expect(cut.filter((r) => r.worker === follower.pid).every((r) => r.error)).toBe(true);
    throttle.bytesPerSecond = 64 * MiB;
    const retry = await get(b.url);
    expect(intact(retry, b.digest)).toBe(true);
    expect(throttle.gets.get(b.digest)).toBe(2);
    // The dead worker is replaced: two live workers again, one of them new.
    await pc.waitForWorkers(2, 3);
    expect(pc.workers()).not.toContain(holder.pid);
    expect(pc.workers()).toContain(follower.pid);
  }, 150_000);

  test('a worker dying does not cut the downloads of the others, and new requests are answered', async () => {
    const b = await blob(48 * MiB);
    throttle.bytesPerSecond = 256 * MiB;
    expect(intact(await get(b.url), b.digest)).toBe(true); // stored now
    // A slow client of one worker: it reads a little, then waits.
    const slow = await pausedDownload(b.url);
    const servingPid = slow.worker;
    const other = pc.workers().find((pid) => pid !== servingPid)!;
    process.kill(other, 'SIGKILL');
    await waitFor(async () => !pc.workers().includes(other), 'the worker gone');
    expect(intact(await get(b.url), b.digest)).toBe(true);
    slow.resume();
    expect(intact(await slow.done, b.digest)).toBe(true);
    await pc.waitForWorkers(2, 4);
  }, 150_000);

  test('a follower whose fetching worker stalls fetches the blob itself', async () => {
    const b = await blob(24 * MiB);
    throttle.bytesPerSecond = 4 * MiB;
    const holder = await reach(b.url, () => true);
    const follower = await reach(b.url, (pid) => pid !== holder.pid);
    await waitFor(async () => throttle.sentBytes > 0, 'the fetch under way');
    process.kill(holder.pid, 'SIGSTOP');
    try {
      // Nothing from the holder for bodyIdle (3 s): the follower's clients are cut (what they got
      // came from the stalled fetch), and its worker fetches the blob afresh.
      const followed = await follower.all[follower.all.length - 1]!;
      expect(followed.error).toBeDefined();
      throttle.bytesPerSecond = 64 * MiB;
      const again = await reach(b.url, (pid) => pid === follower.pid, 3000);
      expect(intact(await again.all[again.all.length - 1]!, b.digest)).toBe(true);
      expect(throttle.gets.get(b.digest)).toBe(2);
    } finally {
      process.kill(holder.pid, 'SIGCONT');
    }
    // The stalled worker, once running again, finishes its own clients' downloads whole.
    for (const r of await Promise.all(holder.all))
      expect(r.error ?? intact(r, b.digest)).toBeTruthy();
  });

  test('SIGTERM on the primary: new connections are refused, a download in flight ends whole, then every worker stops and it exits 0', async () => {
    const b = await blob(48 * MiB);
    throttle.bytesPerSecond = 256 * MiB;
    expect(intact(await get(b.url), b.digest)).toBe(true); // stored now
    const workers = pc.workers();
    expect(workers).toHaveLength(2);
    // A client that reads a little, then waits: its download is in flight at the signal.
    const slow = await pausedDownload(b.url);
    const draining = slow.worker;
    pc.primary.kill('SIGTERM');
    // A service manager signals every process of the group: a worker's second SIGTERM (the
    // primary sends one too) must not cut its transfers.
    for (const pid of workers) process.kill(pid, 'SIGTERM');
    // (A connection the primary accepts just as the workers close can wait, unanswered, until the
    // primary exits: node's cluster hands it to a worker that no longer takes any. So each try
    // gives up after 2 s.)
    await waitFor(
      () =>
        get(b.url, undefined, 2000).then(
          () => false,
          (err: NodeJS.ErrnoException) => err.code === 'ECONNREFUSED',
        ),
      'new connections refused',
    );
    // The worker with nothing in flight has gone; the other drains.
    await waitFor(
      async () => pc.workers().join() === String(draining),
      'the other worker gone, this one draining',
    );
    slow.resume();
    expect(intact(await slow.done, b.digest)).toBe(true);
    expect(await pc.exited()).toBe(0);
    for (const pid of workers) expect(() => process.kill(pid, 0)).toThrow();
  }, 60_000);
});

describe('workers on one host, an upstream that sends corrupt bytes', () => {
  // In-process: a real registry cannot be made to send bytes that do not match their digest.
  const bytes = randomBytes(8 * MiB);
  const digest = sha256(bytes);
  let upstream: FakeServer;
  let pc: WorkersServer;

  beforeAll(async () => {
    upstream = await fakeServer((req, res) => {
      if (!req.url?.endsWith(digest)) {
        res.writeHead(req.url === '/v2/' ? 200 : 404).end();
        return;
      }
      res.writeHead(200, { 'content-length': bytes.length });
      if (req.method === 'HEAD') return void res.end();
      const body = Buffer.from(bytes);
      body[body.length - 10] = body[body.length - 10]! ^ 1;
      let offset = 0;
      // 64 KiB every 10 ms: about 1.3 s, so that both workers' clients join while it runs.
      const send = () => {
        if (res.destroyed) return;
        const chunk = body.subarray(offset, offset + 65536);
        offset += chunk.length;
        if (offset >= body.length) res.end(chunk);
        else res.write(chunk, () => setTimeout(send, 10));
      };
      send();
    });
    pc = await startWorkers({ upstream: upstream.url, workers: 2 });
  }, 60_000);
  afterAll(async () => {
    await pc?.stop();
    await upstream?.close();
  });

  test('a digest mismatch cuts the clients of every worker, and nothing is kept', async () => {
    const url = `${pc.url}/v2/library/corrupt/blobs/${digest}`;
    const results = await Promise.all(Array.from({ length: 6 }, () => get(url)));
    expect(new Set(results.map((r) => r.worker)).size).toBe(2);
    for (const r of results) {
      expect(r.error).toBeDefined();
      expect(r.body.length).toBeLessThan(bytes.length);
    }
    expect(
      upstream.requests.filter((r) => r.method === 'GET' && r.url.endsWith(digest)),
    ).toHaveLength(1);
    expect(existsSync(join(pc.root, 'data', paths.blobData(parseDigest(digest).digest)))).toBe(
      false,
    );
  });
});

/**
 * Every sample of the counters and histograms (buckets, sums, counts) in a scrape, by series:
 * its name and its labels in order.
 */
function countedSeries(text: string): Map<string, number> {
  const types = new Map<string, string>();
  const series = new Map<string, number>();
  for (const line of text.split('\n')) {
    const type = /^# TYPE (\S+) (\S+)$/.exec(line);
    if (type) types.set(type[1]!, type[2]!);
    const sample = /^([\w:]+)(?:\{(.*)\})? (\S+)$/.exec(line);
    if (!sample) continue;
    const [, name, labels, value] = sample as unknown as [
      string,
      string,
      string | undefined,
      string,
    ];
    const family = types.has(name) ? name : name.replace(/_(bucket|sum|count)$/, '');
    if (!['counter', 'histogram'].includes(types.get(family) ?? '')) continue;
    const sorted = [...(labels ?? '').matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)]
      .map((m) => m[0])
      .sort();
    series.set(`${name}{${sorted.join(',')}}`, Number(value));
  }
  return series;
}

describe('workers on one host, a worker killed', () => {
  let registry: TestRegistry;
  let pc: WorkersServer;

  beforeAll(async () => {
    registry = await TestRegistry.start();
    pc = await startWorkers({ upstream: registry.url, workers: 2 });
  }, 60_000);
  afterAll(async () => {
    await pc?.stop();
    await registry?.close();
  });

  test("the host's counters and traffic keep a killed worker's counts, shown through that worker: none goes down", async () => {
    const image = makeImage('org/counted', 'v1', 'oci', [300_000, 200_000]);
    await pushImage(registry, image);
    const [one, two] = pc.workers() as [number, number];
    const blobs = 'pullcache_http_requests_total{kind="blob",method="GET",status="200"}';
    const keys = ['hits', 'misses', 'hitBytes', 'missBytes', 'upstreamBytes'] as const;
    /** The host's status and counters, both through `agent` (or each on a new connection). */
    const read = async (agent?: Agent) => {
      const through = (path: string) =>
        agent ? fetchOn(pc, agent, path) : get(`${pc.url}${path}`);
      const status = await through('/_pullcache/v1/status');
      const scrape = await through('/metrics');
      return {
        workers: [status.worker, scrape.worker],
        s: JSON.parse(status.body.toString()) as Status,
        metrics: countedSeries(scrape.body.toString()),
      };
    };
    // Worker two fetches the image (misses); then worker one serves it from storage (hits) and,
    // at once, shows the host's counts: one is killed before its next report (every 5 s) could
    // tell the primary of those hits, so only what it told as it showed them keeps them.
    const toTwo = await connectionTo(pc, two);
    try {
      await pull(pc, toTwo, image);
    } finally {
      toTwo.destroy();
    }
    const toOne = await connectionTo(pc, one);
    const before = await pull(pc, toOne, image)
      .then(() => read(toOne))
      .finally(() => toOne.destroy());
    expect(before.workers).toEqual([one, one]);
    const listened = pc.lines.filter((l) => l.msg === 'pullcache listening').length;
    process.kill(one, 'SIGKILL');
    // Both workers' counts were shown: every blob served by each, fetched by two.
    expect(before.metrics.get(blobs)).toBe(2 * image.blobs.length);
    const served = image.blobs.length + 1;
    expect([before.s.traffic.hits, before.s.traffic.misses]).toEqual([served, served]);
    await pc.waitForWorkers(2, listened + 1);
    expect(pc.workers()).not.toContain(one);
    // Through the others now: worker two, or one's replacement.
    const after = await read();
    expect(after.workers).not.toContain(one);
    const dropped = [...before.metrics]
      .filter(([series, n]) => (after.metrics.get(series) ?? 0) < n)
      .map(([series, n]) => `${series}: ${n} -> ${after.metrics.get(series)}`);
    expect(dropped).toEqual([]);
    expect(after.metrics.get(blobs)).toBe(2 * image.blobs.length);
    for (const key of keys) {
      expect(after.s.traffic[key], key).toBeGreaterThanOrEqual(before.s.traffic[key]);
      // The chart's last point is the totals of now.
      expect(after.s.history.points.at(-1)![key], key).toBe(after.s.traffic[key]);
    }
    expect([after.s.traffic.hits, after.s.traffic.misses]).toEqual([served, served]);
    expect(after.s.startedAt <= before.s.startedAt).toBe(true);
  }, 150_000);
});

describe('starting workers', () => {
  test('server.workers: 0 serves with one worker per core', async () => {
    const pc = await startWorkers({
      upstream: 'http://127.0.0.1:9',
      workers: 0,
      expect: availableParallelism(),
    });
    try {
      expect(pc.workers()).toHaveLength(availableParallelism());
      const answered = new Set<number>();
      for (let i = 0; i < 20 && answered.size < availableParallelism(); i++)
        answered.add((await get(`${pc.url}/v2/`)).worker);
      expect(answered.size).toBe(availableParallelism());
    } finally {
      await pc.stop();
    }
  }, 60_000);

  test('a worker that cannot start stops the primary with its exit code and its one line', async () => {
    const root = mkdtempSync(join(tmpdir(), 'pullcache-workers-'));
    writeFileSync(join(root, 'data'), 'a file, not a directory');
    try {
      const started = startWorkers({ upstream: 'http://127.0.0.1:9', workers: 2, root });
      await expect(started).rejects.toThrow(/code 2\b/);
      await expect(started).rejects.toThrow(/storage\.filesystem\.root/);
      await expect(started).rejects.not.toThrow(/\n\s+at /); // no stack trace
    } finally {
      rmSync(root, { recursive: true, force: true });
    }
  }, 60_000);
});

/**
 * Two workers on a budget of two images (`names`, one 300 kB layer each, pushed upstream) with
 * eviction down to the budget itself; `withWorkers` connects to the worker that owns the storage
 * (the one that evicts) and to the other.
 */
function budgetFleet(names: string[], setup: { root?: () => string; retention?: string[] } = {}) {
  const fleet = {
    registry: undefined as unknown as TestRegistry,
    pc: undefined as unknown as WorkersServer,
    images: {} as Record<string, Image>,
    /** Whether the image's manifest bytes are still in storage. */
    stored: (image: Image) =>
      existsSync(join(fleet.pc.root, 'data', paths.blobData(parseDigest(image.digest).digest))),
    /**
     * Runs `body` with a kept-alive connection to the worker that owns the storage (the one that
     * evicts) and one to the other; closes both after.
     */
    async withWorkers(
      body: (w: { owner: number; other: number; toOwner: Agent; toOther: Agent }) => Promise<void>,
    ): Promise<void> {
      const ownerFile = join(fleet.pc.root, 'data', 'lifecycle', 'owner.json');
      const ownerPid = () => (JSON.parse(readFileSync(ownerFile, 'utf8')) as { pid: number }).pid;
      await waitFor(
        async () => fleet.pc.workers().includes(ownerPid()),
        'a worker owning the storage',
      );
      const owner = ownerPid();
      const other = fleet.pc.workers().find((pid) => pid !== owner)!;
      const toOwner = await connectionTo(fleet.pc, owner);
      const toOther = await connectionTo(fleet.pc, other);
      try {
        await body({ owner, other, toOwner, toOther });
      } finally {
        toOwner.destroy();
        toOther.destroy();
      }
    },
  };
  const bytesOf = (image: Image) =>
    image.manifest.length + image.blobs.reduce((sum, b) => sum + b.bytes.length, 0);
  beforeAll(async () => {
    fleet.registry = await TestRegistry.start();
    for (const name of names) {
      fleet.images[name] = makeImage(`org/${name}`, 'v1', 'oci', [300_000]);
      await pushImage(fleet.registry, fleet.images[name]);
    }
    const unit = Math.max(...Object.values(fleet.images).map(bytesOf));
    fleet.pc = await startWorkers({
      upstream: fleet.registry.url,
      workers: 2,
      ...(setup.root ? { root: setup.root() } : {}),
      yaml: setup.retention ?? ['retention:', `  maxSize: ${2 * unit + 1000}`, '  lowWater: 100%'],
    });
  }, 60_000);
  afterAll(async () => {
    await fleet.pc?.stop();
    await fleet.registry?.close();
  });
  return fleet;
}

describe('workers on one host and the budget', () => {
  const fleet = budgetFleet(['x', 'y', 'z']);
  const stored = (image: Image) => fleet.stored(image);

  test('the evicting worker keeps an image another worker pulled since, and evicts the one nobody did', async () => {
    const { x, y, z } = fleet.images as Record<string, Image>;
    const { pc } = fleet;
    await fleet.withWorkers(async ({ toOwner, toOther }) => {
      await pull(pc, toOwner, x!);
      await pull(pc, toOwner, y!);
      // x is pulled again, through the other worker: the owner's graph does not see it, but the
      // other worker writes its last pull to storage (within 5 s).
      await new Promise((r) => setTimeout(r, 50));
      const pulledAt = Date.now();
      await pull(pc, toOther, x!);
      // Written within 5 s, later under load: wait until storage says so.
      const link = manifestLink(pc, x!);
      await waitFor(
        async () => {
          const at = statSync(link).mtimeMs;
          // Said when it times out: how far the time in storage is from the pull.
          if (at < pulledAt)
            throw new Error(`the link's time is ${pulledAt - at} ms before the pull`);
          return true;
        },
        'the pull in storage',
        30_000,
      );
      // z does not fit beside both: the owner evicts one, and x was pulled last.
      await pull(pc, toOwner, z!);
      await waitFor(async () => !stored(y!) || !stored(x!), 'an eviction');
      expect(stored(x!)).toBe(true);
      expect(stored(y!)).toBe(false);
      expect(stored(z!)).toBe(true);
    });
  }, 60_000);
});

describe('workers on one host, the budget and a pin', () => {
  const fleet = budgetFleet(['a', 'b', 'c']);

  test('the evicting worker keeps an image pinned through the other worker', async () => {
    const { a, b, c } = fleet.images as Record<string, Image>;
    const { pc } = fleet;
    await fleet.withWorkers(async ({ other, toOwner, toOther }) => {
      await pull(pc, toOwner, a!);
      await pull(pc, toOwner, b!);
      // a, the least recently pulled, is pinned through the worker that does not evict.
      const pinned = await fetchOn(pc, toOther, '/_pullcache/v1/pins', {
        method: 'POST',
        body: JSON.stringify({ references: [`${a!.repository}:${a!.tag}`] }),
      });
      expect(pinned.worker).toBe(other);
      expect(pinned.status).toBe(200);
      // c does not fit beside both: the owner evicts one, and a is pinned.
      await pull(pc, toOwner, c!);
      await waitFor(async () => !fleet.stored(a!) || !fleet.stored(b!), 'an eviction');
      expect(fleet.stored(a!)).toBe(true);
      expect(fleet.stored(b!)).toBe(false);
      expect(fleet.stored(c!)).toBe(true);
      // The owner lists the pin it did not take itself.
      const pins = await fetchOn(pc, toOwner, '/_pullcache/v1/pins');
      expect((JSON.parse(pins.body.toString()) as { pins: string[] }).pins).toEqual([
        expect.stringContaining(`${a!.repository}:${a!.tag}`),
      ]);
    });
  }, 60_000);
});

describe('workers on one host, the budget and what the other stores', () => {
  const fleet = budgetFleet(['d', 'e', 'f']);

  test('the evicting worker holds the budget at once for an image the other worker stored', async () => {
    const { d, e, f } = fleet.images as Record<string, Image>;
    const { pc } = fleet;
    await fleet.withWorkers(async ({ toOwner, toOther }) => {
      await pull(pc, toOwner, d!);
      await pull(pc, toOwner, e!);
      // f does not fit beside both, and it is stored by the worker that does not evict: the
      // owner hears of it and evicts d, the least recently pulled, without waiting for a sweep
      // (10 min by default).
      await pull(pc, toOther, f!);
      await waitFor(async () => !fleet.stored(d!), 'the eviction of d', 10_000);
      expect(fleet.stored(e!)).toBe(true);
      expect(fleet.stored(f!)).toBe(true);
    });
  }, 60_000);
});

describe('workers on one host and a full disk', () => {
  let mount = '';
  const fleet = budgetFleet(['g', 'h'], {
    root: () => {
      mount = mkdtempSync(join(tmpdir(), 'pullcache-workers-tmpfs-'));
      execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=24m', 'tmpfs', mount]);
      return mount;
    },
    retention: [],
  });
  afterAll(() => {
    if (!mount) return;
    execFileSync('umount', [mount]);
    rmSync(mount, { recursive: true, force: true });
  });

  test('the worker that finds the disk full has the owner make room', async () => {
    const { g, h } = fleet.images as Record<string, Image>;
    const { pc } = fleet;
    await fleet.withWorkers(async ({ owner, other, toOwner, toOther }) => {
      await pull(pc, toOwner, g!);
      await pull(pc, toOwner, h!);
      fillDisk(join(mount, 'filler'));
      // Only the worker that does not evict finds the disk full (its readiness probe writes).
      const probe = await fetchOn(pc, toOther, '/readyz');
      expect([probe.worker, probe.status]).toEqual([other, 503]);
      await waitFor(
        async () => (await fetchOn(pc, toOther, '/readyz')).status === 200,
        'room made by the owner',
        10_000,
      );
      // The filler leaves no room for either: the owner's eviction removes both, one after the
      // other (the probe may pass once the first is gone, while the second is being removed).
      await waitFor(
        async () => !fleet.stored(g!) && !fleet.stored(h!),
        'the eviction of both',
        10_000,
      );
      const said = (msg: string) => pc.lines.filter((l) => l.msg === msg).map((l) => l.worker);
      expect(said('storage is full: the owner evicts')).toContain(other);
      expect(said('storage is full: evicting')).toContain(owner);
    });
  }, 60_000);
});

describe('workers with the upstream timeouts off', () => {
  test('a cold blob asked of both workers is still fetched once: bodyIdle 0 does not make every follower give up', async () => {
    const registry = await TestRegistry.start();
    const throttle = await Throttle.start(registry.url);
    const pc = await startWorkers({
      upstream: throttle.url,
      workers: 2,
      yaml: ['    timeouts:', '      connect: 0', '      headers: 0', '      bodyIdle: 0'],
    });
    try {
      const { digest } = await pushRandomBlob(registry, REPO, 8 * MiB);
      throttle.bytesPerSecond = 8 * MiB;
      const results = await Promise.all(
        Array.from({ length: 6 }, () => get(`${pc.url}/v2/${REPO}/blobs/${digest}`)),
      );
      expect(new Set(results.map((r) => r.worker)).size).toBe(2);
      for (const r of results) {
        expect(r.status).toBe(200);
        expect(sha256(r.body)).toBe(digest);
      }
      expect(throttle.gets.get(digest)).toBe(1);
    } finally {
      await pc.stop();
      await throttle.close();
      await registry.close();
    }
  }, 60_000);
});
