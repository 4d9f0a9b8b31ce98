/**
 * A soak test (docs/memory.md): the real upstream (distribution 2.8 with token auth), pullcache
 * started as users start it (bin/pullcache serve, a 16 MiB budget so that eviction runs all the
 * time), a varied steady load for minutes, and a sample every 15 s of what must not grow: RSS,
 * heap, fds by kind, sockets by state, handles, storage's temporary files. After the load it waits
 * a minute: what is transient must be back to its baseline. It ends with a summary of each process:
 * the heap's lowest reading per 2 minutes of load, and what it held before the load and a minute
 * after it.
 *
 *   npm run soak                     # 12 minutes, one process
 *   LOAD_MIN=6 REDIS=1 npm run soak  # cache.store: redis, Redis stopped for 30 s mid-way
 *   SERVER_WORKERS=2 KILL_WORKER=1 npm run soak  # two workers, one killed every minute
 *   S3=1 npm run soak                # storage.driver: s3, a bucket of a throw-away Ceph radosgw
 *   S3=1 REPLICAS=3 npm run soak     # three replicas sharing the bucket and a Redis of their own
 *   S3=1 REPLICAS=2 KILL_REPLICA=1 npm run soak  # the lifecycle's owner killed, and started again
 *
 * With REPLICAS each process is a replica as on a host of its own (its port, advertise address,
 * spool and owner-key directories; the peer secret, bucket and Redis shared), and every request
 * goes to the next replica in turn: one pull's blobs are asked of several replicas at once, which
 * follow each other's fetches. Each replica is sampled as the one process is; with S3 the bucket
 * too (objects under uploads/ and blobs/, multipart uploads in progress).
 *
 * KILL_REPLICA (with REPLICAS): at half the load the replica holding the lifecycle lease (r0 when
 * that cannot be told) is killed (SIGKILL), and started again 10 s later at the same address with
 * the same config, as a crashed pod comes back; once more a minute later when the load lasts. While
 * it is down the load goes to the others (a load balancer's health check); the requests in flight
 * on it when it died are counted apart (`.cut`), not as failures. Each sample says which replica
 * holds the lease; the killed process's log is kept (pullcache.<pid>.log beside the new one's).
 *
 * Env: LOAD_MIN (12), WORKERS (24 concurrent clients), OUT (a new directory under the system's
 * temporary one: the samples, logs and storage stay there), NO_SNAPSHOT (no heap snapshots; by
 * default two, through --heapsnapshot-signal, which inflate RSS afterwards), BIG_BYTES (the big
 * layers' size: 3 MB, with S3 20 MB).
 */
import { spawnSync, execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import {
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  readlinkSync,
  statSync,
  writeFileSync,
  appendFileSync,
  existsSync,
  renameSync,
} from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join, resolve as resolvePath } from 'node:path';
import { ListMultipartUploadsCommand, ListObjectsV2Command } from '@aws-sdk/client-s3';
import { MANIFEST_ACCEPT } from '../src/oci/media-types.js';
import { paths } from '../src/storage/paths.js';
import { TestRegistry } from '../test/helpers/registry.js';
import { startS3, type TestS3 } from '../test/helpers/s3.js';
import {
  makeImage,
  makeIndex,
  pushImage,
  pushManifest,
  type Image,
} from '../test/helpers/images.js';
import { freePort } from '../test/helpers/net.js';
import { startPullcacheProcess, type ServerUnderTest } from './servers.js';

// Absolute: the processes run in directories of their own (heap snapshots land there).
const OUT = resolvePath(process.env.OUT ?? mkdtempSync(join(tmpdir(), 'pullcache-soak-')));
const LOAD_MS = Number(process.env.LOAD_MIN ?? 12) * 60_000;
const WORKERS = Number(process.env.WORKERS ?? 24);
const SAMPLE_MS = 15_000;
const N_SMALL = Number(process.env.N_SMALL ?? 250);
const N_BIG = 10;
const N_ALIAS = Number(process.env.N_ALIAS ?? 1200);
const S3 = Boolean(process.env.S3);
const REPLICAS = Number(process.env.REPLICAS ?? 0);
// Replicas on hosts of their own share a bucket, not a directory.
if (REPLICAS && !S3) throw new Error('REPLICAS needs S3=1 (the replicas share a bucket)');
const KILL_REPLICA = Boolean(process.env.KILL_REPLICA);
if (KILL_REPLICA && REPLICAS < 2) throw new Error('KILL_REPLICA needs S3=1 REPLICAS=2 or more');
/**
 * The big images' layer. With S3 past one part (storage.s3.partSize, 16 MiB): their uploads are
 * multipart (3 MB would be one PUT, and no multipart upload would ever be in progress), and
 * their fetches last long enough for other replicas to follow them.
 */
const BIG_BYTES = Number(process.env.BIG_BYTES ?? (S3 ? 20_000_000 : 3_000_000));
/** With REDIS, or for the REPLICAS' leases: a redis-server of the soak's own (cache.store: redis). */
const REDIS_PORT = process.env.REDIS || REPLICAS ? await freePort() : undefined;
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
  const image = makeImage(repo, 'v1', 'oci', [BIG_BYTES]);
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
/** A pullcache process under the soak (a replica, with REPLICAS) and where its files are. */
interface Soaked {
  /** "pullcache", or "r0", "r1"... */
  name: string;
  server: ServerUnderTest;
  port: number;
  pid: number;
  log: string;
  /** The filesystem driver's root; with S3 only the owner key's (access/owner-key.ts). */
  data: string;
  /** With S3: where its writes are spooled until their upload completes. */
  spool?: string;
  /** Starts its process (again, with `port`: at its old address, with the same config). */
  start: (port?: number) => Promise<ServerUnderTest>;
  /** Killed and not answering yet (KILL_REPLICA): the load sends it nothing meanwhile. */
  down: boolean;
  /** When it was last killed (ms): what was in flight on it then was cut by the kill. */
  killedAt: number;
  /**
   * Its kills (s since the start): the pid killed (whether it held the lifecycle lease), its log
   * (moved to pullcache.<pid>.log), and the new pid once it answers.
   */
  restarts: {
    t: number;
    pid: number;
    owner: boolean;
    log?: string;
    newPid?: number;
    upT?: number;
  }[];
}
let s3: TestS3 | undefined;
let bucket = '';
if (S3) {
  s3 = await startS3();
  bucket = await s3.bucket();
  log('s3', s3.endpoint, bucket);
}
const servers: Soaked[] = [];
for (let i = 0; i < Math.max(1, REPLICAS); i++) {
  // One process keeps its files in OUT itself, as before; a replica has a directory of its own.
  const dir = REPLICAS ? join(OUT, `replica-${i}`) : OUT;
  const data = join(dir, 'data');
  // Its own spool, not the host's shared one (os.tmpdir()): replicas on one host would follow
  // each other's spool files instead of asking their peers, and its temporary files are counted.
  const spool = S3 ? join(dir, 'spool') : undefined;
  mkdirSync(data, { recursive: true });
  if (spool) mkdirSync(spool, { recursive: true });
  const start = (port?: number) =>
    startPullcacheProcess(dir, registry.url, {
      ...(port ? { port } : {}),
      workers: Number(process.env.SERVER_WORKERS ?? 1),
      ...(REPLICAS
        ? { replica: { redisUrl: `redis://127.0.0.1:${REDIS_PORT}`, peerSecret: 'soak' } }
        : {}),
      storage: [
        ...(s3 ? ['  driver: s3'] : []),
        '  filesystem:',
        `    root: ${data}`,
        ...(s3
          ? [
              '  s3:',
              `    bucket: ${bucket}`,
              `    endpoint: ${s3.endpoint}`,
              '    forcePathStyle: true',
              '    accessKeyEnv: SOAK_S3_KEY',
              '    secretKeyEnv: SOAK_S3_SECRET',
              `    spoolDir: ${spool}`,
            ]
          : []),
        '  uploads:',
        '    purgeAge: 5m',
        '    purgeInterval: 1m',
      ],
      top: [
        'retention:',
        '  maxSize: 16MiB',
        '  lowWater: 80%',
        '  sweepInterval: 2m',
        // Replicas have theirs from `replica`.
        ...(REDIS_PORT && !REPLICAS
          ? ['cache:', '  store: redis', '  redis:', `    url: redis://127.0.0.1:${REDIS_PORT}`]
          : []),
      ],
      tagTTL: '20s',
      nodeFlags: '--heapsnapshot-signal=SIGUSR2',
      env: s3 ? { SOAK_S3_KEY: s3.accessKey, SOAK_S3_SECRET: s3.secretKey } : {},
      cwd: dir, // heap snapshots land here
    });
  const server = await start();
  const name = REPLICAS ? `r${i}` : 'pullcache';
  servers.push({
    name,
    server,
    port: Number(new URL(server.url).port),
    pid: server.pid,
    log: join(dir, 'pullcache.log'),
    data,
    ...(spool ? { spool } : {}),
    start,
    down: false,
    killedAt: 0,
    restarts: [],
  });
  log(`${name} pid`, server.pid, server.url);
}

// ---------------------------------------------------------------- client
const agent = new http.Agent({ keepAlive: true, maxSockets: 64 });
const counts = new Map<string, number>();
const count = (k: string) => counts.set(k, (counts.get(k) ?? 0) + 1);
let requests = 0;
let turn = 0;
/**
 * The process to ask next: in turn, request by request, so that the blobs of one pull, a burst
 * on one cold blob, a manifest and its blobs are asked of several replicas at once. One that is
 * down (KILL_REPLICA) is passed over, as a load balancer's health check would.
 */
const next = (): Soaked => {
  for (let i = 0; i < servers.length; i++) {
    const p = servers[turn++ % servers.length]!;
    if (!p.down) return p;
  }
  return servers[turn++ % servers.length]!; // all down: never, one is killed at a time
};
const secs = () => Math.round((Date.now() - started) / 1000);
/** The load's failures (a 5xx, a cut, a timeout) by replica, and those a kill explains. */
const failures = new Map<string, number>();
/**
 * What an answer counts as: `cut` when the request failed on a replica killed while it was in
 * flight (not a failure of the load: the kill's own doing). Failures are noted by replica, with
 * those within 30 s of another replica's kill apart (its followers' clients are cut: fleet.md).
 */
function settled(target: Soaked, sent: number, status: number, what: string): number | 'cut' {
  const cut = status < 0 && target.killedAt >= sent;
  if (cut || status < 0 || status >= 500) {
    const nearKill = servers.some(
      (o) => o !== target && o.killedAt && Date.now() - o.killedAt < 30_000,
    );
    const key = `${target.name}.${cut ? 'cut' : status}${!cut && nearKill ? ' (<30 s after a kill)' : ''}`;
    failures.set(key, (failures.get(key) ?? 0) + 1);
    appendFileSync(
      join(OUT, 'failures.jsonl'),
      JSON.stringify({ t: secs(), replica: target.name, pid: target.pid, what, status, cut }) +
        '\n',
    );
  }
  return cut ? 'cut' : status;
}

interface Res {
  /** The HTTP status; -1 to -4 a failure (error, response error, aborted, timeout); `cut`. */
  status: number | 'cut';
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
  const target = next();
  const sent = Date.now();
  return new Promise((done) => {
    let once = false;
    const resolve = (res: Res) => {
      if (once) return;
      once = true;
      done({ ...res, status: settled(target, sent, res.status as number, `${method} ${path}`) });
    };
    const r = http.request(
      `${target.server.url}${path}`,
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
function raw(text: string): Promise<number | 'cut'> {
  requests++;
  const target = next();
  const sent = Date.now();
  return new Promise((done) => {
    const resolve = (status: number) => done(settled(target, sent, status, text.split('\r')[0]!));
    const s = net.connect(target.port, '127.0.0.1');
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
  'pullcache_upstream_bytes_total',
  'pullcache_peer_bytes_total',
];
async function metrics(base: string): Promise<Record<string, number>> {
  const res = await fetch(`${base}/metrics`);
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
  // Replicas: fetches that followed another replica's, by result (whole, cut, unavailable).
  for (const [, result, n] of text.matchAll(
    /^pullcache_peer_follows_total\{[^}]*result="(\w+)"[^}]*\} (\d+)/gm,
  ))
    outm[`follows.${result}`] = (outm[`follows.${result}`] ?? 0) + Number(n);
  return outm;
}
function procStatus(pid: number): { rssMB: number; threads: number; hwmMB: number } {
  const s = readFileSync(`/proc/${pid}/status`, 'utf8');
  const f = (k: string) => Number(new RegExp(`^${k}:\\s+(\\d+)`, 'm').exec(s)?.[1] ?? 0);
  return {
    rssMB: Math.round(f('VmRSS') / 1024),
    hwmMB: Math.round(f('VmHWM') / 1024),
    threads: f('Threads'),
  };
}
function fds(p: Soaked): Record<string, number> {
  const outf = { total: 0, socket: 0, pipe: 0, anon: 0, storage: 0, other: 0 };
  for (const fd of readdirSync(`/proc/${p.pid}/fd`)) {
    let target = '';
    try {
      target = readlinkSync(`/proc/${p.pid}/fd/${fd}`);
    } catch {
      continue;
    }
    outf.total++;
    if (target.startsWith('socket:')) outf.socket++;
    else if (target.startsWith('pipe:')) outf.pipe++;
    else if (target.startsWith('anon_inode:')) outf.anon++;
    else if (target.startsWith(p.data) || (p.spool && target.startsWith(p.spool))) outf.storage++;
    else outf.other++;
  }
  return outf;
}
/** `ss`'s TCP sockets, once for every process: their lines name the pid that holds them. */
function socketLines(): string[] {
  return execFileSync('ss', ['-tanpH'], { encoding: 'utf8' }).split('\n');
}
function sockets(lines: string[], pid: number): Record<string, number> {
  const outs: Record<string, number> = {};
  for (const line of lines) {
    if (!line.includes(`pid=${pid},`)) continue;
    const state = line.split(/\s+/)[0]!;
    outs[state] = (outs[state] ?? 0) + 1;
  }
  return outs;
}
/**
 * Whom a process's established connections are with, by the port at either end: its clients
 * (the load's, and other replicas' asking for a blob), the upstream and its token server, the
 * S3 gateway, Redis, other replicas. Kept-alive connections to the stores are expected to stay;
 * clients' are not (but for the sampler's own, kept alive for /metrics).
 */
function socketsTo(lines: string[], p: Soaked): Record<string, number> {
  const named = new Map<number, string>([
    [registry.port, 'upstream'],
    [Number(new URL(registry.tokens.url).port), 'upstream'],
    ...(s3 ? [[Number(new URL(s3.endpoint).port), 's3'] as [number, string]] : []),
    ...(REDIS_PORT ? [[REDIS_PORT, 'redis'] as [number, string]] : []),
    ...servers.filter((o) => o !== p).map((o) => [o.port, 'peer'] as [number, string]),
  ]);
  const outs: Record<string, number> = {};
  for (const line of lines) {
    if (!line.startsWith('ESTAB') || !line.includes(`pid=${p.pid},`)) continue;
    const [, , , local, remote] = line.split(/\s+/);
    const port = (address = '') => Number(address.slice(address.lastIndexOf(':') + 1));
    const to = port(local) === p.port ? 'clients' : (named.get(port(remote)) ?? 'other');
    outs[to] = (outs[to] ?? 0) + 1;
  }
  return outs;
}
function storage(p: Soaked): Record<string, number> {
  // With S3 what is local is the spool: a file per write in progress (none once it is done).
  if (p.spool) {
    const s = { spool: 0, spoolBytes: 0 };
    for (const name of readdirSync(p.spool)) {
      try {
        s.spoolBytes += statSync(join(p.spool, name)).size;
        s.spool++;
      } catch {
        // done meanwhile
      }
    }
    return s;
  }
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
  walk(p.data, '');
  return s;
}
/**
 * What the bucket holds that must not pile up: objects under uploads/ (sessions) and blobs/, and
 * multipart uploads in progress (invisible as objects until completed or aborted), with the
 * oldest's age. A few LISTs per sample: the budget keeps the bucket small.
 */
async function bucketStats(): Promise<Record<string, number>> {
  const client = s3!.client;
  const objects = async (dir: string) => {
    let n = 0;
    let bytes = 0;
    // Their last modifications: whether what is left predates a kill.
    let [oldest, newest] = [Date.now(), 0];
    let token: string | undefined;
    do {
      const res = await client.send(
        new ListObjectsV2Command({ Bucket: bucket, Prefix: `${dir}/`, ContinuationToken: token }),
      );
      for (const o of res.Contents ?? []) {
        n++;
        bytes += o.Size ?? 0;
        const at = o.LastModified?.getTime() ?? Date.now();
        [oldest, newest] = [Math.min(oldest, at), Math.max(newest, at)];
      }
      token = res.IsTruncated ? res.NextContinuationToken : undefined;
    } while (token);
    const age = (at: number) => Math.round((Date.now() - at) / 1000);
    return { n, bytes, oldestS: age(oldest), newestS: n ? age(newest) : 0 };
  };
  const uploads = await objects(paths.uploadsRoot());
  const blobs = await objects(paths.blobsRoot());
  let multipart = 0;
  let oldest = Date.now();
  let keyMarker: string | undefined;
  let idMarker: string | undefined;
  for (;;) {
    const res = await client.send(
      new ListMultipartUploadsCommand({
        Bucket: bucket,
        ...(keyMarker ? { KeyMarker: keyMarker, UploadIdMarker: idMarker } : {}),
      }),
    );
    for (const u of res.Uploads ?? []) {
      multipart++;
      if (u.Initiated) oldest = Math.min(oldest, u.Initiated.getTime());
    }
    if (!res.IsTruncated) break;
    keyMarker = res.NextKeyMarker;
    idMarker = res.NextUploadIdMarker;
  }
  return {
    uploadObjects: uploads.n,
    uploadBytes: uploads.bytes,
    oldestUploadS: uploads.oldestS,
    newestUploadS: uploads.newestS,
    blobObjects: blobs.n,
    blobBytes: blobs.bytes,
    multipart,
    oldestMultipartS: Math.round((Date.now() - oldest) / 1000),
  };
}
/** A replica's logs: its killed processes' and its current one's. */
const logsOf = (p: Soaked) => [...p.restarts.flatMap((k) => (k.log ? [k.log] : [])), p.log];
function logStats(files: string[]): Record<string, number> {
  const text = files.map((f) => (existsSync(f) ? readFileSync(f, 'utf8') : '')).join('');
  return {
    logLines: text.split('\n').length - 1,
    maxListeners: (text.match(/MaxListenersExceeded/g) ?? []).length,
    warnings: (text.match(/"level":40/g) ?? []).length,
    errors: (text.match(/"level":50/g) ?? []).length,
  };
}
/** A process's children (SERVER_WORKERS: its workers). */
function childPids(pid: number): string[] {
  try {
    return readFileSync(`/proc/${pid}/task/${pid}/children`, 'utf8')
      .trim()
      .split(/\s+/)
      .filter(Boolean);
  } catch {
    return [];
  }
}
/** The live workers of a process (SERVER_WORKERS), each with its RSS and fds. */
function kidsOf(pid: number): string[] {
  return childPids(pid).map((k) => {
    try {
      const st = readFileSync(`/proc/${k}/status`, 'utf8');
      const rss = Math.round(Number(/^VmRSS:\s+(\d+)/m.exec(st)?.[1] ?? 0) / 1024);
      return `${k}:${rss}MB/${readdirSync(`/proc/${k}/fd`).length}fd`;
    } catch {
      return `${k}:gone`;
    }
  });
}
/** One process's reading. */
interface Probe {
  name: string;
  pid: number;
  rssMB: number;
  hwmMB: number;
  threads: number;
  fd: Record<string, number>;
  ss: Record<string, number>;
  /** The established ones by whom they are with. */
  to: Record<string, number>;
  m: Record<string, number>;
  st: Record<string, number>;
  log: Record<string, number>;
  kids: string[];
  /** Killed, not started again yet (KILL_REPLICA): nothing else was read. */
  down?: true;
}
async function probe(p: Soaked, ssLines: string[]): Promise<Probe> {
  const down = (): Probe => ({
    name: p.name,
    pid: p.pid,
    rssMB: 0,
    hwmMB: 0,
    threads: 0,
    fd: {},
    ss: {},
    to: {},
    m: {},
    st: {},
    log: logStats(logsOf(p)),
    kids: [],
    down: true,
  });
  if (p.down) return down();
  try {
    return {
      name: p.name,
      pid: p.pid,
      ...procStatus(p.pid),
      fd: fds(p),
      ss: sockets(ssLines, p.pid),
      to: socketsTo(ssLines, p),
      m: await metrics(p.server.url),
      st: storage(p),
      log: logStats(logsOf(p)),
      kids: kidsOf(p.pid),
    };
  } catch (e) {
    if (p.down) return down(); // killed while it was read
    throw e;
  }
}
/**
 * Who holds the lifecycle lease, from its key in Redis (its token is host:pid:random; with
 * SERVER_WORKERS the pid is a worker's): the replica when a live one, and what to call the holder
 * ("r1", "r0 (killed)" until its lease expires, "-" when nobody holds it).
 */
function lifecycleHolder(): { live?: Soaked; text: string } {
  if (!REPLICAS) return { text: '-' };
  const cli = (...a: string[]) =>
    spawnSync('redis-cli', ['-p', String(REDIS_PORT), ...a], { encoding: 'utf8' }).stdout?.trim();
  const key = cli('--scan', '--pattern', 'pullcache:lifecycle-lease:*')?.split('\n')[0];
  const token = key ? cli('get', key)?.split(':') : undefined;
  const pid = token && token.length >= 3 ? token[token.length - 2] : undefined;
  if (!pid) return { text: '-' };
  const live = servers.find(
    (p) => !p.down && (String(p.pid) === pid || childPids(p.pid).includes(pid)),
  );
  if (live) return { live, text: live.name };
  const dead = servers.find((p) => p.restarts.some((k) => String(k.pid) === pid));
  return { text: dead ? `${dead.name} (killed)` : `pid ${pid}` };
}
const MB = (bytes: number | undefined) => ((bytes ?? 0) / 1e6).toFixed(1);
/** A replica's follows of another's fetches, by result. */
const followsOf = (m: Record<string, number>) =>
  JSON.stringify(Object.fromEntries(Object.entries(m).filter(([k]) => k.startsWith('follows.'))));
function probeText(r: Probe): string {
  if (r.down) return `down (pid ${r.pid} killed) log=${JSON.stringify(r.log)}`;
  const m = r.m;
  const follows = REPLICAS
    ? ` upstreamMB=${MB(m.pullcache_upstream_bytes_total)} peerMB=${MB(m.pullcache_peer_bytes_total)} follows=${followsOf(m)}`
    : '';
  const st = r.st;
  const store =
    'spool' in st
      ? `store=${MB(m.pullcache_storage_bytes)}MB spool=${st.spool} spoolBytes=${MB(st.spoolBytes)}MB`
      : `store=${MB(st.bytes)}MB repos=${st.repos} empty=${st.emptyDirs} files=${st.files} uploads=${st.uploads} tmp=${st.tmp} lifecycle=${st.lifecycle}`;
  return `rss=${r.rssMB}MB thr=${r.threads} heap=${MB(m.nodejs_heap_size_used_bytes)}MB ext=${MB(m.nodejs_external_memory_bytes)}MB fds=${JSON.stringify(r.fd)} handles=${m.nodejs_active_handles_total} ss=${JSON.stringify(r.ss)} to=${JSON.stringify(r.to)} ${store} evict=${m.evictions}${follows} log=${JSON.stringify(r.log)}`;
}
interface Reading {
  t: number;
  phase: string;
  probes: Probe[];
  bucket?: Record<string, number>;
  /** With REPLICAS: the lifecycle lease's holder ("-": none, or not told). */
  owner?: string;
}
const readings: Reading[] = [];
const started = Date.now();
async function sample(phase: string): Promise<void> {
  try {
    const t = Math.round((Date.now() - started) / 1000);
    const ssLines = socketLines();
    const probes = await Promise.all(servers.map((p) => probe(p, ssLines)));
    const bucketNow = s3
      ? await bucketStats().catch((e: unknown) => ({ failed: String(e) }))
      : undefined;
    const bucketText = bucketNow ? ` bucket=${JSON.stringify(bucketNow)}` : '';
    const owner = REPLICAS ? lifecycleHolder().text : undefined;
    // One process: the row and line of before; replicas: a row with each, a line for each.
    let row: Record<string, unknown>;
    if (!REPLICAS) {
      const { name: _name, pid: _pid, ...one } = probes[0]!;
      row = { t, phase, requests, ...one, ...(bucketNow ? { bucket: bucketNow } : {}), retags };
      if (one.kids.length) log(`  workers ${one.kids.join(' ')}`);
      log(`${phase} t=${t}s req=${requests} ${probeText(probes[0]!)}${bucketText}`);
    } else {
      row = { t, phase, requests, retags, owner, bucket: bucketNow, replicas: probes };
      log(`${phase} t=${t}s req=${requests} owner=${owner}${bucketText}`);
      for (const r of probes) {
        if (r.kids.length) log(`  ${r.name} workers ${r.kids.join(' ')}`);
        log(`  ${r.name} ${probeText(r)}`);
      }
    }
    readings.push({
      t,
      phase,
      probes,
      ...(bucketNow && !('failed' in bucketNow) ? { bucket: bucketNow } : {}),
      ...(owner ? { owner } : {}),
    });
    appendFileSync(join(OUT, 'samples.jsonl'), JSON.stringify(row) + '\n');
  } catch (e) {
    log('sample failed', String(e));
  }
}

/**
 * What a process's log says at warn and above, by kind (level, message, status, error), most
 * frequent first; lines that are not JSON (node's own warnings on stderr) as they are.
 */
function logKinds(file: string): [string, number][] {
  const kinds = new Map<string, number>();
  const text = existsSync(file) ? readFileSync(file, 'utf8') : '';
  for (const line of text.split('\n')) {
    if (!line) continue;
    let kind: string;
    try {
      const l = JSON.parse(line) as {
        level?: number;
        msg?: string;
        res?: { statusCode?: number };
        err?: string | { message?: string };
      };
      if ((l.level ?? 0) < 40) continue;
      const err = typeof l.err === 'string' ? l.err : l.err?.message;
      kind = `${l.level === 40 ? 'warn' : l.level === 50 ? 'error' : `level ${l.level}`} "${l.msg}"${l.res?.statusCode ? ` ${l.res.statusCode}` : ''}${err ? `: ${err}` : ''}`;
    } catch {
      kind = `not JSON: ${line}`;
    }
    kind = kind.slice(0, 200);
    kinds.set(kind, (kinds.get(kind) ?? 0) + 1);
  }
  return [...kinds].sort((a, b) => b[1] - a[1]);
}

/**
 * The end of the run in a few lines per process: the heap's lowest reading in each 2 minutes of
 * the load (a floor that climbs is a leak; the highest readings are only garbage not yet
 * collected), the highest RSS, and what it held before the load against a minute after it (what
 * is transient must be back). Written to summary.txt too.
 */
function summarize(): void {
  const lines: string[] = [];
  const before = readings.find((r) => r.phase === 'baseline');
  const after = readings.findLast((r) => r.phase.startsWith('idle+'));
  const load = readings.filter((r) => r.phase === 'load');
  const loadStart = before?.t ?? 0;
  for (const [i, p] of servers.entries()) {
    const at = (r: Reading | undefined) => r?.probes[i];
    // A killed replica's readings while it was down hold nothing.
    const up = load.filter((r) => !r.probes[i]!.down);
    const heap = (q: Probe | undefined) => MB(q?.m.nodejs_heap_size_used_bytes);
    // Per window its floor, and the pids read in it (two: a restart in that window).
    const floors = new Map<number, { h: number; pids: Set<number> }>();
    for (const r of up) {
      const w = Math.floor((r.t - loadStart) / 120);
      const h = r.probes[i]!.m.nodejs_heap_size_used_bytes ?? 0;
      const f = floors.get(w) ?? { h: Infinity, pids: new Set<number>() };
      f.h = Math.min(f.h, h);
      f.pids.add(r.probes[i]!.pid);
      floors.set(w, f);
    }
    const floorText = [...floors.values()]
      .map((f) => `${MB(f.h)}${f.pids.size > 1 ? ` (pids ${[...f.pids].join('/')})` : ''}`)
      .join(', ');
    const [b, a] = [at(before), at(after)];
    const rssMax = Math.max(0, ...up.map((r) => r.probes[i]!.rssMB));
    const pids = b && a && b.pid !== a.pid ? ` (pid ${b.pid} -> ${a.pid})` : '';
    const beforeAfter = (x: Probe | undefined, y: Probe | undefined) => [
      `heap ${heap(x)} -> ${heap(y)} MB, rss ${x?.rssMB} -> ${y?.rssMB} MB, handles ${x?.m.nodejs_active_handles_total} -> ${y?.m.nodejs_active_handles_total}, threads ${x?.threads} -> ${y?.threads}`,
      `fds ${JSON.stringify(x?.fd)} -> ${JSON.stringify(y?.fd)}`,
      `sockets ${JSON.stringify(x?.ss)} ${JSON.stringify(x?.to)} -> ${JSON.stringify(y?.ss)} ${JSON.stringify(y?.to)}`,
    ];
    const [ba, bFds, bSockets] = beforeAfter(b, a);
    lines.push(
      `${p.name} (pid ${p.pid}): heap floor per 2 min ${floorText} MB; rss max ${rssMax} MB under the load`,
      `  baseline -> ${after?.phase ?? '-'}${pids}: ${ba}`,
      `  ${bFds}`,
      `  ${bSockets}`,
      `  storage ${JSON.stringify(b?.st)} -> ${JSON.stringify(a?.st)}`,
    );
    // Each kill, and the new process's own first reading against its last.
    for (const k of p.restarts) {
      lines.push(
        `  killed at t=${k.t}s (pid ${k.pid}${k.owner ? ', the lifecycle lease holder' : ''}); ${k.newPid ? `answering again at t=${k.upT}s as pid ${k.newPid}` : 'NOT STARTED AGAIN'}`,
      );
      const its = readings.filter((r) => !r.probes[i]!.down && r.probes[i]!.pid === k.newPid);
      const [x, y] = [its[0], its.at(-1)];
      if (x && y && x !== y)
        lines.push(
          ...beforeAfter(x.probes[i], y.probes[i]).map(
            (l, j) =>
              `    ${j ? '' : `pid ${k.newPid} t=${x.t}s (${x.phase}) -> t=${y.t}s (${y.phase}): `}${l}`,
          ),
        );
    }
    // What it had from the upstream and from its peers: replicas that never follow share nothing.
    // A killed process's counters went with it: its last reading's, then the last process's.
    const fetched = (q: Probe) =>
      `from the upstream ${MB(q.m.pullcache_upstream_bytes_total)} MB, from peers ${MB(q.m.pullcache_peer_bytes_total)} MB, follows ${followsOf(q.m)}, evictions ${q.m.evictions}`;
    if (REPLICAS)
      for (const k of p.restarts) {
        const last = readings.findLast((r) => !r.probes[i]!.down && r.probes[i]!.pid === k.pid);
        if (last)
          lines.push(
            `  pid ${k.pid} until its last reading (t=${last.t}s): ${fetched(last.probes[i]!)}`,
          );
      }
    if (REPLICAS && a && !a.down)
      lines.push(`  ${p.restarts.length ? `pid ${a.pid}: ` : ''}${fetched(a)}`);
    for (const file of logsOf(p)) {
      const kinds = logKinds(file);
      const killed = p.restarts.find((k) => k.log === file);
      if (p.restarts.length)
        lines.push(
          `  log of pid ${killed ? `${killed.pid} (killed at t=${killed.t}s)` : `${p.pid} (the last)`}${kinds.length ? ':' : ': nothing at warn or above'}`,
        );
      for (const [kind, n] of kinds.slice(0, 8)) lines.push(`  log ${n} x ${kind}`);
      if (kinds.length > 8) lines.push(`  log ... ${kinds.length - 8} more kinds (${file})`);
    }
  }
  // Who held the lifecycle lease, sample by sample ("-": nobody, or not told).
  if (REPLICAS) {
    const runs: { owner: string; from: number; to: number }[] = [];
    for (const r of readings) {
      const owner = r.owner ?? '-';
      const last = runs.at(-1);
      if (last?.owner === owner) last.to = r.t;
      else runs.push({ owner, from: r.t, to: r.t });
    }
    lines.push(
      `lifecycle lease: ${runs.map((x) => `${x.owner} t=${x.from}${x.to > x.from ? `-${x.to}` : ''}s`).join(', ')}`,
    );
  }
  if (s3)
    lines.push(`bucket: ${JSON.stringify(before?.bucket)} -> ${JSON.stringify(after?.bucket)}`);
  // Upload objects left after the load: written before a kill (the killed process's sessions,
  // purged once older than uploads.purgeAge) or after (left by a live one).
  const leftUploads = after?.bucket?.uploadObjects ?? 0;
  const kills = servers.flatMap((p) => p.restarts.map((k) => k.t));
  if (after?.bucket && leftUploads && kills.length)
    lines.push(
      `  upload objects left: ${leftUploads}, last modified t=${after.t - after.bucket.oldestUploadS!}-${after.t - after.bucket.newestUploadS!}s (kills at t=${kills.join(', ')}s)`,
    );
  // Answers the load got that no request of it should get (a 5xx, a cut, a timeout).
  const failed = [...counts].filter(([k]) => /\.(5\d\d|-\d)$/.test(k));
  lines.push(`failed answers: ${JSON.stringify(Object.fromEntries(failed))}`);
  if (KILL_REPLICA) {
    // What was in flight on a replica when it was killed: the kill's doing, not the load's.
    const cut = [...counts].filter(([k]) => k.endsWith('.cut'));
    lines.push(`cut by the kills: ${JSON.stringify(Object.fromEntries(cut))}`);
  }
  if (REPLICAS)
    lines.push(
      `failures by replica: ${JSON.stringify(Object.fromEntries([...failures].sort()))} (failures.jsonl)`,
    );
  log('summary\n' + lines.join('\n'));
  writeFileSync(join(OUT, 'summary.txt'), lines.join('\n') + '\n');
}

// ---------------------------------------------------------------- run
await sample('baseline');
const until = Date.now() + LOAD_MS;
// With KILL_WORKER: one worker killed at half the load, every 60 s after (the primary replaces
// it); with replicas, of each replica in turn.
if (process.env.KILL_WORKER) {
  let kills = 0;
  const kill = () => {
    const pid = servers[kills++ % servers.length]!.pid;
    try {
      const kids = readFileSync(`/proc/${pid}/task/${pid}/children`, 'utf8').trim().split(/\s+/);
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
/**
 * KILL_REPLICA: kills the lifecycle lease's holder (r0 when that cannot be told) with SIGKILL, as
 * a pod crashes; the load passes it over from then on. 10 s later it is started again at its
 * address with its config (it takes its old fetch leases over: fleet.md), its old log kept as
 * pullcache.<pid>.log, and it gets load again once it answers /v2/.
 */
async function killReplica(): Promise<void> {
  const owner = lifecycleHolder().live;
  const p = owner ?? servers[0]!;
  const pid = p.pid;
  p.down = true;
  p.killedAt = Date.now();
  try {
    process.kill(pid, 'SIGKILL');
  } catch (e) {
    p.down = false;
    log(`kill of ${p.name} failed`, String(e));
    return;
  }
  const kill: Soaked['restarts'][number] = { t: secs(), pid, owner: owner !== undefined };
  p.restarts.push(kill);
  log(
    `killed ${p.name} (pid ${pid}, ${owner ? 'the lifecycle lease holder' : 'the lease holder not told'}); started again in 10 s`,
  );
  await new Promise((r) => setTimeout(r, 10_000));
  kill.log = join(dirname(p.log), `pullcache.${pid}.log`);
  renameSync(p.log, kill.log);
  try {
    p.server = await p.start(p.port);
  } catch (e) {
    log(`${p.name} did not start again`, String(e));
    return; // stays down
  }
  p.pid = p.server.pid;
  kill.newPid = p.pid;
  kill.upT = secs();
  p.down = false;
  log(`${p.name} answering again: pid ${p.pid} at ${p.server.url}`);
}
const killing: Promise<void>[] = [];
if (KILL_REPLICA) {
  setTimeout(() => {
    killing.push(killReplica());
    setTimeout(() => {
      if (Date.now() < until - 30_000) killing.push(killReplica());
    }, 60_000);
  }, LOAD_MS / 2);
}
// With REDIS: Redis stopped for 30 s at a third of the load, then started again.
if (REDIS_PORT && process.env.REDIS) {
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
const snapshot = (n: number) => {
  for (const p of servers) if (!p.down) process.kill(p.pid, 'SIGUSR2');
  log(`heap snapshot ${n} requested`);
};
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
      snapshot(1);
    }
  }
});
await Promise.all([...workers, retagLoop(until)]);
await Promise.all(killing); // a replica started again is sampled to the end
clearInterval(timer);
agent.destroy();
log('load done; counts', Object.fromEntries([...counts].sort()));
await sample('end');
for (const wait of [15, 30, 45, 60]) {
  await new Promise((r) => setTimeout(r, 15_000));
  await sample(`idle+${wait}s`);
}
if (!process.env.NO_SNAPSHOT) {
  snapshot(2);
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
summarize();
if (process.env.KEEP_RUNNING) {
  log('servers left running (KEEP_RUNNING)');
} else {
  await Promise.all(servers.map((p) => p.server.stop()));
  await registry.close();
  if (REDIS_PORT) spawnSync('redis-cli', ['-p', String(REDIS_PORT), 'shutdown', 'nosave']);
  await s3?.stop();
}
log(`samples, logs and storage: ${OUT}`);
log('done');
process.exit(0);
