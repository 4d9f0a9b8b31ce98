// Profiles pullcache under wrk on manifests by digest (or by tag: pass "tag"). For the profile:
// PULLCACHE_BENCH_NODE_ARGS="--cpu-prof --cpu-prof-dir=/tmp/prof" node --import tsx bench/profile-manifests.ts
// (WRK_SECONDS=20 for a longer run, e.g. with --trace-gc to watch the old generation fill and empty).
// "basic" or "token" (after "digest" or "tag") runs pullcache with client authentication and
// sends Basic credentials or a token of its realm with every request.
import { execFileSync } from 'node:child_process';
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
const auth = process.argv[3];
let htpasswd: string | undefined;
if (auth) {
  htpasswd = join(work, 'htpasswd');
  execFileSync('htpasswd', ['-cbB', htpasswd, 'bench', 'bench-pw']);
}
const pc = await startPullcacheProcess(join(work, 'pc'), up.url, { htpasswd });
const headers: Record<string, string> = { Accept: image.mediaType };
const basic = `Basic ${Buffer.from('bench:bench-pw').toString('base64')}`;
if (auth === 'basic') headers.Authorization = basic;
if (auth === 'token') {
  const res = await fetch(`${pc.url}/_pullcache/token`, { headers: { Authorization: basic } });
  headers.Authorization = `Bearer ${((await res.json()) as { token: string }).token}`;
}
const url = `${pc.url}/v2/bench/app/manifests/${process.argv[2] === 'tag' ? 'v1' : image.digest}`;
await fetch(url, { headers }).then((r) => r.arrayBuffer());
console.error(await wrk(url, headers, Number(process.env.WRK_SECONDS ?? 5)));
console.error('rss', (pc.peakRss() / 1e6).toFixed(0), 'MB');
await pc.stop();
await up.close();
process.exit(0);
