// Profiles pullcache under wrk on manifests by digest (or by tag: pass "tag"). For the profile:
// PULLCACHE_BENCH_NODE_ARGS="--cpu-prof --cpu-prof-dir=/tmp/prof" node --import tsx bench/profile-manifests.ts
// (WRK_SECONDS=20 for a longer run, e.g. with --trace-gc to watch the old generation fill and empty).
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { TestRegistry } from '../test/helpers/registry.js';
import { makeImage, pushImage } from '../test/helpers/images.js';
import { wrk } from './measure.js';
import { startPullcacheProcess } from './servers.js';
const work = mkdtempSync(join(tmpdir(), 'pullcache-bench-'));
const up = await TestRegistry.start();
const image = makeImage('bench/app', 'v1', 'oci', [1000, 2000, 3000]);
await pushImage(up, image);
const pc = await startPullcacheProcess(join(work, 'pc'), up.url);
const url = `${pc.url}/v2/bench/app/manifests/${process.argv[2] === 'tag' ? 'v1' : image.digest}`;
await fetch(url).then((r) => r.arrayBuffer());
console.error(await wrk(url, { Accept: image.mediaType }, Number(process.env.WRK_SECONDS ?? 5)));
console.error('rss', (pc.peakRss() / 1e6).toFixed(0), 'MB');
await pc.stop();
await up.close();
process.exit(0);
