/**
 * A soak test (docs/memory.md): the real upstream (distribution 2.8 with token auth), pullcache
 * started as users start it (bin/pullcache serve, a 16 MiB budget so that eviction runs all the
 * time), a varied steady load for minutes, and a sample every 15 s of what must not grow: RSS,
 * heap, fds by kind, sockets by state, handles, storage's temporary files. After the load it waits
 * a minute: what is transient must be back to its baseline.
 *
 *   npm run soak                     # 12 minutes, one process
 *   LOAD_MIN=6 REDIS=1 npm run soak  # cache.store: redis, Redis stopped for 30 s mid-way
 *   SERVER_WORKERS=2 KILL_WORKER=1 npm run soak  # two workers, one killed every minute
 *
 * Env: LOAD_MIN (12), WORKERS (24 concurrent clients), OUT (a new directory under the system's
 * temporary one: the samples, logs and storage stay there), NO_SNAPSHOT (no heap snapshots; by
 * default two, through --heapsnapshot-signal, which inflate RSS afterwards).
 */
import { spawnSync, spawn, execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import {
  createWriteStream,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  readlinkSync,
  statSync,
  writeFileSync,
  appendFileSync,
  existsSync,
} from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { MANIFEST_ACCEPT } from '../src/oci/media-types.js';
import { TestRegistry } from '../test/helpers/registry.js';
import {
  makeImage,
  makeIndex,
  pushImage,
  pushManifest,
  type Image,
} from '../test/helpers/images.js';
import { freePort, waitFor } from '../test/helpers/net.js';

const OUT = process.env.OUT ?? mkdtempSync(join(tmpdir(), 'pullcache-soak-'));
const LOAD_MS = Number(process.env.LOAD_MIN ?? 12) * 60_000;
const WORKERS = Number(process.env.WORKERS ?? 24);
const SAMPLE_MS = 15_000;
const N_SMALL = Number(process.env.N_SMALL ?? 250);
const N_BIG = 10;
const N_ALIAS = Number(process.env.N_ALIAS ?? 1200);
/** With REDIS: a redis-server of the soak's own (cache.store: redis). */
const REDIS_PORT = process.env.REDIS ? await freePort() : undefined;
const startRedis = (port: number) =>
  spawnSync('redis-server', [
    '--port',
    String(port),
    '--bind',
    '127.0.0.1',
    '--save',
    '',
    '--appendonly',
    'no',
    '--daemonize',
    'yes',
  ]);
if (REDIS_PORT) startRedis(REDIS_PORT);

if (existsSync(OUT) && readdirSync(OUT).length > 0) throw new Error(`${OUT} is not empty`);
mkdirSync(OUT, { recursive: true });
const DATA = join(OUT, 'data');
const log = (...a: unknown[]) => {
  const line = `[${new Date().toISOString()}] ${a.map((x) => (typeof x === 'string' ? x : JSON.stringify(x))).join(' ')}`;
  console.log(line);
  appendFileSync(join(OUT, 'driver.log'), line + '\n');
};

const ACCEPT = MANIFEST_ACCEPT;

interface Known {
  repo: string;
  tag: string;
  image: Image;
}

// ---------------------------------------------------------------- upstream + seed
const registry = await TestRegistry.start();
log('upstream', registry.url);
const images: Known[] = [];
const big: Known[] = [];
const t0 = Date.now();
for (let i = 0; i < N_SMALL; i++) {
  const repo = `lib/r${i}`;
  const kind = i % 2 ? 'oci' : 'docker';
  const image =
    i % 10 === 0
      ? makeIndex(repo, 'v1', kind, ['amd64', 'arm64'])
      : makeImage(repo, 'v1', kind, [
          10_000 + ((i * 7919) % 70_000),
          5_000 + ((i * 104729) % 40_000),
        ]);
  await pushImage(registry, image);
  images.push({ repo, tag: 'v1', image });
}
for (let i = 0; i < N_BIG; i++) {
  const repo = `lib/big${i}`;
  const image = makeImage(repo, 'v1', 'oci', [3_000_000]);
  await pushImage(registry, image);
  big.push({ repo, tag: 'v1', image });
}
log(`seeded ${N_SMALL} small + ${N_BIG} big images in ${Date.now() - t0} ms`);

// Aliases: many distinct repository names upstream, sharing content through cross-repo mounts.
async function mount(repo: string, from: string, digest: string): Promise<void> {
  const auth = {
    authorization: `Bearer ${registry.tokens.sign('pusher', `repository:${repo}:pull,push repository:${from}:pull`)}`,
  };
  const res = await fetch(
    `${registry.url}/v2/${repo}/blobs/uploads/?mount=${digest}&from=${from}`,
    { method: 'POST', headers: auth },
  );
  await res.arrayBuffer();
  if (res.status !== 201) throw new Error(`mount ${repo} ${digest}: ${res.status}`);
}
const aliases: Known[] = [];
const t1 = Date.now();
for (let j = 0; j < N_ALIAS; j++) {
  const src = images[(j * 37) % N_SMALL]!;
  if (src.image.children) continue; // keep aliases to plain images
  const repo = `lib/a${j}`;
  await Promise.all(src.image.blobs.map((b) => mount(repo, src.repo, b.digest)));
  await pushManifest(registry, repo, 'v1', src.image.manifest, src.image.mediaType);
  aliases.push({ repo, tag: 'v1', image: src.image });
}
log(`seeded ${aliases.length} alias repositories in ${Date.now() - t1} ms`);

// ---------------------------------------------------------------- pullcache
const port = await freePort();
mkdirSync(DATA, { recursive: true });
const configPath = join(OUT, 'pullcache.yaml');
writeFileSync(
  configPath,
  [
    'server:',
    `  listen: 127.0.0.1:${port}`,
    `  workers: ${process.env.SERVER_WORKERS ?? 1}`,
    'storage:',
    '  filesystem:',
    `    root: ${DATA}`,
    '  uploads:',
    '    purgeAge: 5m',
    '    purgeInterval: 1m',
    'upstreams:',
    '  docker.io:',
    `    url: ${registry.url}`,
    '    tagTTL: 20s',
    'retention:',
    '  maxSize: 16MiB',
    '  lowWater: 80%',
    '  sweepInterval: 2m',
    ...(REDIS_PORT
      ? ['cache:', '  store: redis', '  redis:', `    url: redis://127.0.0.1:${REDIS_PORT}`]
      : []),
    'log:',
    '  level: warn',
    '',
  ].join('\n'),
);
const env = Object.fromEntries(
  Object.entries(process.env).filter(([k]) => !k.startsWith('PULLCACHE_')),
);
env.PULLCACHE_NODE_FLAGS = '--heapsnapshot-signal=SIGUSR2';
const serverLog = join(OUT, 'pullcache.log');
const out = createWriteStream(serverLog);
const child = spawn(join(process.cwd(), 'bin/pullcache'), ['serve', '--config', configPath], {
  stdio: ['ignore', 'pipe', 'pipe'],
  env,
  cwd: OUT, // heap snapshots land here
});
child.stdout!.pipe(out);
child.stderr!.pipe(out);
const PID = child.pid!;
const BASE = `http://127.0.0.1:${port}`;
await waitFor(async () => (await fetch(`${BASE}/v2/`)).status === 200, 'pullcache', 20_000);
log('pullcache pid', PID, BASE);

// ---------------------------------------------------------------- client
const agent = new http.Agent({ keepAlive: true, maxSockets: 64 });
const counts = new Map<string, number>();
const count = (k: string) => counts.set(k, (counts.get(k) ?? 0) + 1);
let requests = 0;

interface Res {
  status: number;
  bytes: number;
  headers: http.IncomingHttpHeaders;
  body?: Buffer;
}

function req(
  method: string,
  path: string,
  headers: Record<string, string> = {},
  opts: { keep?: boolean; abortAfter?: number; timeoutMs?: number } = {},
): Promise<Res> {
  requests++;
  return new Promise((resolve) => {
    const r = http.request(
      `${BASE}${path}`,
      { method, headers, agent, timeout: opts.timeoutMs ?? 60_000 },
      (res) => {
        let bytes = 0;
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => {
          bytes += c.length;
          if (opts.keep) chunks.push(c);
          if (opts.abortAfter !== undefined && bytes >= opts.abortAfter) {
            r.destroy();
            resolve({ status: res.statusCode!, bytes, headers: res.headers });
          }
        });
        res.on('end', () =>
          resolve({
            status: res.statusCode!,
            bytes,
            headers: res.headers,
            body: opts.keep ? Buffer.concat(chunks) : undefined,
          }),
        );
        res.on('error', () => resolve({ status: -2, bytes, headers: res.headers }));
        res.on('aborted', () => resolve({ status: -3, bytes, headers: res.headers }));
      },
    );
    r.on('timeout', () => r.destroy(new Error('timeout')));
    r.on('error', (e) =>
      resolve({ status: (e as Error).message === 'timeout' ? -4 : -1, bytes: 0, headers: {} }),
    );
    r.end();
  });
}

/** A raw request line on a fresh socket (malformed paths node's client would not send). */
function raw(text: string): Promise<number> {
  requests++;
  return new Promise((resolve) => {
    const s = net.connect(port, '127.0.0.1');
    let got = '';
    s.setTimeout(10_000, () => s.destroy());
    s.on('connect', () => s.write(text));
    s.on('data', (d) => {
      got += d.toString('latin1');
      if (got.includes('\r\n\r\n')) s.destroy();
    });
    s.on('close', () => resolve(Number(/^HTTP\/1\.1 (\d+)/.exec(got)?.[1] ?? -1)));
    s.on('error', () => {});
  });
}

const pick = <T>(a: T[]): T => a[Math.floor(Math.random() * a.length)]!;
/** Skewed: low indexes much more often (a hot set), a long tail. */
const skew = <T>(a: T[]): T => a[Math.floor(a.length * Math.random() ** 3)]!;
const randDigest = () => `sha256:${randomBytes(32).toString('hex')}`;
let uniq = 0;

function layersOf(img: Image): { digest: string; size: number }[] {
  const list = img.children ? img.children.flatMap((c) => c.blobs) : img.blobs;
  return list.map((b) => ({ digest: b.digest, size: b.bytes.length }));
}

async function pull(k: Known, byDigest: boolean): Promise<void> {
  const ref = byDigest ? k.image.digest : k.tag;
  const m = await req('GET', `/v2/${k.repo}/manifests/${ref}`, { accept: ACCEPT });
  count(`pull.manifest.${m.status}`);
  if (m.status !== 200) return;
  const targets = k.image.children ? [pick(k.image.children)] : [k.image];
  for (const t of targets) {
    if (k.image.children) {
      const c = await req('GET', `/v2/${k.repo}/manifests/${t.digest}`, { accept: ACCEPT });
      count(`pull.child.${c.status}`);
    }
    for (const b of t.blobs) {
      const r = await req('GET', `/v2/${k.repo}/blobs/${b.digest}`);
      count(`pull.blob.${r.status}`);
      if (r.status === 200 && r.bytes !== b.bytes.length) count('pull.blob.SHORT');
    }
  }
}

const anyImage = () =>
  Math.random() < 0.5 ? skew(images) : pick(aliases.length ? aliases : images);

const BAD_PATHS = [
  '/v2/UPPER/case/manifests/latest',
  '/v2/lib/r1/blobs/sha256:xyz',
  '/v2/lib/r1/blobs/md5:0123456789abcdef0123456789abcdef',
  '/v2/lib/r1/blobs/sha256:' + 'a'.repeat(63),
  '/v2/lib/r1/manifests/bad%25tag',
  '/v2/lib/r1/manifests/' + 't'.repeat(200),
  '/v2/lib/' + 'x'.repeat(300) + '/manifests/latest',
  '/v2/lib/r1/manifests/',
  '/v2/lib/r1/nothing/here',
  '/v2/lib/r1/tags/list?n=abc',
  '/v2/_catalog?n=-1',
  '/v2/lib/-bad-/manifests/v1',
  '/v2/lib//r1/manifests/v1',
  '/v2/lib/r1/referrers/notadigest',
  '/nothing',
  '/v2/lib/r1/blobs/uploads/',
];

async function op(): Promise<void> {
  const r = Math.random();
  if (r < 0.25) {
    await pull(anyImage(), Math.random() < 0.3);
  } else if (r < 0.33) {
    const k = anyImage();
    const a = await req('HEAD', `/v2/${k.repo}/manifests/${k.tag}`, { accept: ACCEPT });
    count(`head.manifest.${a.status}`);
    const b = pick(layersOf(k.image));
    const c = await req('HEAD', `/v2/${k.repo}/blobs/${b.digest}`);
    count(`head.blob.${c.status}`);
  } else if (r < 0.41) {
    const k = Math.random() < 0.3 ? pick(big) : anyImage();
    const b = pick(layersOf(k.image));
    const ranges = [
      'bytes=0-99',
      'bytes=-500',
      'bytes=100-',
      'bytes=0-10,50-60',
      'bytes=999999999-',
      'bytes=5-2',
      `bytes=${Math.floor(b.size / 2)}-`,
    ];
    const range = pick(ranges);
    const res = await req('GET', `/v2/${k.repo}/blobs/${b.digest}`, { range });
    count(`range.${res.status}`);
  } else if (r < 0.48) {
    const k = pick(big);
    const b = k.image.blobs[1]!;
    const res = await req(
      'GET',
      `/v2/${k.repo}/blobs/${b.digest}`,
      {},
      { abortAfter: 1 + Math.floor(Math.random() * 200_000) },
    );
    count(`abort.${res.status}`);
  } else if (r < 0.6) {
    const n = uniq++;
    const a = await req('GET', `/v2/lib/missing${n}/manifests/latest`, { accept: ACCEPT });
    count(`missing.manifest.${a.status}`);
    const b = await req(
      Math.random() < 0.5 ? 'GET' : 'HEAD',
      `/v2/lib/missing${n}/blobs/${randDigest()}`,
    );
    count(`missing.blob.${b.status}`);
    if (n % 5 === 0) {
      const c = await req('GET', `/v2/org${n}/team/img/manifests/${randDigest()}`, {
        accept: ACCEPT,
      });
      count(`missing.bydigest.${c.status}`);
    }
  } else if (r < 0.65) {
    const k = anyImage();
    const a = await req('GET', `/v2/${k.repo}/manifests/t${uniq++}`, { accept: ACCEPT });
    count(`missingtag.${a.status}`);
  } else if (r < 0.68) {
    const k = anyImage();
    const a = await req('GET', `/v2/${k.repo}/blobs/${randDigest()}`);
    count(`missingblob.${a.status}`);
  } else if (r < 0.73) {
    if (Math.random() < 0.3) {
      const line = pick([
        'GET /v2/../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n',
        'GET /v2/lib/r1/manifests/v1 HTTP/1.1\r\nHost: x\r\nRange: bytes=abc\r\n\r\n',
        'GET /v2/%zz/manifests/v1 HTTP/1.1\r\nHost: x\r\n\r\n',
        'BREW /v2/ HTTP/1.1\r\nHost: x\r\n\r\n',
        'GET /v2/lib/r1/manifests/v1 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nab', // body cut short
      ]);
      count(`raw.${await raw(line)}`);
    } else {
      const path = pick(BAD_PATHS);
      const res = await req(pick(['GET', 'HEAD', 'PUT', 'DELETE', 'POST']), path);
      count(`bad.${res.status}`);
    }
  } else if (r < 0.77) {
    // concurrent identical cold-ish requests
    const k = Math.random() < 0.5 ? pick(big) : pick(images.slice(Math.floor(N_SMALL / 2)));
    const b = pick(layersOf(k.image));
    const res = await Promise.all(
      Array.from({ length: 8 }, (_, i) =>
        req('GET', `/v2/${k.repo}/blobs/${b.digest}`, {}, i % 3 === 2 ? { abortAfter: 1000 } : {}),
      ),
    );
    for (const x of res) count(`herd.${x.status}`);
  } else if (r < 0.8) {
    const k = anyImage();
    const a = await req(
      'GET',
      Math.random() < 0.5
        ? `/v2/${k.repo}/tags/list`
        : `/v2/_catalog?n=20&last=lib/r${Math.floor(Math.random() * 100)}`,
    );
    count(`list.${a.status}`);
  } else if (r < 0.82) {
    const k = anyImage();
    const a = await req('GET', `/v2/${k.repo}/referrers/${k.image.digest}`);
    count(`referrers.${a.status}`);
  } else if (r < 0.85) {
    const k = anyImage();
    const b = pick(layersOf(k.image));
    const a = await req('GET', `/v2/${k.repo}/blobs/${b.digest}`, {
      'if-none-match': `"${b.digest}"`,
    });
    count(`inm.${a.status}`);
    const m = await req('GET', `/v2/${k.repo}/manifests/${k.tag}`, {
      accept: ACCEPT,
      'if-none-match': `"${k.image.digest}"`,
    });
    count(`inm.manifest.${m.status}`);
  } else {
    // steady warm traffic on the hot set
    await pull(skew(images), Math.random() < 0.5);
  }
}

// Retags upstream: a tag moves to a new image now and then (revalidation finds a new digest).
let retags = 0;
async function retagLoop(until: number): Promise<void> {
  while (Date.now() < until) {
    await new Promise((r) => setTimeout(r, 4000));
    const i = 1 + Math.floor(Math.random() * (N_SMALL - 1));
    if (i % 10 === 0) continue;
    const repo = `lib/r${i}`;
    try {
      const image = makeImage(repo, 'v1', 'oci', [8_000, 4_000]);
      await pushImage(registry, image);
      images[i] = { repo, tag: 'v1', image };
      retags++;
    } catch (e) {
      log('retag failed', String(e));
    }
  }
}

// ---------------------------------------------------------------- sampler
const metricNames = [
  'process_resident_memory_bytes',
  'nodejs_heap_size_used_bytes',
  'nodejs_heap_size_total_bytes',
  'nodejs_external_memory_bytes',
  'process_open_fds',
  'nodejs_active_handles_total',
  'nodejs_active_requests_total',
  'nodejs_active_resources_total',
  'pullcache_storage_bytes',
  'pullcache_fetches_in_flight',
  'process_cpu_seconds_total',
];
async function metrics(): Promise<Record<string, number>> {
  const res = await fetch(`${BASE}/metrics`);
  const text = await res.text();
  const outm: Record<string, number> = {};
  for (const name of metricNames) {
    let sum = 0;
    let found = false;
    for (const line of text.split('\n')) {
      if (line.startsWith(name + ' ') || line.startsWith(name + '{')) {
        sum += Number(line.slice(line.lastIndexOf(' ') + 1));
        found = true;
      }
    }
    if (found) outm[name] = sum;
  }
  const ev = /pullcache_evictions_total\{reason="size"\} (\d+)/.exec(text);
  outm.evictions = ev ? Number(ev[1]) : 0;
  return outm;
}
function procStatus(): { rssMB: number; threads: number; hwmMB: number } {
  const s = readFileSync(`/proc/${PID}/status`, 'utf8');
  const f = (k: string) => Number(new RegExp(`^${k}:\\s+(\\d+)`, 'm').exec(s)?.[1] ?? 0);
  return {
    rssMB: Math.round(f('VmRSS') / 1024),
    hwmMB: Math.round(f('VmHWM') / 1024),
    threads: f('Threads'),
  };
}
function fds(): Record<string, number> {
  const outf = { total: 0, socket: 0, pipe: 0, anon: 0, storage: 0, other: 0 };
  for (const fd of readdirSync(`/proc/${PID}/fd`)) {
    let target = '';
    try {
      target = readlinkSync(`/proc/${PID}/fd/${fd}`);
    } catch {
      continue;
    }
    outf.total++;
    if (target.startsWith('socket:')) outf.socket++;
    else if (target.startsWith('pipe:')) outf.pipe++;
    else if (target.startsWith('anon_inode:')) outf.anon++;
    else if (target.startsWith(DATA)) outf.storage++;
    else outf.other++;
  }
  return outf;
}
function sockets(): Record<string, number> {
  const text = execFileSync('ss', ['-tanpH'], { encoding: 'utf8' });
  const outs: Record<string, number> = {};
  for (const line of text.split('\n')) {
    if (!line.includes(`pid=${PID},`)) continue;
    const state = line.split(/\s+/)[0]!;
    outs[state] = (outs[state] ?? 0) + 1;
  }
  return outs;
}
function storage() {
  const s = {
    bytes: 0,
    files: 0,
    blobs: 0,
    uploads: 0,
    uploadBytes: 0,
    tmp: 0,
    lifecycle: 0,
    repos: 0,
    repoDirs: 0,
    emptyDirs: 0,
  };
  const walk = (dir: string, rel: string): void => {
    let entries: import('node:fs').Dirent[];
    try {
      entries = readdirSync(dir, { withFileTypes: true });
    } catch {
      return;
    }
    if (entries.length === 0) s.emptyDirs++;
    if (rel.startsWith('repositories/')) {
      s.repoDirs++;
      if (entries.some((e) => e.name === '_manifests' || e.name === '_layers')) s.repos++;
    }
    for (const e of entries) {
      const p = join(dir, e.name);
      const r = rel ? `${rel}/${e.name}` : e.name;
      if (e.isDirectory()) walk(p, r);
      else {
        let size = 0;
        try {
          size = statSync(p).size;
        } catch {
          continue;
        }
        s.files++;
        s.bytes += size;
        if (r.startsWith('blobs/')) s.blobs++;
        else if (r.startsWith('uploads/')) {
          if (e.name === 'data') s.uploads++;
          s.uploadBytes += size;
        } else if (r.startsWith('.tmp/')) s.tmp++;
        else if (r.startsWith('lifecycle/')) s.lifecycle++;
      }
    }
  };
  walk(DATA, '');
  return s;
}
function logStats(): Record<string, number> {
  const text = existsSync(serverLog) ? readFileSync(serverLog, 'utf8') : '';
  return {
    logLines: text.split('\n').length - 1,
    maxListeners: (text.match(/MaxListenersExceeded/g) ?? []).length,
    warnings: (text.match(/"level":40/g) ?? []).length,
    errors: (text.match(/"level":50/g) ?? []).length,
  };
}
const samples: Record<string, unknown>[] = [];
const started = Date.now();
async function sample(phase: string): Promise<void> {
  try {
    const row = {
      t: Math.round((Date.now() - started) / 1000),
      phase,
      requests,
      ...procStatus(),
      fd: fds(),
      ss: sockets(),
      m: await metrics(),
      st: storage(),
      log: logStats(),
      retags,
    };
    const kids = (() => {
      try {
        return readFileSync(`/proc/${PID}/task/${PID}/children`, 'utf8')
          .trim()
          .split(/\s+/)
          .filter(Boolean);
      } catch {
        return [];
      }
    })().map((k) => {
      try {
        const st = readFileSync(`/proc/${k}/status`, 'utf8');
        const rss = Math.round(Number(/^VmRSS:\s+(\d+)/m.exec(st)?.[1] ?? 0) / 1024);
        return `${k}:${rss}MB/${readdirSync(`/proc/${k}/fd`).length}fd`;
      } catch {
        return `${k}:gone`;
      }
    });
    (row as Record<string, unknown>).kids = kids;
    if (kids.length) log(`  workers ${kids.join(' ')}`);
    samples.push(row);
    appendFileSync(join(OUT, 'samples.jsonl'), JSON.stringify(row) + '\n');
    const m = row.m;
    log(
      `${phase} t=${row.t}s req=${requests} rss=${row.rssMB}MB thr=${row.threads} heap=${((m.nodejs_heap_size_used_bytes ?? 0) / 1e6).toFixed(1)}MB ext=${((m.nodejs_external_memory_bytes ?? 0) / 1e6).toFixed(1)}MB fds=${JSON.stringify(row.fd)} handles=${m.nodejs_active_handles_total} ss=${JSON.stringify(row.ss)} store=${(row.st.bytes / 1e6).toFixed(1)}MB repos=${row.st.repos} empty=${row.st.emptyDirs} files=${row.st.files} uploads=${row.st.uploads} tmp=${row.st.tmp} lifecycle=${row.st.lifecycle} evict=${m.evictions} log=${JSON.stringify(row.log)}`,
    );
  } catch (e) {
    log('sample failed', String(e));
  }
}

// ---------------------------------------------------------------- run
await sample('baseline');
const until = Date.now() + LOAD_MS;
// With KILL_WORKER: one worker killed at half the load, every 60 s after (the primary replaces it).
if (process.env.KILL_WORKER) {
  const kill = () => {
    try {
      const kids = readFileSync(`/proc/${PID}/task/${PID}/children`, 'utf8').trim().split(/\s+/);
      if (kids[0]) {
        process.kill(Number(kids[0]), 'SIGKILL');
        log(`killed worker ${kids[0]}`);
      }
    } catch (e) {
      log('kill failed', String(e));
    }
  };
  setTimeout(() => {
    kill();
    const t = setInterval(() => (Date.now() < until - 30_000 ? kill() : clearInterval(t)), 60_000);
  }, LOAD_MS / 2);
}
// With REDIS: Redis stopped for 30 s at a third of the load, then started again.
if (REDIS_PORT) {
  const port = String(REDIS_PORT);
  setTimeout(() => {
    log('redis: stopping');
    spawnSync('redis-cli', ['-p', port, 'shutdown', 'nosave']);
    setTimeout(() => {
      log('redis: starting again');
      startRedis(REDIS_PORT);
    }, 30_000);
  }, LOAD_MS / 3);
}
const timer = setInterval(() => void sample('load'), SAMPLE_MS);
let snapped = false;
const workers = Array.from({ length: WORKERS }, async () => {
  while (Date.now() < until) {
    try {
      await op();
    } catch {
      count(`driver.error`);
    }
    if (!snapped && !process.env.NO_SNAPSHOT && Date.now() - started > 90_000) {
      snapped = true;
      process.kill(PID, 'SIGUSR2');
      log('heap snapshot 1 requested');
    }
  }
});
await Promise.all([...workers, retagLoop(until)]);
clearInterval(timer);
agent.destroy();
log('load done; counts', Object.fromEntries([...counts].sort()));
await sample('end');
for (const wait of [15, 30, 45, 60]) {
  await new Promise((r) => setTimeout(r, 15_000));
  await sample(`idle+${wait}s`);
}
if (!process.env.NO_SNAPSHOT) {
  process.kill(PID, 'SIGUSR2');
  log('heap snapshot 2 requested');
  await new Promise((r) => setTimeout(r, 20_000));
  await sample('after-snapshot');
}
writeFileSync(
  join(OUT, 'counts.json'),
  JSON.stringify(Object.fromEntries([...counts].sort()), null, 1),
);
writeFileSync(
  join(OUT, 'images.json'),
  JSON.stringify({ images: images.map((k) => k.repo), aliases: aliases.length }),
);
if (process.env.KEEP_RUNNING) {
  log('server left running (KEEP_RUNNING)');
} else {
  child.kill('SIGTERM');
  await new Promise((r) => child.once('exit', r));
  await registry.close();
  if (REDIS_PORT) spawnSync('redis-cli', ['-p', String(REDIS_PORT), 'shutdown', 'nosave']);
}
log(`samples, logs and storage: ${OUT}`);
log('done');
process.exit(0);
