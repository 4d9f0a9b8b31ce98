// Where the CPU goes on a cold blob: CPU seconds of pullcache (by thread) and the upstream over
// three fresh 512 MiB blobs, each then fetched once more cached (or distribution's proxy):
// node --import tsx bench/cold.ts [pullcache|distribution|nginx]; CLIENTS=16 has 16 clients (curl piped
// into cmp) on each 256 MiB blob instead of one curl on 512 MiB. RECYCLE=1 writes and deletes a
// file of the blob's size just before each cold GET, so that the server's new file gets pages the
// guest has just freed rather than fresh ones its host must hand back (docs/benchmark.md, "Fresh
// page-cache pages"); the line then also says what that write cost.
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { TestRegistry } from '../test/helpers/registry.js';
import { curlGet, sameBytes, timed } from './measure.js';
import { newFileCpu, settledCpu, statCpu } from './fleet.js';
import { pushFileBlob, randomBlob } from './seed.js';
import { startDistributionProxy, startNginxCache, startPullcacheProcess } from './servers.js';

/** CPU seconds (user + system) a process has used, threads included. */
const cpu = (pid: number) => statCpu(`/proc/${pid}/stat`);

/** CPU seconds by thread name (node's main thread, libuv workers, V8 GC helpers...). */
function threads(pid: number): Map<string, number> {
  const out = new Map<string, number>();
  for (const tid of readdirSync(`/proc/${pid}/task`)) {
    const stat = readFileSync(`/proc/${pid}/task/${tid}/stat`, 'utf8');
    const name = stat.slice(stat.indexOf('(') + 1, stat.lastIndexOf(')'));
    const f = stat.slice(stat.lastIndexOf(') ') + 2).split(' ');
    const key = tid === String(pid) ? 'main' : name;
    out.set(`${key} user`, (out.get(`${key} user`) ?? 0) + Number(f[11]) / 100);
    out.set(`${key} sys`, (out.get(`${key} sys`) ?? 0) + Number(f[12]) / 100);
  }
  return out;
}

const which = process.argv[2] ?? 'pullcache';
const work = mkdtempSync(join(tmpdir(), 'pullcache-bench-'));
const up = await TestRegistry.start();
const server =
  which === 'nginx'
    ? await startNginxCache(join(work, which), up, ['bench/c0', 'bench/c1', 'bench/c2'])
    : await (which === 'distribution' ? startDistributionProxy : startPullcacheProcess)(
        join(work, which),
        up.url,
      );
const clients = Number(process.env.CLIENTS ?? 1);
for (let i = 0; i < 3; i++) {
  const blob = await randomBlob(work, `b${i}`, (clients === 1 ? 512 : 256) * 1024 * 1024);
  await pushFileBlob(up, `bench/c${i}`, blob);
  await settledCpu(server.pid);
  const recycled = process.env.RECYCLE ? newFileCpu(work, blob.size / (1024 * 1024)) : undefined;
  const [s0, u0, t0] = [cpu(server.pid), cpu(up.pid!), threads(server.pid)];
  const url = `${server.url}/v2/bench/c${i}/blobs/${blob.digest}`;
  const t =
    clients === 1
      ? await curlGet(url)
      : await timed(() =>
          Promise.all(Array.from({ length: clients }, () => sameBytes(url, blob.path))),
        ).then((r) => {
          if (!r.value.every(Boolean)) throw new Error('bad bytes');
          return { ttfb: 0, total: r.seconds, bytes: blob.size * clients, status: 200 };
        });
  const atLastByte = cpu(server.pid);
  // Counted until the server is idle: distribution stores the blob after the response.
  await settledCpu(server.pid);
  const [s1, u1, t1] = [cpu(server.pid), cpu(up.pid!), threads(server.pid)];
  const split = [...t1]
    .map(([k, v]) => [k, v - (t0.get(k) ?? 0)] as const)
    .filter(([, v]) => v > 0.01)
    .map(([k, v]) => `${k} ${v.toFixed(2)}`)
    .join(', ');
  const cached = await curlGet(`${server.url}/v2/bench/c${i}/blobs/${blob.digest}`);
  console.error(
    `${which}: cached ${(cached.bytes / cached.total / 1e6).toFixed(0)} MB/s; cold: ${(t.bytes / t.total / 1e6).toFixed(0)} MB/s, ttfb ${(t.ttfb * 1000).toFixed(1)} ms, wall ${t.total.toFixed(2)} s; cpu s: server ${(s1 - s0).toFixed(2)} (${(s1 - atLastByte).toFixed(2)} after the last byte), upstream ${(u1 - u0).toFixed(2)} (${split}); peak rss ${(server.peakRss() / 1e6).toFixed(0)} MB${recycled === undefined ? '' : `; the file recycled before: ${recycled.toFixed(2)} CPU-s per GiB`}`,
  );
}
await server.stop();
await up.close();
// Three blobs and the server's copies: a few GB a run.
rmSync(work, { recursive: true, force: true });
process.exit(0);
