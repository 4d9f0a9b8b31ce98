/**
 * The cache's lifecycle at scale (`npm run bench:lifecycle`): a storage of BLOBS blobs (100,000 by
 * default) in images of ten blobs each, made on disk directly; then `bin/pullcache serve` on it,
 * as users start it. Measures how soon it answers (`GET /v2/`), how long the background scan of
 * storage takes, the memory the image graph costs per blob, and how many images an eviction
 * removes per second (a restart with a budget of half the content).
 *
 * Needs `npm run build` first (bin/pullcache runs dist/). A tool, not a test.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const BLOBS = Number(process.env.BLOBS ?? 100_000);
const PER_IMAGE = 10; // the manifest and nine blobs
const IMAGES_PER_REPO = 10;
const BLOB_SIZE = 512;

const root = mkdtempSync(join(tmpdir(), 'pullcache-bench-lifecycle-'));
const data = join(root, 'data');

function putBlob(bytes: Buffer): string {
  const hex = createHash('sha256').update(bytes).digest('hex');
  const dir = join(data, 'blobs', 'sha256', hex.slice(0, 2), hex);
  mkdirSync(dir, { recursive: true });
  writeFileSync(join(dir, 'data'), bytes);
  return `sha256:${hex}`;
}

function link(path: string, content: string): void {
  mkdirSync(join(data, path, '..'), { recursive: true });
  writeFileSync(join(data, path), content);
}

function seed(): { images: number; bytes: number } {
  const images = Math.floor(BLOBS / PER_IMAGE);
  let bytes = 0;
  const started = Date.now();
  for (let i = 0; i < images; i++) {
    const repo = `repositories/docker.io/bench/r${Math.floor(i / IMAGES_PER_REPO)}`;
    const layers = Array.from({ length: PER_IMAGE - 1 }, () => {
      const content = randomBytes(BLOB_SIZE);
      bytes += content.length;
      const digest = putBlob(content);
      const hex = digest.slice(7);
      link(`${repo}/_layers/sha256/${hex}/link`, digest);
      return { mediaType: 'application/vnd.oci.image.layer.v1.tar+gzip', size: BLOB_SIZE, digest };
    });
    const manifest = Buffer.from(
      JSON.stringify({
        schemaVersion: 2,
        mediaType: 'application/vnd.oci.image.manifest.v1+json',
        config: layers[0],
        layers: layers.slice(1),
      }),
    );
    bytes += manifest.length;
    const digest = putBlob(manifest);
    link(
      `${repo}/_manifests/revisions/sha256/${digest.slice(7)}/link`,
      JSON.stringify({
        digest,
        mediaType: 'application/vnd.oci.image.manifest.v1+json',
        size: manifest.length,
      }),
    );
    link(
      `${repo}/_manifests/tags/t${i % IMAGES_PER_REPO}/current/link`,
      JSON.stringify({ digest, confirmedAt: Date.now() }),
    );
  }
  console.error(
    `seeded ${images} images, ${images * PER_IMAGE} blobs in ${Date.now() - started} ms`,
  );
  return { images, bytes };
}

interface Run {
  child: ChildProcess;
  lines: Record<string, unknown>[];
  waitFor(msg: string, timeoutMs?: number): Promise<Record<string, unknown>>;
}

function serve(port: number, retention: string): Run {
  const config = join(root, `config-${port}.yaml`);
  writeFileSync(
    config,
    [
      `server: { listen: "127.0.0.1:${port}" }`,
      `storage: { filesystem: { root: "${data}" } }`,
      'upstreams: { docker.io: { url: "http://127.0.0.1:9", offline: true } }',
      `retention: ${retention}`,
    ].join('\n'),
  );
  const child = spawn('bin/pullcache', ['serve', '--config', config], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const lines: Record<string, unknown>[] = [];
  const waiters: { msg: string; resolve: (l: Record<string, unknown>) => void }[] = [];
  let buffered = '';
  const read = (chunk: Buffer) => {
    buffered += chunk.toString();
    let nl;
    while ((nl = buffered.indexOf('\n')) >= 0) {
      const text = buffered.slice(0, nl);
      buffered = buffered.slice(nl + 1);
      try {
        const line = JSON.parse(text) as Record<string, unknown>;
        lines.push(line);
        for (const w of waiters.filter((w) => w.msg === line.msg)) w.resolve(line);
      } catch {
        console.error(text);
      }
    }
  };
  child.stdout!.on('data', read);
  child.stderr!.on('data', read);
  return {
    child,
    lines,
    waitFor: (msg, timeoutMs = 300_000) =>
      new Promise((resolve, reject) => {
        const seen = lines.find((l) => l.msg === msg);
        if (seen) return resolve(seen);
        waiters.push({ msg, resolve });
        setTimeout(() => reject(new Error(`no "${msg}" in ${timeoutMs} ms`)), timeoutMs).unref();
      }),
  };
}

/** Private memory of a process (RSS less the mapped executable and libraries), in bytes. */
function privateBytes(pid: number): number {
  const rollup = readFileSync(`/proc/${pid}/smaps_rollup`, 'utf8');
  const kb = (name: string) =>
    Number(new RegExp(`^${name}:\\s+(\\d+)`, 'm').exec(rollup)?.[1] ?? 0);
  return (kb('Private_Clean') + kb('Private_Dirty')) * 1024;
}

async function stop(run: Run): Promise<void> {
  await new Promise<void>((resolve) => {
    run.child.once('exit', () => resolve());
    run.child.kill('SIGTERM');
  });
}

async function main(): Promise<void> {
  const seeded = seed();
  const port = 45000 + Math.floor(Math.random() * 10000);

  // 1. Start-up: how soon it answers, how long the scan takes, what the graph costs.
  const started = performance.now();
  const first = serve(port, '{}');
  let answeredMs = 0;
  for (;;) {
    try {
      const res = await fetch(`http://127.0.0.1:${port}/v2/`);
      if (res.ok) {
        answeredMs = performance.now() - started;
        break;
      }
    } catch {
      // not yet listening
    }
    await new Promise((r) => setTimeout(r, 10));
  }
  const before = privateBytes(first.child.pid!);
  const scanned = await first.waitFor('storage scanned');
  await new Promise((r) => setTimeout(r, 2000)); // let the heap settle
  const after = privateBytes(first.child.pid!);
  const usage = (await (await fetch(`http://127.0.0.1:${port}/_pullcache/v1/usage`)).json()) as {
    blobs: number;
    images: number;
  };
  const listStarted = performance.now();
  const images = (await (
    await fetch(`http://127.0.0.1:${port}/_pullcache/v1/images`)
  ).json()) as unknown[];
  const listMs = performance.now() - listStarted;
  await stop(first);

  // 2. Eviction: a restart with a budget of half the content.
  const second = serve(port + 1, `{ maxSize: ${Math.floor(seeded.bytes / 2)}, lowWater: "100%" }`);
  const evicted = await second.waitFor('evicted least recently pulled images');
  await stop(second);

  const table = [
    ['blobs in storage', String(usage.blobs)],
    ['images', String(usage.images)],
    ['answers GET /v2/ after start', `${Math.round(answeredMs)} ms`],
    ['background scan of storage', `${scanned.durationMs as number} ms`],
    ['memory of the graph per blob', `${Math.round((after - before) / usage.blobs)} bytes`],
    ['GET /_pullcache/v1/images', `${Math.round(listMs)} ms for ${images.length} images`],
    [
      'eviction',
      `${evicted.evicted as number} images in ${evicted.durationMs as number} ms: ${Math.round(((evicted.evicted as number) / (evicted.durationMs as number)) * 1000)} images/s`,
    ],
  ];
  for (const [k, v] of table) console.log(`${k!.padEnd(32)} ${v}`);
  rmSync(root, { recursive: true, force: true });
}

await main();
