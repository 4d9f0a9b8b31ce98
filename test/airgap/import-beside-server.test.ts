/**
 * `pullcache import` beside a server running on the same storage: the server serves what the
 * import brought at once, a tag the import moved included (its caches in front of storage forget
 * what they held), with real parts: a registry, prefetch and export through the CLI, a server.
 */
import { rmSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { makeImage, pushImage, type Image } from '../helpers/images.js';
import { startPullcache } from '../helpers/pullcache.js';
import { TestRegistry } from '../helpers/registry.js';
import { cli, configFile, tmp } from '../helpers/cli.js';

describe('import beside a running server', () => {
  let registry: TestRegistry;
  let first: Image;
  let second: Image;
  const dirs: string[] = [];
  const dir = (what: string) => {
    const made = tmp(what);
    dirs.push(made);
    return made;
  };
  let bundleOfFirst: string;
  let bundleOfSecond: string;

  /** Prefetches org/app:v1 as the registry has it now into a new cache, and exports it. */
  async function bundleOfNow(name: string): Promise<string> {
    const config = configFile(dir('cache'), { 'docker.io': { url: registry.url } });
    expect((await cli('prefetch', '-c', config, 'org/app:v1')).code).toBe(0);
    const bundle = join(dir('bundle'), `${name}.tar`);
    expect((await cli('export', '-c', config, '-o', bundle, 'org/app:v1')).code).toBe(0);
    return bundle;
  }

  beforeAll(async () => {
    registry = await TestRegistry.start();
    first = makeImage('org/app', 'v1', 'oci', [20_000]);
    second = makeImage('org/app', 'v1', 'oci', [30_000]);
    await pushImage(registry, first);
    bundleOfFirst = await bundleOfNow('first');
    await pushImage(registry, second); // the tag moves upstream
    bundleOfSecond = await bundleOfNow('second');
  });
  afterAll(async () => {
    await registry?.close();
    for (const d of dirs) rmSync(d, { recursive: true, force: true });
  });

  test('a tag the import moved is served at its new digest at once, not the one the server remembered', async () => {
    const root = dir('offline');
    const upstreams = { 'docker.io': { url: 'http://registry.invalid', offline: true } };
    const config = configFile(root, upstreams);
    expect((await cli('import', '-c', config, bundleOfFirst)).code).toBe(0);
    const pc = await startPullcache({ upstreams }, root);
    try {
      const head = () => fetch(`${pc.url}/v2/org/app/manifests/v1`, { method: 'HEAD' });
      // Twice: the second answer comes from what the server keeps in memory.
      for (let i = 0; i < 2; i++)
        expect((await head()).headers.get('docker-content-digest')).toBe(first.digest);
      const imported = await cli('import', '-c', config, bundleOfSecond);
      expect(imported.code).toBe(0);
      expect(imported.stderr).toContain('1 tags set');
      const res = await head();
      expect(res.status).toBe(200);
      expect(res.headers.get('docker-content-digest')).toBe(second.digest);
      const manifest = await fetch(`${pc.url}/v2/org/app/manifests/v1`, {
        headers: { accept: 'application/vnd.oci.image.manifest.v1+json' },
      });
      expect(Buffer.from(await manifest.arrayBuffer()).equals(second.manifest)).toBe(true);
    } finally {
      await pc.stop();
    }
  });
});
