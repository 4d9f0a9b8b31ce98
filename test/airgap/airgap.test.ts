/**
 * Air-gapped use, end to end with real parts: prefetch from a real upstream (docker-registry with
 * token auth), export with the upstream stopped, import into empty storage, serve with upstreams
 * that do not even resolve, and pull every image with skopeo. Bundles are read by skopeo as
 * oci-archive:. Damaged and truncated bundles are refused and leave nothing behind.
 */
import {
  existsSync,
  mkdtempSync,
  readFileSync,
  readdirSync,
  statSync,
  truncateSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { parseDigest } from '../../src/oci/digest.js';
import { paths } from '../../src/storage/paths.js';
import type { RepositoryKey } from '../../src/storage/types.js';
import { makeImage, makeIndex, pushImage, type Image } from '../helpers/images.js';
import { ociError } from '../helpers/http.js';
import { startPullcache } from '../helpers/pullcache.js';
import { TestRegistry } from '../helpers/registry.js';
import { expectDirHolds, skopeo, skopeoCopy } from '../helpers/skopeo.js';
import { cli, configFile, type CliResult } from '../helpers/cli.js';
import { snapshot } from '../helpers/files.js';

const tmp = (what: string) => mkdtempSync(join(tmpdir(), `pullcache-airgap-${what}-`));

/** `pullcache import` of `file` into a new cache whose upstreams (the bundle's) cannot be reached. */
async function importOffline(
  file: string,
  rootName: string,
): Promise<{ root: string; r: CliResult }> {
  const root = tmp(rootName);
  const r = await cli(
    'import',
    '--config',
    configFile(root, {
      'docker.io': { url: 'http://registry.invalid' },
      'registry.test': { url: 'http://registry.invalid' },
    }),
    file,
  );
  return { root, r };
}

describe('prefetch, export, import, serve offline', () => {
  let registry: TestRegistry;
  let alpine: Image;
  let multi: Image;
  let armOnly: Image;
  let oci: Image;
  const connected = tmp('connected');
  const bundle = join(tmp('bundle'), 'bundle.tar');
  let connectedConfig: string;

  beforeAll(async () => {
    registry = await TestRegistry.start();
    alpine = makeImage('library/alpine', '3.20', 'docker', [60_000, 20_000]);
    multi = makeIndex('org/multi', 'latest', 'oci', ['amd64', 'arm64']);
    armOnly = makeIndex('org/armonly', 'v2', 'docker', ['amd64', 'arm64']);
    oci = makeImage('org/oci-app', 'v1', 'oci', [30_000, 10_000, 5_000]);
    for (const image of [alpine, multi, armOnly, oci]) await pushImage(registry, image);
    connectedConfig = configFile(connected, {
      'docker.io': { url: registry.url },
      'registry.test': { url: registry.url },
    });
  });
  afterAll(async () => registry?.close());

  test('prefetch fills the cache through the proxy, with a line per layer and image and a summary', async () => {
    const r = await cli(
      'prefetch',
      '--config',
      connectedConfig,
      'alpine:3.20',
      'org/multi:latest',
      'registry.test/org/oci-app:v1',
    );
    expect(r.code).toBe(0);
    expect(r.stderr).toContain('done    docker.io/library/alpine:3.20');
    expect(r.stderr).toContain('done    registry.test/org/oci-app:v1');
    expect(r.stderr).toMatch(/fetched sha256:[a-f0-9]{12}/);
    expect(r.stderr).toContain('3 of 3 images complete');
    // Again: everything is already cached.
    const again = await cli('prefetch', '--config', connectedConfig, 'alpine:3.20');
    expect(again.code).toBe(0);
    expect(again.stderr).toMatch(/fetched 0 B, already cached/);
  });

  test('prefetch --platform takes only the platforms asked for', async () => {
    const r = await cli(
      'prefetch',
      '--config',
      connectedConfig,
      '--platform',
      'linux/arm64',
      'org/armonly:v2',
    );
    expect(r.code).toBe(0);
    const [amd64, arm64] = armOnly.children!;
    const stored = (d: string) =>
      existsSync(
        join(
          connected,
          'blobs',
          'sha256',
          parseDigest(d).hex.slice(0, 2),
          parseDigest(d).hex,
          'data',
        ),
      );
    expect(arm64!.blobs.every((b) => stored(b.digest))).toBe(true);
    expect(amd64!.blobs.some((b) => stored(b.digest))).toBe(false);
  });

  test('prefetch of an image the upstream does not have fails with its reason and exit code 1', async () => {
    const r = await cli('prefetch', '--config', connectedConfig, 'alpine:3.20', 'org/nothing:here');
    expect(r.code).toBe(1);
    expect(r.stderr).toContain('1 of 2 images complete');
    expect(r.stderr).toMatch(/failed: docker\.io\/org\/nothing:here: MANIFEST_UNKNOWN/);
    expect(r.stderr).not.toMatch(/\n\s+at /);
  });

  test('export needs no upstream, and skopeo reads the bundle as an OCI archive', async () => {
    await registry.stop();
    const r = await cli('export', '--config', connectedConfig, '--output', bundle, '--all');
    expect(r.code).toBe(0);
    expect(r.stderr).toMatch(/wrote .*bundle\.tar: 4 images/);
    expect(r.stderr).toMatch(
      /note: docker\.io\/org\/armonly:v2: platform linux\/amd64 is not cached, left out/,
    );
    // skopeo's OCI layout reader looks only at OCI-typed entries; Docker-typed manifests are kept
    // byte for byte (their digest is their identity), so they are read back by pullcache import.
    const dir = tmp('from-archive');
    await skopeo('copy', `oci-archive:${bundle}:registry.test/org/oci-app:v1`, `dir:${dir}`);
    expectDirHolds(dir, oci);
    const index = await skopeo(
      'inspect',
      '--raw',
      `oci-archive:${bundle}:docker.io/org/multi:latest`,
    );
    expect(Buffer.from(index).equals(multi.manifest)).toBe(true);
  });

  test('import into empty storage, then serve with upstreams that do not resolve: skopeo pulls every image', async () => {
    const offline = tmp('offline');
    const upstreams = {
      'docker.io': { url: 'http://registry.invalid:5000' },
      'registry.test': { url: 'http://other-registry.invalid' },
    };
    const r = await cli('import', '--config', configFile(offline, upstreams), bundle);
    expect(r.code).toBe(0);
    expect(r.stderr).toMatch(/imported .*: 4 images, (\d+) blobs \(.*\): \1 added/);
    // An index is made visible after the manifests it names: its revision link is the last.
    const written = (digest: string) =>
      statSync(
        join(
          offline,
          paths.manifestRevisionLink(
            { upstream: 'docker.io', repository: 'org/multi' } as RepositoryKey,
            parseDigest(digest).digest,
          ),
        ),
      ).mtimeMs;
    for (const child of multi.children!)
      expect(written(multi.digest)).toBeGreaterThanOrEqual(written(child.digest));

    const pc = await startPullcache({ upstreams }, offline);
    try {
      const d1 = tmp('pull');
      await skopeoCopy(pc.host, 'alpine:3.20', d1);
      expectDirHolds(d1, alpine);
      const d2 = tmp('pull');
      await skopeoCopy(pc.host, 'registry.test/org/oci-app:v1', d2);
      expectDirHolds(d2, oci);
      const d3 = tmp('pull');
      await skopeoCopy(pc.host, 'org/multi:latest', d3, '--all');
      expect(readFileSync(join(d3, 'manifest.json')).equals(multi.manifest)).toBe(true);
      for (const child of multi.children!)
        expect(
          readFileSync(join(d3, `${parseDigest(child.digest).hex}.manifest.json`)).equals(
            child.manifest,
          ),
        ).toBe(true);
      // What was never pulled answers 503 naming the upstream, not 404.
      const missing = await fetch(`${pc.url}/v2/org/never/manifests/latest`);
      expect(missing.status).toBe(503);
      expect(await missing.text()).toContain('docker.io');
    } finally {
      await pc.stop();
    }

    // Importing again changes nothing.
    const before = snapshot(offline);
    const again = await cli('import', '--config', configFile(offline, upstreams), bundle);
    expect(again.code).toBe(0);
    expect(again.stderr).toMatch(/: 0 added \(0 B\), \d+ already present; 0 tags set/);
    expect(snapshot(offline)).toEqual(before);
  });

  test('a bundle with a flipped byte is refused and leaves nothing in the cache', async () => {
    const damaged = join(tmp('damaged'), 'bundle.tar');
    const bytes = readFileSync(bundle);
    // A byte inside the largest layer's data (it sits in the bundle as it is in the blob).
    const layer = alpine.blobs[1]!.bytes;
    const at = bytes.indexOf(layer.subarray(1000, 1064));
    expect(at).toBeGreaterThan(0);
    bytes[at + 10] = bytes[at + 10]! ^ 0xff;
    writeFileSync(damaged, bytes);
    const { root, r } = await importOffline(damaged, 'damaged-root');
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/pullcache: .*blob sha256:[a-f0-9]{64} is damaged/);
    expect(r.stderr).not.toMatch(/\n\s+at /);
    expect(Object.keys(snapshot(root)).filter((f) => !f.startsWith('uploads/'))).toEqual([]);
    expect(readdirSync(join(root, 'uploads'))).toEqual([]);
  });

  test('a truncated bundle is refused and leaves nothing in the cache', async () => {
    const truncated = join(tmp('truncated'), 'bundle.tar');
    writeFileSync(truncated, readFileSync(bundle));
    truncateSync(truncated, Math.floor(statSync(bundle).size * 0.6));
    const { root, r } = await importOffline(truncated, 'truncated-root');
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(
      /pullcache: .*bundle\.tar (is truncated|.* is missing: the bundle is truncated)/,
    );
    expect(Object.keys(snapshot(root)).filter((f) => !f.startsWith('uploads/'))).toEqual([]);
  });

  test('an offline upstream serves cached tags at once, stale past tagTTL, and 503 for the rest', async () => {
    const pc = await startPullcache(
      {
        upstreams: {
          'docker.io': { url: 'http://registry.invalid', offline: true, tagTTL: '1ms' },
        },
      },
      connected,
    );
    try {
      const res = await fetch(`${pc.url}/v2/alpine/manifests/3.20`);
      expect(res.status).toBe(200);
      expect(res.headers.get('docker-content-digest')).toBe(alpine.digest);
      expect(res.headers.get('warning')).toMatch(/^299 - "pullcache: stale/);
      const started = performance.now();
      const missing = await fetch(`${pc.url}/v2/org/never/manifests/latest`);
      expect(performance.now() - started).toBeLessThan(1000);
      expect(missing.status).toBe(503);
      expect(await ociError(missing)).toBe('UNAVAILABLE');
    } finally {
      await pc.stop();
    }
  });
});
