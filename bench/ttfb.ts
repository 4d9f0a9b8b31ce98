// Cold time to first byte, pullcache and distribution, five fresh 64 MiB blobs each:
// node --import tsx bench/ttfb.ts
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { TestRegistry } from '../test/helpers/registry.js';
import { curlGet } from './measure.js';
import { pushFileBlob, randomBlob } from './seed.js';
import { startDistributionProxy, startPullcacheProcess } from './servers.js';
const work = mkdtempSync(join(tmpdir(), 'pullcache-bench-'));
const up = await TestRegistry.start();
for (const start of [startDistributionProxy, startPullcacheProcess]) {
  const s = await start(join(work, start.name), up.url);
  const ttfbs = [];
  for (let i = 0; i < 5; i++) {
    const blob = await randomBlob(work, `b${i}`, 64 * 1024 * 1024);
    await pushFileBlob(up, `bench/t${i}`, blob);
    ttfbs.push((await curlGet(`${s.url}/v2/bench/t${i}/blobs/${blob.digest}`)).ttfb * 1000);
  }
  console.error(s.name, ttfbs.map((t) => t.toFixed(1)).join(' '), 'ms');
  await s.stop();
}
await up.close();
process.exit(0);
