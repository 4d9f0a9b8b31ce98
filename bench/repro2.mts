import { execFile } from 'node:child_process';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { TestRegistry } from '../test/helpers/registry.js';
import { pushImage, realisticLayer } from './seed.js';
import { startPullcacheProcess } from './servers.js';
const run = promisify(execFile);
const work = mkdtempSync(join(tmpdir(), 'pullcache-bench-'));
const up = await TestRegistry.start();
const scale = Number(process.argv[2] ?? 1);
const layers = [];
for (const [i, raw] of [210, 160, 120, 95, 65].entries()) layers.push(await realisticLayer(work, `l${i}`, Math.round(raw * scale * 1024 * 1024)));
const image = await pushImage(up, 'bench/app', 'v1', layers);
console.error('pushed', work);
const pc = await startPullcacheProcess(join(work, 'pc'), up.url);
const t = Date.now();
try {
  await run('skopeo', ['--insecure-policy', 'copy', '--src-tls-verify=false', `docker://${pc.host}/bench/app:v1`, `dir:${join(work, 'out')}`], { timeout: 60_000 });
  console.error('copied in', (Date.now() - t) / 1000);
} catch (e) { console.error('skopeo failed', (e as Error).message.slice(0, 300)); }
await pc.stop();
await up.close();
process.exit(0);
