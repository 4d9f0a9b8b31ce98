/**
 * The benchmark's fleet phases (issue 17), for `npm run bench` (bench/run.ts) and alone with
 * PULLCACHE_BENCH_ONLY=fleet:
 * - CPU-seconds per GiB served, cold and warm, every process of the server counted (/proc/PID/stat
 *   user + system of the process and its children, all threads);
 * - 32 clients each pulling every layer of the warm 5-layer image at once: wall time, aggregate
 *   throughput, and the latency of manifest requests made one after another meanwhile by a
 *   process of its own (bench/manifest-probe.ts; p50, p99);
 * - 16 clients on one cold blob spread over 2 workers, then over 3 replicas sharing a Redis
 *   (pullcache only): wall time and upstream bytes / blob size;
 * - peak RSS of each process of the server.
 */
import { createHash, randomBytes } from 'node:crypto';
import { closeSync, openSync, readdirSync, readFileSync, rmSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { spawn } from 'node:child_process';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { startRedis } from '../test/helpers/redis.js';
import type { TestRegistry } from '../test/helpers/registry.js';
import { bytesWritten, curlGet, sameBytes, timed } from './measure.js';
import type { FileBlob, PushedImage } from './seed.js';
import { startPullcacheProcess, type ServerUnderTest } from './servers.js';

const GiB = 1024 ** 3;
/** A quiet spell long enough for the host to take back what the guest freed (a second or two). */
const QUIET_MS = 4000;
const MANIFEST_ACCEPT =
  'application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json';

/** The cold path's CPU, measured for every server (nginx's proxy_cache included). */
export interface ColdFigures {
  /** Every CPU second the cold GET cost, up to the server's going idle again. */
  coldCpuSPerGiB: number;
  /** The part of it spent after the client had the last byte (a store or a check deferred). */
  coldCpuAfterSPerGiB: number;
  /**
   * The part of it on threads other than a node process's main one: libuv's, writing the blob's
   * file (and V8's helpers). Not counted for distribution, whose goroutines go on any thread.
   */
  coldCpuOffMainSPerGiB?: number;
  /** That cold GET's throughput, MB/s. */
  coldMBps: number;
  /**
   * CPU per GiB the bench spent writing a new file of the blob's size right after the cold GET:
   * what the machine charged then for fresh page-cache pages (see `machineFloor`).
   */
  newFileAfterSPerGiB: number;
  /** CPU per GiB of a cold GET (until idle) right after a file of its size was deleted. */
  recycledCpuSPerGiB: number;
  /** That GET's throughput, MB/s. */
  recycledMBps: number;
  /** Bytes the upstream sent for the one cold GET, over the blob's size. */
  coldUpstreamRatio: number;
  warmCpuSPerGiB: number;
}

export interface FleetFigures extends ColdFigures {
  load32WallS: number;
  load32MBps: number;
  load32AllCorrect: boolean;
  manifestP50Ms: number;
  manifestP99Ms: number;
  manifestsDuringLoad: number;
  /** The largest peak resident set of any one process of the server, MB. */
  peakRssMB: number;
  processes: number;
}

export interface WorkersFigures {
  wallS: number;
  upstreamRatio: number;
  allCorrect: boolean;
  peakRssMB: number;
  /** The 32 clients on the warm image (`measureFleet`'s load), over the 2 workers. */
  load32?: { wallS: number; MBps: number; allCorrect: boolean };
  /** The same 16 clients spread over 3 replicas sharing a storage and a Redis. */
  replicas?: Omit<WorkersFigures, 'replicas'>;
}

/** The process and every process below it. */
export function processTree(pid: number): number[] {
  const parents = new Map<number, number>();
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const stat = readFileSync(`/proc/${entry}/stat`, 'utf8');
      parents.set(Number(entry), Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]));
    } catch {
      // gone meanwhile
    }
  }
  const tree = [pid];
  for (let i = 0; i < tree.length; i++)
    for (const [child, parent] of parents) if (parent === tree[i]) tree.push(child);
  return tree;
}

/** User + system CPU seconds in a `/proc` stat file: a process's, or one thread's (`task/`). */
export function statCpu(path: string): number {
  const stat = readFileSync(path, 'utf8');
  const f = stat.slice(stat.lastIndexOf(') ') + 2).split(' ');
  return (Number(f[11]) + Number(f[12])) / 100;
}

/** CPU seconds this process has used (user + system). */
function cpuNow(): number {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1e6;
}

/** CPU seconds (user + system, every thread) of the process and its children now. */
export function treeCpu(pid: number): number {
  let total = 0;
  for (const p of processTree(pid)) {
    try {
      total += statCpu(`/proc/${p}/stat`);
    } catch {
      // gone meanwhile
    }
  }
  return total;
}

/** CPU seconds of the tree's threads other than each process's main thread. */
export function treeCpuOffMain(pid: number): number {
  let total = 0;
  for (const p of processTree(pid)) {
    try {
      for (const tid of readdirSync(`/proc/${p}/task`))
        if (tid !== String(p)) total += statCpu(`/proc/${p}/task/${tid}/stat`);
    } catch {
      // gone meanwhile
    }
  }
  return total;
}

/** Peak resident set (VmHWM) of each process of the tree, bytes. */
export function treePeakRss(pid: number): number[] {
  return processTree(pid).map((p) => {
    try {
      const m = /^VmHWM:\s+(\d+) kB/m.exec(readFileSync(`/proc/${p}/status`, 'utf8'));
      return m ? Number(m[1]) * 1024 : 0;
    } catch {
      return 0;
    }
  });
}

/**
 * The tree's CPU seconds once it has gone idle: a server may go on working after its client
 * has the last byte (distribution 2.8's proxy stores a blob by fetching it again, after the
 * response), and that work is part of what the request cost. Idle: less than 10 ms of CPU in
 * 500 ms; at most 60 s.
 */
export async function settledCpu(pid: number): Promise<number> {
  let last = treeCpu(pid);
  for (const deadline = Date.now() + 60_000; Date.now() < deadline;) {
    await new Promise((r) => setTimeout(r, 500));
    const now = treeCpu(pid);
    if (now - last < 0.01) return now;
    last = now;
  }
  return last;
}

/**
 * What this machine charges for the two things no verifying cache can skip on a cold blob,
 * CPU seconds per GiB of this process: SHA-256 (node's, OpenSSL), and writing a new file. The
 * file is written twice: after 4 s with nothing freed, then again right after the first is
 * deleted, into the pages that freed. A VM whose host takes freed guest memory back within a
 * second or two (virtio-balloon free page reporting) charges a new file's fresh pages many times
 * recycled ones; whether the first write here gets fresh pages depends on what the host holds, so
 * `measureFleet` also writes a file right after each cold GET, in the state that GET met.
 * The cold figures read against these, on a machine other than the one the targets were set on.
 */
export async function machineFloor(dir: string): Promise<MachineFloor> {
  const block = randomBytes(1024 * 1024);
  const blocks = 512;
  const c0 = cpuNow();
  const hash = createHash('sha256');
  for (let i = 0; i < blocks; i++) hash.update(block);
  hash.digest();
  const sha256 = (cpuNow() - c0) / (blocks / 1024);
  await new Promise((r) => setTimeout(r, QUIET_MS));
  const newFile = newFileCpu(dir, blocks);
  const recycledFile = newFileCpu(dir, blocks);
  return { sha256, newFile, recycledFile };
}

/** CPU seconds per GiB this process spends writing a new file of `mib` MiB (then deleted). */
export function newFileCpu(dir: string, mib: number): number {
  const block = Buffer.alloc(1024 * 1024, 0x5a);
  const path = join(dir, 'new-file');
  const fd = openSync(path, 'w');
  const start = cpuNow();
  try {
    for (let i = 0; i < mib; i++) writeSync(fd, block);
  } finally {
    closeSync(fd);
  }
  const spent = (cpuNow() - start) / (mib / 1024);
  rmSync(path, { force: true });
  return spent;
}

export interface MachineFloor {
  sha256: number;
  /** A new file, after 4 s with nothing freed (fresh pages, if the host has taken them back). */
  newFile: number;
  /** The same right after a file of its size was deleted. */
  recycledFile: number;
}

const percentile = (sorted: number[], p: number) =>
  sorted[Math.min(sorted.length - 1, Math.floor((sorted.length * p) / 100))] ?? NaN;

/**
 * Manifest GETs one after another on a kept-alive connection, from a process of its own
 * (bench/manifest-probe.ts), while `load` runs: latencies, ms. Starts `load` once the prober is
 * ready.
 */
async function manifestLatencies<T>(
  url: string,
  load: () => Promise<T>,
): Promise<{ latencies: number[]; loaded: T }> {
  const probe = spawn(
    process.execPath,
    [
      '--import',
      'tsx',
      fileURLToPath(new URL('./manifest-probe.ts', import.meta.url)),
      url,
      MANIFEST_ACCEPT,
    ],
    { stdio: ['pipe', 'pipe', 'inherit'] },
  );
  const exited = new Promise<number | null>((resolve) => probe.once('exit', resolve));
  const lines = createInterface({ input: probe.stdout! });
  const next = lines[Symbol.asyncIterator]();
  try {
    if ((await next.next()).value !== 'ready') throw new Error('the manifest prober did not start');
    const loaded = await load();
    probe.stdin!.end();
    const { value } = await next.next();
    if ((await exited) !== 0 || typeof value !== 'string')
      throw new Error('the manifest prober failed (its stderr is above)');
    return { latencies: JSON.parse(value) as number[], loaded };
  } finally {
    probe.kill();
  }
}

/**
 * CPU per GiB cold (`cold`, not yet asked of this server), then cold again for another blob right
 * after a file of its size was deleted, and warm (the first blob three times more).
 */
export async function measureColdCpu(
  server: ServerUnderTest,
  upstream: TestRegistry,
  blobs: { cpu: FileBlob; recycled: FileBlob },
  log: (message: string) => void,
  scratch: string,
): Promise<ColdFigures> {
  const { cpu: cold } = blobs;
  const blobUrl = (digest: string) => `${server.url}/v2/bench/cpu/blobs/${digest}`;
  log(`${server.name}: CPU per GiB, cold and warm`);
  await settledCpu(server.pid);
  // Every server's first cold GET in the same state, whatever ran before it (a server's storage
  // deleted just before leaves pages the next one's new file would reuse): after a quiet spell,
  // as machineFloor's first file, when the host has taken freed pages back.
  await new Promise((r) => setTimeout(r, QUIET_MS));
  let cpu = treeCpu(server.pid);
  const offMain = treeCpuOffMain(server.pid);
  const sent = bytesWritten(upstream.pid!);
  const first = await curlGet(blobUrl(cold.digest));
  if (first.status !== 200 || first.bytes !== cold.size)
    throw new Error(`${server.name}: cold GET gave HTTP ${first.status}, ${first.bytes} bytes`);
  const atLastByte = treeCpu(server.pid);
  const settled = await settledCpu(server.pid);
  const coldCpu = settled - cpu;
  const coldOffMain = treeCpuOffMain(server.pid) - offMain;
  // What the machine charged just then for a file of the blob's size, written by this process.
  const newFile = newFileCpu(scratch, Math.round(cold.size / (1024 * 1024)));
  const coldUpstream = bytesWritten(upstream.pid!) - sent;
  cpu = settled;
  for (let i = 0; i < 3; i++) await curlGet(blobUrl(cold.digest));
  const warmCpu = (await settledCpu(server.pid)) - cpu;

  // The state of a cache host whose memory is full of page cache: a new file takes pages just
  // freed (here, by deleting a file of the blob's size), not fresh ones the host must hand back.
  log(`${server.name}: another cold GET, a file of its size deleted just before`);
  const other = blobs.recycled;
  await settledCpu(server.pid);
  newFileCpu(scratch, Math.round(other.size / (1024 * 1024)));
  cpu = treeCpu(server.pid);
  const again = await curlGet(blobUrl(other.digest));
  if (again.status !== 200 || again.bytes !== other.size)
    throw new Error(`${server.name}: cold GET gave HTTP ${again.status}, ${again.bytes} bytes`);
  const recycledCpu = (await settledCpu(server.pid)) - cpu;
  return {
    coldCpuSPerGiB: coldCpu / (cold.size / GiB),
    coldCpuAfterSPerGiB: (settled - atLastByte) / (cold.size / GiB),
    ...(server.name === 'pullcache'
      ? { coldCpuOffMainSPerGiB: coldOffMain / (cold.size / GiB) }
      : {}),
    coldMBps: cold.size / first.total / 1e6,
    coldUpstreamRatio: coldUpstream / cold.size,
    newFileAfterSPerGiB: newFile,
    recycledCpuSPerGiB: recycledCpu / (other.size / GiB),
    recycledMBps: other.size / again.total / 1e6,
    warmCpuSPerGiB: warmCpu / ((3 * cold.size) / GiB),
  };
}

/** 32 clients' warm load: wall time, aggregate throughput, every byte right. */
type Load32 = NonNullable<WorkersFigures['load32']>;

const layerUrl = (server: ServerUnderTest, image: PushedImage, layer: FileBlob) =>
  `${server.url}/v2/${image.repository}/blobs/${layer.digest}`;

/** Asks every layer of `image` once, so that the 32 clients find them warm whatever ran before. */
async function warmLayers(server: ServerUnderTest, image: PushedImage): Promise<void> {
  for (const l of image.layers) await curlGet(layerUrl(server, image, l));
}

/** 32 clients (curl) each pulling every layer of `image`, all at once. */
async function load32(server: ServerUnderTest, image: PushedImage): Promise<Load32> {
  const t = await timed(() =>
    Promise.all(
      Array.from({ length: 32 }, async () => {
        for (const l of image.layers) {
          const got = await curlGet(layerUrl(server, image, l));
          if (got.status !== 200 || got.bytes !== l.size) return false;
        }
        return true;
      }),
    ),
  );
  const imageBytes = image.layers.reduce((n, l) => n + l.size, 0);
  return {
    wallS: t.seconds,
    MBps: (32 * imageBytes) / t.seconds / 1e6,
    allCorrect: t.value.every(Boolean),
  };
}

/** The cold path's CPU (`measureColdCpu`), then the 32 clients on the warm image. */
export async function measureFleet(
  server: ServerUnderTest,
  upstream: TestRegistry,
  blobs: { cpu: FileBlob; recycled: FileBlob; image: PushedImage },
  log: (message: string) => void,
  scratch: string,
): Promise<FleetFigures> {
  const cold = await measureColdCpu(server, upstream, blobs, log, scratch);
  const { image } = blobs;
  log(`${server.name}: 32 clients pulling every layer of the warm image`);
  await warmLayers(server, image);
  const manifestUrl = `${server.url}/v2/${image.repository}/manifests/${image.digest}`;
  await curlGet(manifestUrl, { Accept: MANIFEST_ACCEPT });
  const { latencies, loaded } = await manifestLatencies(manifestUrl, () => load32(server, image));
  const sorted = [...latencies].sort((a, b) => a - b);
  const peaks = treePeakRss(server.pid);
  return {
    ...cold,
    load32WallS: loaded.wallS,
    load32MBps: loaded.MBps,
    load32AllCorrect: loaded.allCorrect,
    manifestP50Ms: percentile(sorted, 50),
    manifestP99Ms: percentile(sorted, 99),
    manifestsDuringLoad: latencies.length,
    peakRssMB: Math.max(...peaks) / 1e6,
    processes: peaks.length,
  };
}

/** 16 clients on one cold blob, spread over the 2 workers of one pullcache. */
export async function measureWorkers(
  dir: string,
  upstream: TestRegistry,
  blob: FileBlob,
  repository: string,
  log: (message: string) => void,
  image: PushedImage,
): Promise<WorkersFigures> {
  const server = await startPullcacheProcess(dir, upstream.url, { workers: 2 });
  try {
    // Both workers listening: answers from two different pids.
    const seen = new Set<string>();
    for (let i = 0; i < 200 && seen.size < 2; i++) {
      const res = await fetch(`${server.url}/v2/`, { headers: { connection: 'close' } });
      await res.arrayBuffer();
      seen.add(res.headers.get('pullcache-worker') ?? '');
      if (seen.size < 2) await new Promise((r) => setTimeout(r, 100));
    }
    if (seen.size < 2) throw new Error('pullcache: the second worker never answered');
    log('pullcache: 16 clients on one cold blob over 2 workers');
    const before = bytesWritten(upstream.pid!);
    const url = `${server.url}/v2/${repository}/blobs/${blob.digest}`;
    const t = await timed(() =>
      Promise.all(Array.from({ length: 16 }, () => sameBytes(url, blob.path))),
    );
    const upstreamBytes = bytesWritten(upstream.pid!) - before;
    // Warm throughput over the cores: the same load as on the lone process, layers warm first.
    log('pullcache: 32 clients pulling every layer of the warm image over 2 workers');
    await warmLayers(server, image);
    const load = await load32(server, image);
    return {
      wallS: t.seconds,
      upstreamRatio: upstreamBytes / blob.size,
      allCorrect: t.value.every(Boolean),
      peakRssMB: Math.max(...treePeakRss(server.pid)) / 1e6,
      load32: load,
      replicas: await measureReplicas(dir, upstream, blob, repository, log),
    };
  } finally {
    await server.stop();
  }
}

/** 16 clients on one cold blob spread over 3 replicas (a real redis-server for their leases). */
async function measureReplicas(
  dir: string,
  upstream: TestRegistry,
  blob: FileBlob,
  repository: string,
  log: (message: string) => void,
): Promise<Omit<WorkersFigures, 'replicas'>> {
  const redis = await startRedis();
  const replicas: ServerUnderTest[] = [];
  try {
    // One storage for the three, as replicas share a bucket (a directory here).
    const replica = { redisUrl: redis.url, peerSecret: 'bench-fleet', root: join(dir, 'shared') };
    for (let i = 0; i < 3; i++)
      replicas.push(
        await startPullcacheProcess(join(dir, `replica-${i}`), upstream.url, { replica }),
      );
    log('pullcache: 16 clients on one cold blob over 3 replicas');
    const before = bytesWritten(upstream.pid!);
    const t = await timed(() =>
      Promise.all(
        Array.from({ length: 16 }, (_, i) =>
          sameBytes(`${replicas[i % 3]!.url}/v2/${repository}/blobs/${blob.digest}`, blob.path),
        ),
      ),
    );
    const upstreamBytes = bytesWritten(upstream.pid!) - before;
    return {
      wallS: t.seconds,
      upstreamRatio: upstreamBytes / blob.size,
      allCorrect: t.value.every(Boolean),
      peakRssMB: Math.max(...replicas.flatMap((r) => treePeakRss(r.pid))) / 1e6,
    };
  } finally {
    await Promise.all(replicas.map((r) => r.stop()));
    await redis.stop();
  }
}

const fmt = (v: number) => (v >= 100 ? v.toFixed(0) : v >= 10 ? v.toFixed(1) : v.toFixed(2));

/** The fleet rows of the benchmark table, for each server measured (nginx: the cold path only). */
export function fleetTable(
  results: Partial<Record<ServerUnderTest['name'], Partial<FleetFigures>>>,
  workers: WorkersFigures | undefined,
  floor: MachineFloor,
): string {
  const names = (['distribution', 'nginx', 'pullcache'] as const).filter((n) => results[n]);
  const row = (label: string, target: string, value: (f: Partial<FleetFigures>) => string) =>
    `| ${label} | ${names.map((n) => value(results[n]!)).join(' | ')} | ${target} |`;
  /** A figure with its unit, or nothing where the server was not measured for it. */
  const shown = (v: number | undefined, unit: string) =>
    v === undefined ? '' : `${fmt(v)}${unit}`;
  /** pullcache's figure over nginx's, in the pullcache column. */
  const overNginx = (
    label: string,
    target: string,
    pick: (f: Partial<FleetFigures>) => number | undefined,
  ) => {
    const [ours, plain] = [pick(results.pullcache ?? {}), pick(results.nginx ?? {})];
    if (ours === undefined || plain === undefined) return [];
    return [
      `| ${label} | ${[...names.slice(1).map(() => ''), `${fmt(ours / plain)}x`].join(' | ')} | ${target} |`,
    ];
  };
  const lines = [
    `| fleet figure | ${names.join(' | ')} | target |`,
    `|---|${names.map(() => '---|').join('')}---|`,
    row('CPU per GiB, cold (until idle again)', '<= 2.0 s (pullcache); lab nginx about 1.2', (f) =>
      shown(f.coldCpuSPerGiB, ' s'),
    ),
    ...overNginx(
      "pullcache's cold CPU over nginx's proxy_cache (a plain cache, no digest check)",
      '<= 1.67x (2.0 over 1.2 in the lab)',
      (f) => f.coldCpuSPerGiB,
    ),
    row('of which after the last byte', '', (f) => shown(f.coldCpuAfterSPerGiB, ' s')),
    row('of which off the main thread (node: writing the file)', '', (f) =>
      shown(f.coldCpuOffMainSPerGiB, ' s'),
    ),
    row('that cold GET (512 MiB): throughput', '', (f) => shown(f.coldMBps, ' MB/s')),
    row('cold GET: upstream bytes / size', '', (f) => shown(f.coldUpstreamRatio, 'x')),
    row('the bench writing a new file of that size right after, CPU per GiB', '', (f) =>
      shown(f.newFileAfterSPerGiB, ' s'),
    ),
    row(
      'another cold blob, a file of its size deleted just before: CPU per GiB',
      '<= 2.0 s (pullcache)',
      (f) => shown(f.recycledCpuSPerGiB, ' s'),
    ),
    ...overNginx('that one: pullcache over nginx', '<= 1.67x', (f) => f.recycledCpuSPerGiB),
    row('that cold GET (512 MiB): throughput', '>= distribution', (f) =>
      shown(f.recycledMBps, ' MB/s'),
    ),
    `| this machine: SHA-256; a new file, after 4 s quiet / just freed; CPU per GiB | ${names
      .map(() => '')
      .slice(1)
      .concat(`${fmt(floor.sha256)}; ${fmt(floor.newFile)} / ${fmt(floor.recycledFile)} s`)
      .join(' | ')} | lab: SHA-256 about 0.55 |`,
    row('CPU per GiB, warm', '', (f) => shown(f.warmCpuSPerGiB, ' s')),
    row('32 clients x 5 warm layers: wall', '', (f) => shown(f.load32WallS, ' s')),
    row('32 clients: throughput', '', (f) => shown(f.load32MBps, ' MB/s')),
    row('32 clients: every byte right', 'all', (f) =>
      f.load32AllCorrect === undefined ? '' : f.load32AllCorrect ? 'yes' : '**no**',
    ),
    row('manifest latency during the load, p50 / p99', 'p99 <= 50 ms', (f) =>
      f.manifestP50Ms === undefined || f.manifestP99Ms === undefined
        ? ''
        : `${fmt(f.manifestP50Ms)} / ${fmt(f.manifestP99Ms)} ms (${f.manifestsDuringLoad})`,
    ),
    row('peak RSS, largest process', '<= 150 MB', (f) => shown(f.peakRssMB, ' MB')),
  ];
  if (workers) {
    const blank = names.map(() => '').slice(1);
    const one = (label: string, value: string, target: string) =>
      `| ${label} | ${[...blank, value].join(' | ')} | ${target} |`;
    /** The three rows of 16 clients on one cold blob spread over `over` (2 workers, ...). */
    const spread = (over: string, f: Omit<WorkersFigures, 'replicas'>) => [
      one(`16 clients, cold blob, ${over}: wall`, `${fmt(f.wallS)} s`, ''),
      one(
        `16 clients, ${over}: upstream bytes / size`,
        `${fmt(f.upstreamRatio)}x${f.allCorrect ? '' : ' (**wrong bytes**)'}`,
        '<= 1.05',
      ),
      one(`${over}: peak RSS, largest process`, `${fmt(f.peakRssMB)} MB`, '<= 150 MB'),
    ];
    lines.push(...spread('2 workers', workers));
    if (workers.load32)
      lines.push(
        one(
          '32 clients x 5 warm layers, 2 workers: wall / throughput',
          `${fmt(workers.load32.wallS)} s / ${fmt(workers.load32.MBps)} MB/s${workers.load32.allCorrect ? '' : ' (**wrong bytes**)'}`,
          'above one process',
        ),
      );
    if (workers.replicas) lines.push(...spread('3 replicas', workers.replicas));
  }
  return lines.join('\n');
}
