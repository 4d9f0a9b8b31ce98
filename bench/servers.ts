/**
 * The servers under test, each a process of its own: pullcache and distribution's proxy; and, for
 * the cold path's CPU only, nginx's proxy_cache (a plain cache: it checks no digest).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createWriteStream, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { freePort, waitFor } from '../test/helpers/net.js';
import type { TestRegistry } from '../test/helpers/registry.js';

/** The variable a replica reads its peer secret from (server.peerSecretEnv). */
const PEER_SECRET_ENV = 'BENCH_PEER_SECRET';

export interface ServerUnderTest {
  name: 'pullcache' | 'distribution' | 'nginx';
  url: string;
  host: string;
  pid: number;
  /** Peak resident set size so far, bytes (VmHWM). */
  peakRss(): number;
  stop(): Promise<void>;
}

function spawnLogged(
  command: string,
  args: string[],
  log: string,
  env: NodeJS.ProcessEnv = process.env,
  cwd?: string,
): ChildProcess {
  const out = createWriteStream(log);
  const child = spawn(command, args, { stdio: ['ignore', 'pipe', 'pipe'], env, cwd });
  child.stdout!.pipe(out);
  child.stderr!.pipe(out);
  return child;
}

function procStatus(pid: number, field: string): number {
  const m = new RegExp(`^${field}:\\s+(\\d+) kB`, 'm').exec(
    readFileSync(`/proc/${pid}/status`, 'utf8'),
  );
  return m ? Number(m[1]) * 1024 : 0;
}

async function ready(
  url: string,
  what: string,
  child: ChildProcess,
  log: string,
  expected = 200,
): Promise<void> {
  const exited = new Promise<never>((_, reject) =>
    child.once('exit', (code) =>
      reject(
        new Error(
          `${what} exited during start-up (code ${code}); see ${log}:\n${readFileSync(log, 'utf8').slice(0, 2000)}`,
        ),
      ),
    ),
  );
  await Promise.race([
    exited,
    waitFor(
      async () => {
        const res = await fetch(`${url}/v2/`);
        await res.arrayBuffer();
        return res.status === expected;
      },
      what,
      20_000,
    ),
  ]);
  exited.catch(() => {});
}

function handle(name: ServerUnderTest['name'], child: ChildProcess, port: number): ServerUnderTest {
  return {
    name,
    url: `http://127.0.0.1:${port}`,
    host: `127.0.0.1:${port}`,
    pid: child.pid!,
    peakRss: () => procStatus(child.pid!, 'VmHWM'),
    stop: () =>
      new Promise<void>((resolve) => {
        if (child.exitCode !== null || child.signalCode !== null) return resolve();
        child.once('exit', () => resolve());
        child.kill('SIGTERM');
      }),
  };
}

export async function startPullcacheProcess(
  dir: string,
  upstreamUrl: string,
  options: {
    htpasswd?: string;
    workers?: number;
    /**
     * A replica of a fleet: its peers share this Redis and secret (server.advertise), and a
     * storage: a filesystem `root`, or the `storage` lines' bucket.
     */
    replica?: { redisUrl: string; peerSecret: string; root?: string };
    /** The `storage:` block's lines, instead of a filesystem root (the soak's bucket). */
    storage?: string[];
    /** More top-level blocks (`retention:`, `cache:`...). */
    top?: string[];
    /** The upstream's tag freshness window (1h: the benchmarks' tags never move). */
    tagTTL?: string;
    /** Node flags through the launcher, instead of PULLCACHE_BENCH_NODE_ARGS. */
    nodeFlags?: string;
    /** More environment: the variables the config names (`accessKeyEnv`...). */
    env?: Record<string, string>;
    /** The working directory (where heap snapshots land); the caller's by default. */
    cwd?: string;
    /**
     * The port to listen on (and advertise), instead of a free one: a replica started again as a
     * crashed pod comes back, at its old address. Its log starts afresh: move the old one first.
     */
    port?: number;
  } = {},
): Promise<ServerUnderTest> {
  const port = options.port ?? (await freePort());
  mkdirSync(dir, { recursive: true });
  const config = join(dir, 'pullcache.yaml');
  writeFileSync(
    config,
    [
      'server:',
      `  listen: 127.0.0.1:${port}`,
      `  workers: ${options.workers ?? 1}`,
      ...(options.replica
        ? [`  advertise: http://127.0.0.1:${port}`, `  peerSecretEnv: ${PEER_SECRET_ENV}`]
        : []),
      ...(options.replica
        ? ['cache:', '  store: redis', '  redis:', `    url: ${options.replica.redisUrl}`]
        : []),
      'storage:',
      ...(options.storage ?? [
        '  filesystem:',
        `    root: ${options.replica?.root ?? join(dir, 'data')}`,
      ]),
      ...(options.top ?? []),
      'upstreams:',
      '  docker.io:',
      `    url: ${upstreamUrl}`,
      `    tagTTL: ${options.tagTTL ?? '1h'}`,
      'log:',
      `  level: ${process.env.PULLCACHE_BENCH_LOG_LEVEL ?? 'warn'}`,
      // Client authentication: every user of the file may pull everything (no rules).
      ...(options.htpasswd ? ['auth:', `  htpasswd: ${options.htpasswd}`] : []),
      '',
    ].join('\n'),
  );
  // Only its own config: no PULLCACHE_* from the caller's environment.
  const env = Object.fromEntries(
    Object.entries(process.env).filter(([k]) => !k.startsWith('PULLCACHE_')),
  );
  Object.assign(env, options.env);
  // The peer secret as deployments give it, in the environment: the config files kept hold none.
  if (options.replica) env[PEER_SECRET_ENV] = options.replica.peerSecret;
  const log = join(dir, 'pullcache.log');
  // Started the way users start it (bin/pullcache: node's flags, malloc settings), so that what
  // is measured is what runs. PULLCACHE_BENCH_NODE_ARGS adds node flags through the launcher
  // ("--cpu-prof --cpu-prof-dir=/tmp/prof" profiles the server, "--trace-gc" logs collections).
  const nodeArgs = options.nodeFlags ?? process.env.PULLCACHE_BENCH_NODE_ARGS;
  if (nodeArgs) env.PULLCACHE_NODE_FLAGS = nodeArgs;
  const child = spawnLogged(
    join(process.cwd(), 'bin/pullcache'), // this repository's, whatever `cwd` is
    ['serve', '--config', config],
    log,
    env,
    options.cwd,
  );
  const server = handle('pullcache', child, port);
  // With authentication, /v2/ without credentials is the 401 challenge.
  await ready(server.url, 'pullcache', child, log, options.htpasswd ? 401 : 200);
  return server;
}

export async function startDistributionProxy(
  dir: string,
  upstreamUrl: string,
): Promise<ServerUnderTest> {
  const port = await freePort();
  mkdirSync(join(dir, 'storage'), { recursive: true });
  const config = join(dir, 'distribution.yml');
  writeFileSync(
    config,
    [
      'version: 0.1',
      'log:',
      '  level: error',
      '  accesslog:',
      '    disabled: true',
      'storage:',
      '  filesystem:',
      `    rootdirectory: ${join(dir, 'storage')}`,
      '  cache:',
      '    blobdescriptor: inmemory',
      'http:',
      `  addr: 127.0.0.1:${port}`,
      'proxy:',
      `  remoteurl: ${upstreamUrl}`,
      '',
    ].join('\n'),
  );
  const log = join(dir, 'distribution.log');
  const child = spawnLogged('docker-registry', ['serve', config], log);
  const server = handle('distribution', child, port);
  await ready(server.url, 'distribution proxy', child, log);
  return server;
}

/**
 * nginx's proxy_cache in front of the upstream, as a plain cache is set up for large files: the
 * response is kept as it streams (a temporary file in the cache directory, renamed into place),
 * one fetch per key at a time (`proxy_cache_lock`), 64 KiB buffers, sendfile for hits. It sends
 * the upstream a pull token of its own (`repositories`), since it cannot answer a challenge. One
 * process (`master_process off`), so that its CPU is that process's.
 */
export async function startNginxCache(
  dir: string,
  upstream: TestRegistry,
  repositories: string[],
): Promise<ServerUnderTest> {
  const port = await freePort();
  for (const sub of ['cache', 'tmp']) mkdirSync(join(dir, sub), { recursive: true });
  // Good for the token server's default lifetime (5 minutes): the bench asks within that.
  const token = upstream.tokens.sign(
    null,
    repositories.map((r) => `repository:${r}:pull`).join(' '),
  );
  const temp = ['client_body', 'proxy', 'fastcgi', 'uwsgi', 'scgi'].map(
    (kind) => `  ${kind}_temp_path ${join(dir, 'tmp', kind)};`,
  );
  const config = join(dir, 'nginx.conf');
  writeFileSync(
    config,
    [
      'daemon off;',
      'master_process off;',
      'worker_processes 1;',
      `error_log ${join(dir, 'error.log')} warn;`,
      `pid ${join(dir, 'nginx.pid')};`,
      'events { worker_connections 1024; }',
      'http {',
      '  access_log off;',
      '  sendfile on;',
      '  tcp_nopush on;',
      ...temp,
      `  proxy_cache_path ${join(dir, 'cache')} levels=1:2 keys_zone=blobs:10m max_size=100g inactive=7d use_temp_path=off;`,
      '  server {',
      `    listen 127.0.0.1:${port};`,
      '    location / {',
      `      proxy_pass ${upstream.url};`,
      '      proxy_http_version 1.1;',
      '      proxy_set_header Connection "";',
      `      proxy_set_header Authorization "Bearer ${token}";`,
      '      proxy_buffer_size 64k;',
      '      proxy_buffers 32 64k;',
      '      proxy_busy_buffers_size 256k;',
      '      proxy_cache blobs;',
      '      proxy_cache_valid 200 7d;',
      '      proxy_cache_lock on;',
      '      proxy_ignore_headers Cache-Control Expires Set-Cookie;',
      '    }',
      '  }',
      '}',
      '',
    ].join('\n'),
  );
  const log = join(dir, 'nginx.log');
  const child = spawnLogged('nginx', ['-c', config, '-p', dir], log);
  const server = handle('nginx', child, port);
  await ready(server.url, 'nginx', child, log);
  return server;
}
