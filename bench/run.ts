/**
 * `npm run bench`: pullcache against distribution's pull-through proxy, in one run, on loopback.
 * Starts an upstream (docker-registry with token auth) seeded with generated images, then each
 * server in turn with an empty cache, and measures the figures of issue 5. First it measures what
 * no proxy can beat (the upstream serving by itself, skopeo with no server), so each run shows its
 * own ceilings. Prints the tables and writes bench/results/latest.json (and .md). A tool, not a
 * test: nothing here asserts.
 *
 * PULLCACHE_BENCH_SCALE=0.1 shrinks every blob for a quick try (figures are then not comparable);
 * PULLCACHE_BENCH_ONLY=pullcache (or distribution) measures one server and prints its figures;
 * PULLCACHE_BENCH_ONLY=fleet runs only the fleet phases (bench/fleet.ts) and prints their table.
 * Both the full run and the fleet phases also measure nginx's proxy_cache on the cold path: a
 * plain cache's CPU per GiB on this machine, the yardstick of issue 17.
 */
import { execFile } from 'node:child_process';
import { cpus, totalmem, tmpdir } from 'node:os';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { TestRegistry } from '../test/helpers/registry.js';
import { bytesWritten, curlGet, hashGet, median, sameBytes, timed, wrk } from './measure.js';
import {
  pushFileBlob,
  pushImage,
  randomBlob,
  realisticLayer,
  type FileBlob,
  type PushedImage,
} from './seed.js';
import {
  startDistributionProxy,
  startNginxCache,
  startPullcacheProcess,
  type ServerUnderTest,
} from './servers.js';
import { measureAuthenticated } from './auth.js';
import {
  fleetTable,
  machineFloor,
  settledCpu,
  measureColdCpu,
  measureFleet,
  measureWorkers,
  type FleetFigures,
  type WorkersFigures,
} from './fleet.js';

const run = promisify(execFile);
const MiB = 1024 * 1024;
const scale = Number(process.env.PULLCACHE_BENCH_SCALE ?? 1);
const sized = (n: number) => Math.max(1024, Math.round(n * scale));
const MANIFEST_ACCEPT =
  'application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json';

interface Figures {
  coldTtfbMs: number;
  coldMBps: number;
  cachedMBps: number;
  skopeoColdS: number;
  skopeoWarmS: number;
  concurrentWallS: number;
  concurrentAllCorrect: boolean;
  concurrentUpstreamRatio: number;
  manifestsByDigestRps: number;
  manifestsByTagRps: number;
  manifestErrors: number;
  /** By digest with a token of pullcache's realm, authentication on (bench/auth.ts); pullcache only. */
  manifestsAuthenticatedRps?: number;
  peakRssMB: number;
}

function log(message: string): void {
  process.stderr.write(`[bench ${new Date().toISOString().slice(11, 19)}] ${message}\n`);
}

/** The server's resident set now and at its peak, for the log: where memory goes, phase by phase. */
function rss(server: ServerUnderTest): string {
  const status = readFileSync(`/proc/${server.pid}/status`, 'utf8');
  const kb = (field: string) =>
    Number(new RegExp(`^${field}:\\s+(\\d+)`, 'm').exec(status)?.[1] ?? 0);
  // Private (anonymous) memory apart from the executable's shared, file-backed pages.
  const anon = /^Anonymous:\s+(\d+)/m.exec(
    readFileSync(`/proc/${server.pid}/smaps_rollup`, 'utf8'),
  );
  const priv = anon ? `, private ${(Number(anon[1]) / 1024).toFixed(0)} MiB` : '';
  return `rss ${(kb('VmRSS') / 1024).toFixed(0)} MiB${priv}, peak ${(kb('VmHWM') / 1024).toFixed(0)} MiB`;
}

/** Runs one phase; a phase that hangs fails the run with its name instead of stalling it. */
async function phase<T>(server: ServerUnderTest, name: string, work: () => Promise<T>): Promise<T> {
  log(`${server.name}: ${name} (${rss(server)})`);
  let timer: NodeJS.Timeout | undefined;
  const limit = new Promise<never>((_, reject) => {
    timer = setTimeout(
      () => reject(new Error(`${server.name}: "${name}" did not finish within ${PHASE_LIMIT_S} s`)),
      PHASE_LIMIT_S * 1000,
    );
  });
  try {
    return await Promise.race([work(), limit]);
  } finally {
    clearTimeout(timer);
  }
}

const PHASE_LIMIT_S = 300;

async function measure(
  server: ServerUnderTest,
  upstream: TestRegistry,
  seed: Seed,
  work: string,
): Promise<Figures> {
  const blobUrl = (repo: string, digest: string) => `${server.url}/v2/${repo}/blobs/${digest}`;
  const mb = (bytes: number, seconds: number) => bytes / seconds / 1e6;

  const cold = await phase(server, 'cold 1 GiB blob', async () => {
    const t = await curlGet(blobUrl('bench/big', seed.big.digest));
    if (t.status !== 200 || t.bytes !== seed.big.size)
      throw new Error(`${server.name}: cold GET gave HTTP ${t.status}, ${t.bytes} bytes`);
    // Work the server does after the response (distribution's store) ends before the next phase.
    await settledCpu(server.pid);
    const check = await hashGet(blobUrl('bench/big', seed.big.digest));
    if (check.digest !== seed.big.digest)
      throw new Error(`${server.name}: the cached 1 GiB blob has the wrong digest`);
    return t;
  });

  const cachedRuns = await phase(server, 'cached 1 GiB blob, 3 runs', async () => {
    const runs: number[] = [];
    for (let i = 0; i < 3; i++) {
      const t = await curlGet(blobUrl('bench/big', seed.big.digest));
      runs.push(mb(t.bytes, t.total));
    }
    return runs;
  });

  const copy = async () => {
    const image = `${seed.image.repository}:${seed.image.tag}`;
    const t = await skopeoCopy(`docker://${server.host}/${image}`, work);
    rmSync(t.dest, { recursive: true, force: true });
    return t.seconds;
  };
  const skopeoColdS = await phase(server, 'skopeo copy of the 5-layer image, cold', copy);
  const skopeoWarmS = await phase(server, 'skopeo copy of the 5-layer image, warm', copy);

  const upstreamBefore = bytesWritten(upstream.pid!);
  const concurrent = await phase(server, '16 clients on one uncached 256 MiB blob', async () => {
    return timed(() =>
      Promise.all(
        Array.from({ length: 16 }, () =>
          sameBytes(blobUrl('bench/medium', seed.medium.digest), seed.medium.path),
        ),
      ),
    );
  });
  const upstreamBytes = bytesWritten(upstream.pid!) - upstreamBefore;

  const manifestUrl = (ref: string) => `${server.url}/v2/${seed.image.repository}/manifests/${ref}`;
  const [byDigest, byTag] = await phase(
    server,
    'manifests per second by digest and by tag',
    async () => {
      await curlGet(manifestUrl(seed.image.tag)); // the tag is resolved and fresh before measuring
      return [
        await wrk(manifestUrl(seed.image.digest), { Accept: MANIFEST_ACCEPT }),
        await wrk(manifestUrl(seed.image.tag), { Accept: MANIFEST_ACCEPT }),
      ];
    },
  );

  return {
    coldTtfbMs: cold.ttfb * 1000,
    coldMBps: mb(cold.bytes, cold.total),
    cachedMBps: median(cachedRuns),
    skopeoColdS,
    skopeoWarmS,
    concurrentWallS: concurrent.seconds,
    concurrentAllCorrect: concurrent.value.every(Boolean),
    concurrentUpstreamRatio: upstreamBytes / seed.medium.size,
    manifestsByDigestRps: byDigest.rps,
    manifestsByTagRps: byTag.rps,
    manifestErrors: byDigest.errors + byTag.errors,
    peakRssMB: (log(`${server.name}: done (${rss(server)})`), server.peakRss() / 1e6),
  };
}

/** `skopeo copy` of an image into a new directory under `work`: seconds taken, and where. */
async function skopeoCopy(
  source: string,
  work: string,
): Promise<{ seconds: number; dest: string }> {
  const dest = mkdtempSync(join(work, 'skopeo-'));
  const t = await timed(() =>
    run('skopeo', ['--insecure-policy', 'copy', '--src-tls-verify=false', source, `dir:${dest}`], {
      timeout: 600_000,
    }),
  );
  return { seconds: t.seconds, dest };
}

/**
 * What no proxy can beat, measured in the same run: the upstream serving the 1 GiB blob itself
 * (a cold blob reaches a proxy's client no faster), 16 of the same clients on the upstream's
 * 256 MiB blob, skopeo copying the image straight from the upstream, and skopeo copying it from
 * one directory to another with no server at all (its own cost, the floor of a warm copy).
 */
interface References {
  upstreamMBps: number;
  upstream16ClientsS: number;
  skopeoFromUpstreamS: number;
  skopeoDirToDirS: number;
}

async function references(upstream: TestRegistry, seed: Seed, work: string): Promise<References> {
  const host = new URL(upstream.url).host;
  const pull = (repo: string) => ({
    Authorization: `Bearer ${upstream.tokens.sign(null, `repository:${repo}:pull`)}`,
  });
  const big = `${upstream.url}/v2/bench/big/blobs/${seed.big.digest}`;
  log('references: the upstream itself, skopeo with no proxy');
  const runs: number[] = [];
  for (let i = 0; i < 3; i++) {
    const t = await curlGet(big, pull('bench/big'));
    if (t.status !== 200 || t.bytes !== seed.big.size)
      throw new Error(`upstream: GET gave HTTP ${t.status}, ${t.bytes} bytes`);
    runs.push(t.bytes / t.total / 1e6);
  }
  const medium = `${upstream.url}/v2/bench/medium/blobs/${seed.medium.digest}`;
  const clients = await timed(() =>
    Promise.all(
      Array.from({ length: 16 }, () => sameBytes(medium, seed.medium.path, pull('bench/medium'))),
    ),
  );
  if (!clients.value.every(Boolean)) throw new Error('upstream: a client got wrong bytes');
  const image = `${seed.image.repository}:${seed.image.tag}`;
  const fromUpstream = await skopeoCopy(`docker://${host}/${image}`, work);
  const dirToDir = await skopeoCopy(`dir:${fromUpstream.dest}`, work);
  for (const t of [fromUpstream, dirToDir]) rmSync(t.dest, { recursive: true, force: true });
  return {
    upstreamMBps: median(runs),
    upstream16ClientsS: clients.seconds,
    skopeoFromUpstreamS: fromUpstream.seconds,
    skopeoDirToDirS: dirToDir.seconds,
  };
}

interface Seed {
  big: FileBlob;
  medium: FileBlob;
  image: PushedImage;
  /** A 512 MiB blob each server gets cold once, for its CPU per GiB (bench/fleet.ts). */
  cpu: FileBlob;
  /** Another, got cold right after a file of its size was deleted (bench/fleet.ts). */
  recycled: FileBlob;
}

async function seedUpstream(upstream: TestRegistry, work: string): Promise<Seed> {
  const files = join(work, 'seed');
  mkdirSync(files);
  log('generating and pushing the 1 GiB and 256 MiB layers');
  const big = await randomBlob(files, 'big', sized(1024 * MiB));
  await pushFileBlob(upstream, 'bench/big', big);
  const medium = await randomBlob(files, 'medium', sized(256 * MiB));
  await pushFileBlob(upstream, 'bench/medium', medium);
  log('generating and pushing the 5-layer image');
  const layers: FileBlob[] = [];
  for (const [i, raw] of [210, 160, 120, 95, 65].entries())
    layers.push(await realisticLayer(files, `layer${i}`, sized(raw * MiB)));
  const image = await pushImage(upstream, 'bench/app', 'v1', layers);
  const cpu = await randomBlob(files, 'cpu', sized(512 * MiB));
  await pushFileBlob(upstream, 'bench/cpu', cpu);
  const recycled = await randomBlob(files, 'recycled', sized(512 * MiB));
  await pushFileBlob(upstream, 'bench/cpu', recycled);
  // The 256 MiB layer's file stays: the 16 clients compare their bytes with it.
  for (const l of [big, cpu, recycled, ...layers]) rmSync(l.path, { force: true });
  log(`seeded: image ${(layers.reduce((n, l) => n + l.size, 0) / MiB).toFixed(0)} MiB in 5 layers`);
  return { big, medium, image, cpu, recycled };
}

const TARGETS: {
  key: keyof Figures;
  label: string;
  unit: string;
  target: string;
  met: (p: Figures, d: Figures) => boolean;
  higherIsBetter: boolean;
}[] = [
  {
    key: 'cachedMBps',
    label: 'cached 1 GiB blob',
    unit: 'MB/s',
    target: '>= 2.5x',
    met: (p, d) => p.cachedMBps >= 2.5 * d.cachedMBps,
    higherIsBetter: true,
  },
  {
    key: 'coldMBps',
    label: 'cold 1 GiB blob',
    unit: 'MB/s',
    target: '>= 1.8x',
    met: (p, d) => p.coldMBps >= 1.8 * d.coldMBps,
    higherIsBetter: true,
  },
  {
    key: 'coldTtfbMs',
    label: 'cold time to first byte',
    unit: 'ms',
    target: '<= 1x',
    met: (p, d) => p.coldTtfbMs <= d.coldTtfbMs,
    higherIsBetter: false,
  },
  {
    key: 'skopeoColdS',
    label: 'skopeo copy, cold',
    unit: 's',
    target: '<= 1x',
    met: (p, d) => p.skopeoColdS <= d.skopeoColdS,
    higherIsBetter: false,
  },
  {
    key: 'skopeoWarmS',
    label: 'skopeo copy, warm',
    unit: 's',
    target: '<= 0.8x',
    met: (p, d) => p.skopeoWarmS <= 0.8 * d.skopeoWarmS,
    higherIsBetter: false,
  },
  {
    key: 'concurrentWallS',
    label: '16 clients, cold 256 MiB: wall',
    unit: 's',
    target: '<= 0.5x',
    met: (p, d) => p.concurrentWallS <= 0.5 * d.concurrentWallS,
    higherIsBetter: false,
  },
  {
    key: 'concurrentUpstreamRatio',
    label: '16 clients: upstream bytes / size',
    unit: 'x',
    target: '<= 1.05',
    met: (p) => p.concurrentUpstreamRatio <= 1.05 && p.concurrentAllCorrect,
    higherIsBetter: false,
  },
  {
    key: 'manifestsByDigestRps',
    label: 'manifests by digest',
    unit: 'req/s',
    target: '>= 15000 and 10x',
    met: (p, d) =>
      p.manifestsByDigestRps >= 15000 && p.manifestsByDigestRps >= 10 * d.manifestsByDigestRps,
    higherIsBetter: true,
  },
  {
    key: 'manifestsByTagRps',
    label: 'manifests by tag (fresh)',
    unit: 'req/s',
    target: '>= 15000',
    met: (p) => p.manifestsByTagRps >= 15000,
    higherIsBetter: true,
  },
  {
    key: 'manifestsAuthenticatedRps',
    label: 'manifests by digest, authenticated',
    unit: 'req/s',
    target: '>= 0.8x unauthenticated',
    met: (p) => (p.manifestsAuthenticatedRps ?? 0) >= 0.8 * p.manifestsByDigestRps,
    higherIsBetter: true,
  },
  {
    key: 'peakRssMB',
    label: 'peak RSS, whole run',
    unit: 'MB',
    target: '<= 150 MB',
    met: (p) => p.peakRssMB <= 150,
    higherIsBetter: false,
  },
];

function fmt(value: number | undefined): string {
  if (value === undefined) return '-'; // not measured for this server
  return value >= 100 ? value.toFixed(0) : value >= 10 ? value.toFixed(1) : value.toFixed(2);
}

function table(p: Figures, d: Figures): string {
  const rows = TARGETS.map((t) => {
    const ratio = d[t.key] ? (p[t.key] as number) / (d[t.key] as number) : NaN;
    return `| ${t.label} | ${fmt(d[t.key] as number | undefined)} ${t.unit} | ${fmt(p[t.key] as number)} ${t.unit} | ${Number.isFinite(ratio) ? `${fmt(ratio)}x` : '-'} | ${t.target} | ${t.met(p, d) ? 'yes' : '**no**'} |`;
  });
  return [
    '| figure | distribution | pullcache | pullcache / distribution | target | met |',
    '|---|---|---|---|---|---|',
    ...rows,
    `| 16 clients: every byte right | ${d.concurrentAllCorrect ? 'yes' : 'no'} | ${p.concurrentAllCorrect ? 'yes' : 'no'} | | all | ${p.concurrentAllCorrect ? 'yes' : '**no**'} |`,
  ].join('\n');
}

/** The references, each next to the figure it bounds and what the target asks of that figure. */
function referenceTable(r: References, d: Figures): string {
  return [
    '| reference, same run | measured | bounds | the target asks for |',
    '|---|---|---|---|',
    `| the upstream itself, 1 GiB blob (median of 3) | ${fmt(r.upstreamMBps)} MB/s | cold 1 GiB blob: a proxy's client gets it no faster | ${fmt(1.8 * d.coldMBps)} MB/s |`,
    `| 16 clients on the upstream's 256 MiB blob | ${fmt(r.upstream16ClientsS)} s | 16 clients, wall | ${fmt(0.5 * d.concurrentWallS)} s |`,
    `| skopeo copy straight from the upstream | ${fmt(r.skopeoFromUpstreamS)} s | skopeo copy, cold | ${fmt(d.skopeoColdS)} s |`,
    `| skopeo copy dir: to dir:, no server | ${fmt(r.skopeoDirToDirS)} s | skopeo copy, warm | ${fmt(0.8 * d.skopeoWarmS)} s |`,
  ].join('\n');
}

/** pullcache's warnings and errors during the run (JSON lines at level 40 and up), in short. */
function reportWarnings(file: string): void {
  const lines = readFileSync(file, 'utf8')
    .split('\n')
    .filter((l) => /^\{.*"level":(4|5|6)0/.test(l));
  const byMessage = new Map<string, number>();
  for (const l of lines) {
    const msg = (JSON.parse(l) as { msg: string }).msg;
    byMessage.set(msg, (byMessage.get(msg) ?? 0) + 1);
  }
  log(
    `pullcache logged ${lines.length} warnings/errors${[...byMessage].map(([m, n]) => `; ${n}x "${m}"`).join('')}`,
  );
}

/** The tools the run starts, checked first: a missing one named at once, not minutes in. */
const TOOLS = [
  'docker-registry',
  'skopeo',
  'wrk',
  'curl',
  'cmp',
  'openssl',
  'redis-server',
  'nginx',
];

async function main(): Promise<void> {
  const missing = TOOLS.filter(
    (tool) => !process.env.PATH?.split(':').some((dir) => existsSync(join(dir, tool))),
  );
  if (missing.length > 0) {
    console.error(
      `the benchmark needs ${missing.join(', ')} on the PATH (Debian: apt-get install docker-registry skopeo wrk curl openssl redis-server nginx)`,
    );
    process.exit(2);
  }
  const work = mkdtempSync(join(tmpdir(), 'pullcache-bench-'));
  const upstream = await TestRegistry.start();
  const servers: ServerUnderTest[] = [];
  try {
    const seed = await seedUpstream(upstream, work);
    const floor = await machineFloor(work);
    log(
      `this machine: SHA-256 ${floor.sha256.toFixed(2)}, a new file ${floor.newFile.toFixed(2)} (after 4 s quiet) / ${floor.recycledFile.toFixed(2)} (into pages just freed) CPU-s per GiB`,
    );
    // PULLCACHE_BENCH_ONLY=pullcache measures pullcache alone, for quick tries: no table, no files;
    // =fleet only the fleet phases, of both servers.
    const only = process.env.PULLCACHE_BENCH_ONLY;
    const fleetOnly = only === 'fleet';
    const refs = fleetOnly ? undefined : await references(upstream, seed, work);
    const results: Partial<Record<ServerUnderTest['name'], Figures>> = {};
    const fleet: Partial<Record<ServerUnderTest['name'], Partial<FleetFigures>>> = {};
    const starts = [startDistributionProxy, startPullcacheProcess].filter(
      (s) =>
        only === undefined || fleetOnly || (s === startPullcacheProcess) === (only === 'pullcache'),
    );
    for (const start of starts) {
      const server = await start(
        join(work, start === startPullcacheProcess ? 'pullcache' : 'distribution'),
        upstream.url,
      );
      servers.push(server);
      if (!fleetOnly) results[server.name] = await measure(server, upstream, seed, work);
      if (!fleetOnly && server.name === 'pullcache') {
        const path = `/v2/${seed.image.repository}/manifests/${seed.image.digest}`;
        const auth = await measureAuthenticated(
          join(work, 'auth'),
          upstream.url,
          path,
          MANIFEST_ACCEPT,
        );
        log(
          `pullcache, authenticated: ${auth.tokenRps.toFixed(0)} req/s by token, ${auth.basicRps.toFixed(0)} by Basic`,
        );
        results.pullcache!.manifestsAuthenticatedRps = auth.tokenRps;
        results.pullcache!.manifestErrors += auth.errors;
      }
      fleet[server.name] = await measureFleet(server, upstream, seed, log, work);
      await server.stop();
      if (server.name === 'pullcache') reportWarnings(join(work, server.name, 'pullcache.log'));
      rmSync(join(work, server.name), { recursive: true, force: true });
    }
    // A plain cache's cold path on this machine, for the issue's yardstick (nginx's proxy_cache:
    // about 1.2 CPU-s per GiB in the lab, where pullcache's target is 2.0).
    if (only === undefined || fleetOnly) {
      const nginx = await startNginxCache(join(work, 'nginx'), upstream, ['bench/cpu']);
      servers.push(nginx);
      fleet.nginx = await measureColdCpu(nginx, upstream, seed, log, work);
      await nginx.stop();
      rmSync(join(work, 'nginx'), { recursive: true, force: true });
    }
    const workers: WorkersFigures | undefined = starts.includes(startPullcacheProcess)
      ? await measureWorkers(
          join(work, 'workers'),
          upstream,
          seed.medium,
          'bench/medium',
          log,
          seed.image,
        )
      : undefined;
    if (only !== undefined) {
      process.stdout.write(
        `${JSON.stringify({ ...results, fleet, workers, floor, references: refs }, null, 2)}\n\n${fleetTable(fleet, workers, floor)}\n`,
      );
      return;
    }
    const machine = `${cpus().length} cores (${cpus()[0]?.model.trim()}), ${(totalmem() / 2 ** 30).toFixed(0)} GiB, Node ${process.version}`;
    const date = new Date().toISOString().slice(0, 10);
    const md = `Run on ${date}, ${machine}${scale !== 1 ? `, scale ${scale}` : ''}.\n\n${table(results.pullcache!, results.distribution!)}\n\n${referenceTable(refs!, results.distribution!)}\n\n${fleetTable(fleet, workers, floor)}\n`;
    mkdirSync('bench/results', { recursive: true });
    writeFileSync(
      'bench/results/latest.json',
      JSON.stringify(
        { date, machine, scale, floor, results, fleet, workers, references: refs },
        null,
        2,
      ),
    );
    writeFileSync('bench/results/latest.md', md);
    process.stdout.write(`\n${md}\n`);
  } finally {
    for (const s of servers) await s.stop();
    await upstream.close();
    rmSync(work, { recursive: true, force: true });
  }
}

await main();
// Keep-alive sockets of fetch's global pool would hold the process for a while; the work is done.
process.exit(0);
