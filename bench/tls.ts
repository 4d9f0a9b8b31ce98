// A cold blob from an HTTPS upstream: pullcache's CPU seconds and throughput on three fresh
// 512 MiB blobs served by a plain node:https server standing in for a registry (bench/cold.ts
// has the plain-HTTP upstream of the benchmark). TLS hands a body out one 16 KiB record at a
// time, where a plain socket read on loopback brings 400-500 KiB.
//   npm run build && node --import tsx bench/tls.ts
import { spawn } from 'node:child_process';
import { createHash, randomFillSync } from 'node:crypto';
import { mkdtempSync, readFileSync } from 'node:fs';
import { createServer } from 'node:https';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { TestCa } from '../test/helpers/tls.js';
import { settledCpu } from './fleet.js';
import { curlGet } from './measure.js';
import { startPullcacheProcess } from './servers.js';

const SIZE = 512 * 1024 * 1024;

/** The upstream, in a process of its own: /v2/ and three random blobs, by digest. */
function serve(certPath: string, keyPath: string): void {
  const blobs = new Map<string, Buffer>();
  for (let i = 0; i < 3; i++) {
    const b = randomFillSync(Buffer.allocUnsafe(SIZE));
    blobs.set(`sha256:${createHash('sha256').update(b).digest('hex')}`, b);
  }
  const server = createServer(
    { cert: readFileSync(certPath), key: readFileSync(keyPath) },
    (req, res) => {
      const digest = /\/blobs\/(sha256:[0-9a-f]{64})$/.exec(req.url ?? '')?.[1];
      if (!digest) {
        res.writeHead(200, { 'docker-distribution-api-version': 'registry/2.0' }).end('{}');
        return;
      }
      const blob = blobs.get(digest);
      if (!blob) return void res.writeHead(404).end();
      res.writeHead(200, { 'content-length': blob.length, 'docker-content-digest': digest });
      let at = 0;
      const next = (): void => {
        while (at < blob.length)
          if (!res.write(blob.subarray(at, (at += 1024 * 1024))))
            return void res.once('drain', next);
        res.end();
      };
      next();
    },
  );
  server.listen(0, '127.0.0.1', () => {
    const port = (server.address() as { port: number }).port;
    process.stdout.write(`${JSON.stringify({ port, digests: [...blobs.keys()] })}\n`);
  });
}

if (process.argv[2] === 'serve') serve(process.argv[3]!, process.argv[4]!);
else {
  const ca = TestCa.create();
  const cert = ca.issue();
  const up = spawn(
    process.execPath,
    ['--import', 'tsx', fileURLToPath(import.meta.url), 'serve', cert.certPath, cert.keyPath],
    { stdio: ['ignore', 'pipe', 'inherit'] },
  );
  const { port, digests } = JSON.parse(
    await new Promise<string>((resolve) => up.stdout.once('data', (d) => resolve(String(d)))),
  ) as { port: number; digests: string[] };
  // Inherited by pullcache, which then trusts the test CA.
  process.env.NODE_EXTRA_CA_CERTS = ca.certPath;
  const work = mkdtempSync(join(tmpdir(), 'pullcache-bench-'));
  const server = await startPullcacheProcess(join(work, 'pullcache'), `https://127.0.0.1:${port}`);
  try {
    for (const digest of digests) {
      const before = await settledCpu(server.pid);
      const t = await curlGet(`${server.url}/v2/bench/tls/blobs/${digest}`);
      if (t.status !== 200 || t.bytes !== SIZE)
        throw new Error(`HTTP ${t.status}, ${t.bytes} bytes`);
      const cpu = (await settledCpu(server.pid)) - before;
      console.error(
        `pullcache, HTTPS upstream: cold ${(t.bytes / t.total / 1e6).toFixed(0)} MB/s, ${cpu.toFixed(2)} CPU-s per 512 MiB (peak rss ${(server.peakRss() / 1e6).toFixed(0)} MB)`,
      );
    }
  } finally {
    await server.stop();
    up.kill();
    ca.remove();
  }
  process.exit(0);
}
