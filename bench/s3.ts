/**
 * `node --import tsx bench/s3.ts`: pullcache on the filesystem against pullcache on S3 (a
 * throw-away Ceph radosgw on loopback, see test/helpers/s3.ts), each a `pullcache serve` process
 * with an empty cache behind the same upstream: a cold pull of one 64 MiB blob (fetched, kept),
 * the same blob warm (one client, from storage), and 32 clients on a warm 1 MiB blob for 8 s (wrk).
 * A tool, not a test: it prints a table and asserts nothing. Loopback S3 flatters S3 (no network
 * between the replica and the store); the point is what the driver itself costs.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { makeImage, pushBlob, pushImage, type Image } from '../test/helpers/images.js';
import { freePort, waitFor } from '../test/helpers/net.js';
import { TestRegistry } from '../test/helpers/registry.js';
import { startS3 } from '../test/helpers/s3.js';
import { timed, wrk } from './measure.js';

const MiB = 1024 * 1024;

async function getAll(url: string): Promise<number> {
  const res = await fetch(url);
  if (res.status !== 200) throw new Error(`${url}: ${res.status}`);
  let n = 0;
  for await (const chunk of res.body!) n += (chunk as Uint8Array).length;
  return n;
}

async function serve(dir: string, storage: object, upstream: string) {
  const port = await freePort();
  const config = join(dir, 'pullcache.yaml');
  writeFileSync(
    config,
    JSON.stringify({
      server: { listen: `127.0.0.1:${port}` },
      storage,
      upstreams: { 'docker.io': { url: upstream, tagTTL: '1h' } },
      log: { level: 'warn' },
    }),
  );
  const child: ChildProcess = spawn('bin/pullcache', ['serve', '--config', config], {
    stdio: 'ignore',
  });
  const url = `http://127.0.0.1:${port}`;
  await waitFor(async () => (await fetch(`${url}/readyz`)).status === 200, 'pullcache', 60_000);
  return {
    url,
    stop: () =>
      new Promise<void>((resolve) => {
        child.once('exit', () => resolve());
        child.kill('SIGTERM');
      }),
  };
}

async function main(): Promise<void> {
  const registry = await TestRegistry.start();
  const s3 = await startS3();
  const dir = mkdtempSync(join(tmpdir(), 'pullcache-bench-s3-'));
  try {
    // Random bytes: layers that do not compress, so the blobs are the sizes named.
    const image: Image = makeImage('org/bench', 'v1', 'oci', [1, 1]);
    const { randomBytes, createHash } = await import('node:crypto');
    const blob = (size: number) => {
      const bytes = randomBytes(size);
      return {
        bytes,
        digest: `sha256:${createHash('sha256').update(bytes).digest('hex')}`,
        mediaType: 'application/octet-stream',
      };
    };
    await pushImage(registry, image);
    // Blobs of the repository beside the image (pulled by digest, as clients do).
    const [big, small] = [blob(64 * MiB), blob(1 * MiB)];
    for (const b of [big, small]) await pushBlob(registry, image.repository, b);
    process.env.PULLCACHE_BENCH_S3_KEY = s3.accessKey;
    process.env.PULLCACHE_BENCH_S3_SECRET = s3.secretKey;
    const rows: string[] = [];
    for (const kind of ['filesystem', 's3'] as const) {
      const storage =
        kind === 's3'
          ? {
              driver: 's3',
              s3: {
                bucket: await s3.bucket(),
                endpoint: s3.endpoint,
                forcePathStyle: true,
                accessKeyEnv: 'PULLCACHE_BENCH_S3_KEY',
                secretKeyEnv: 'PULLCACHE_BENCH_S3_SECRET',
              },
            }
          : { filesystem: { root: join(dir, 'fs-data') } };
      const pc = await serve(mkdtempSync(join(dir, `${kind}-`)), storage, registry.url);
      try {
        const blobUrl = (digest: string) => `${pc.url}/v2/org/bench/blobs/${digest}`;
        // The small one first: a fresh RGW cluster's first writes (pool set-up) are not the
        // figure; it is cached before the 32-client phase anyway.
        await getAll(blobUrl(small.digest));
        const cold = await timed(() => getAll(blobUrl(big.digest)));
        await new Promise((r) => setTimeout(r, 1000)); // the commits settle
        const warmRuns: number[] = [];
        for (let i = 0; i < 3; i++)
          warmRuns.push((await timed(() => getAll(blobUrl(big.digest)))).seconds);
        const warm = warmRuns.sort((a, b) => a - b)[1]!;
        const many = await wrk(blobUrl(small.digest), {}, 8);
        rows.push(
          `| ${kind} | ${((64 * MiB) / MiB / cold.seconds).toFixed(0)} MiB/s | ${((64 * MiB) / MiB / warm).toFixed(0)} MiB/s | ${many.rps.toFixed(0)} req/s (${many.rps.toFixed(0)} MiB/s), ${many.errors} errors |`,
        );
      } finally {
        await pc.stop();
      }
    }
    console.log(
      '| storage | cold 64 MiB, 1 client | warm 64 MiB, 1 client | warm 1 MiB, 32 clients, 8 s |',
    );
    console.log('| --- | --- | --- | --- |');
    for (const row of rows) console.log(row);
  } finally {
    await s3.stop();
    await registry.close();
    rmSync(dir, { recursive: true, force: true });
  }
}

await main();
