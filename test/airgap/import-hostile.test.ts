/**
 * `pullcache import` of bundles made to hurt it, and of good bundles in bad conditions: layers
 * it must not hold in memory, indexes that name each other many times over, manifests that name
 * blobs the bundle does not carry, a blob twice, a full disk, a budget the bundle does not fit,
 * an interruption. Real parts: a real registry, prefetch and export for the good bundle, the real
 * command in a child process; the hostile bundles are written here, entry by entry.
 */
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import {
  appendFileSync,
  closeSync,
  existsSync,
  openSync,
  readdirSync,
  readFileSync,
  rmSync,
  writeFileSync,
  writeSync,
} from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test, vi } from 'vitest';
import { indexJson } from '../../src/commands/bundle.js';
import type { Digest } from '../../src/oci/digest.js';
import { parseRepository } from '../../src/oci/reference.js';
import {
  makeImage,
  ociManifest,
  pushBlob,
  pushImage,
  pushManifest,
  sha256,
  tarHeader,
  tarPadding,
  type Image,
} from '../helpers/images.js';
import { TestRegistry } from '../helpers/registry.js';
import { PULLCACHE, cli, configFile, hasStackTrace, quote, sh, tmp } from '../helpers/cli.js';
import { snapshot } from '../helpers/files.js';

const OCI_INDEX = 'application/vnd.oci.image.index.v1+json';
const OCI_MANIFEST = 'application/vnd.oci.image.manifest.v1+json';
const offline = { url: 'http://registry.invalid' };

interface Named {
  repository: string;
  tag?: string;
  digest: string;
  mediaType: string;
  size: number;
}

/** A bundle as pullcache writes one: oci-layout, index.json naming `images` (docker.io), blobs. */
function writeBundle(file: string, images: Named[], blobs: Buffer[]): void {
  const fd = openSync(file, 'w');
  const entry = (name: string, bytes: Buffer) => {
    writeSync(fd, tarHeader(name, bytes.length));
    writeSync(fd, bytes);
    writeSync(fd, tarPadding(bytes.length));
  };
  entry('oci-layout', Buffer.from('{"imageLayoutVersion":"1.0.0"}'));
  entry(
    'index.json',
    indexJson(
      images.map((i) => ({
        location: {
          upstream: 'docker.io',
          repository: parseRepository(i.repository),
          ...(i.tag ? { tag: i.tag as never } : {}),
          digest: i.digest as Digest,
        },
        mediaType: i.mediaType,
        size: i.size,
      })),
    ),
  );
  for (const blob of blobs) entry(`blobs/sha256/${sha256(blob).slice(7)}`, blob);
  writeSync(fd, Buffer.alloc(1024));
  closeSync(fd);
}

/** A small image config: JSON, as real ones are. */
const configBlob = (seed: string) =>
  Buffer.from(JSON.stringify({ architecture: 'amd64', os: 'linux', seed }));

/** Upload sessions left under a storage root. */
const sessions = (root: string) =>
  existsSync(join(root, 'uploads'))
    ? readdirSync(join(root, 'uploads')).filter((id) => /^[0-9a-f-]{36}$/.test(id))
    : [];

/** The last line of what a command said: its one-line reason, when it failed. */
const lastLine = (stderr: string) => `${stderr.trimEnd().split('\n').at(-1)}\n`;

/** Stored content, upload sessions aside. */
const stored = (root: string) =>
  Object.keys(snapshot(root)).filter((f) => !f.startsWith('uploads/') && f !== '.owner');

/** `levels` indexes above one image, each naming the one below `times` times. */
function nestedIndexes(levels: number, times: number) {
  const config = configBlob('nested');
  const layerBytes = randomBytes(1000);
  const leaf = ociManifest({ digest: sha256(config), size: config.length }, [
    { digest: sha256(layerBytes), size: layerBytes.length },
  ]);
  const manifests = [leaf];
  let below = { bytes: leaf, mediaType: OCI_MANIFEST };
  for (let i = 0; i < levels; i++) {
    const bytes = Buffer.from(
      JSON.stringify({
        schemaVersion: 2,
        mediaType: OCI_INDEX,
        manifests: Array.from({ length: times }, () => ({
          mediaType: below.mediaType,
          digest: sha256(below.bytes),
          size: below.bytes.length,
          platform: { architecture: 'amd64', os: 'linux' },
        })),
      }),
    );
    manifests.push(bytes);
    below = { bytes, mediaType: OCI_INDEX };
  }
  return { config, layer: layerBytes, manifests, top: below.bytes };
}

describe('import of hostile bundles and in bad conditions', () => {
  let registry: TestRegistry;
  let app: Image;
  const dirs: string[] = [];
  const dir = (what: string) => {
    const made = tmp(what);
    dirs.push(made);
    return made;
  };
  /** docker.io/org/app:v1, prefetched and exported: a bit over 1.5 MB. */
  let bundle: string;

  beforeAll(async () => {
    registry = await TestRegistry.start();
    app = makeImage('org/app', 'v1', 'oci', [3_000_000, 20_000]);
    await pushImage(registry, app);
    const config = configFile(dir('cache'), { 'docker.io': { url: registry.url } });
    expect((await cli('prefetch', '-c', config, 'org/app:v1')).code).toBe(0);
    bundle = join(dir('bundle'), 'app.tar');
    expect((await cli('export', '-c', config, '-o', bundle, 'org/app:v1')).code).toBe(0);
  });
  afterAll(async () => {
    await registry?.close();
    for (const d of dirs) rmSync(d, { recursive: true, force: true });
  });

  test('keeps no layer in memory: a bundle of many 3.9 MiB layers imports in little more memory than a small one', async () => {
    const layers = Array.from({ length: 40 }, () => {
      const bytes = randomBytes(3.9 * 1024 * 1024);
      bytes[0] = 0x1f; // gzip's first bytes, as a layer's
      bytes[1] = 0x8b;
      return bytes;
    });
    const config = configBlob('big');
    const manifest = ociManifest(
      { digest: sha256(config), size: config.length },
      layers.map((l) => ({ digest: sha256(l), size: l.length })),
    );
    const big = join(dir('bundle'), 'big.tar');
    writeBundle(
      big,
      [
        {
          repository: 'org/big',
          tag: 'v1',
          digest: sha256(manifest),
          mediaType: OCI_MANIFEST,
          size: manifest.length,
        },
      ],
      [...layers, config, manifest],
    );
    const maxRss = async (file: string) => {
      const target = configFile(dir('root'), { 'docker.io': offline });
      const r = await sh(
        `/usr/bin/time -f 'maxrss %M' $PULLCACHE import -c ${quote(target)} ${quote(file)}`,
      );
      expect(r.code, r.stderr).toBe(0);
      return Number(/maxrss (\d+)/.exec(r.stderr)![1]) * 1024;
    };
    const small = await maxRss(bundle);
    const large = await maxRss(big);
    // The layers are 156 MiB; the import reads them through in chunks.
    expect(large - small).toBeLessThan(80 * 1024 * 1024);
  });

  test('of indexes 40 deep, each naming the next twice, is refused at once in one line', async () => {
    const nested = nestedIndexes(40, 2);
    const file = join(dir('bundle'), 'nested.tar');
    writeBundle(
      file,
      [
        {
          repository: 'org/nested',
          tag: 'v1',
          digest: sha256(nested.top),
          mediaType: OCI_INDEX,
          size: nested.top.length,
        },
      ],
      [nested.config, nested.layer, ...nested.manifests],
    );
    const root = dir('root');
    const r = await sh(
      `exec $PULLCACHE import -c ${quote(configFile(root, { 'docker.io': offline }))} ${quote(file)}`,
      { timeout: 30_000 },
    );
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(
      /\npullcache: .*nested\.tar: docker\.io\/org\/nested:v1: its indexes nest more than 8 deep \(at sha256:[a-f0-9]{64}\)\n$/,
    );
    expect(stored(root)).toEqual([]);
    expect(sessions(root)).toEqual([]);
  });

  test('of indexes 8 deep, each naming the next twice, and 30,000 tags of one image, walks each manifest once', async () => {
    const nested = nestedIndexes(8, 2);
    const top = sha256(nested.top);
    const file = join(dir('bundle'), 'diamonds.tar');
    const tags = Array.from({ length: 30_000 }, (_, i) => ({
      repository: 'org/many',
      tag: `t${i}`,
      digest: top,
      mediaType: OCI_INDEX,
      size: nested.top.length,
    }));
    writeBundle(file, tags, [nested.config, nested.layer, ...nested.manifests]);
    const root = dir('root');
    const started = Date.now();
    const r = await sh(
      `exec $PULLCACHE import -c ${quote(configFile(root, { 'docker.io': offline }))} ${quote(file)}`,
      { timeout: 60_000 },
    );
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).toContain('30000 tags set');
    expect(Date.now() - started).toBeLessThan(30_000);
  }, 90_000);

  describe('needs every blob in the bundle, or held by the same repository, at its size', () => {
    let root: string;
    let config: string;

    beforeAll(async () => {
      root = dir('root');
      config = configFile(root, { 'docker.io': offline });
      expect((await cli('import', '-c', config, bundle)).code).toBe(0);
    });

    test('a manifest naming a layer stored only for another repository is refused, naming it', async () => {
      const layer = app.blobs[1]!; // docker.io/org/app's
      const evilConfig = configBlob('evil');
      const manifest = ociManifest({ digest: sha256(evilConfig), size: evilConfig.length }, [
        { digest: layer.digest, size: layer.bytes.length },
      ]);
      const file = join(dir('bundle'), 'evil.tar');
      writeBundle(
        file,
        [
          {
            repository: 'org/evil',
            tag: 'v1',
            digest: sha256(manifest),
            mediaType: OCI_MANIFEST,
            size: manifest.length,
          },
        ],
        [evilConfig, manifest],
      );
      const before = snapshot(root);
      const r = await cli('import', '-c', config, file);
      expect(r.code).toBe(1);
      expect(lastLine(r.stderr)).toBe(
        `pullcache: ${file}: blob ${layer.digest} of docker.io/org/evil:v1 is missing: the bundle is truncated or incomplete\n`,
      );
      expect(snapshot(root)).toEqual(before);
    });

    test('an image whose manifest the bundle lacks is refused, even when an index named it first', async () => {
      // An index whose second platform was never pulled (left out, as export does), then that
      // platform named as an image of its own: it would be a tag to nothing.
      const config1 = configBlob('present');
      const layer = randomBytes(3000);
      const present = ociManifest({ digest: sha256(config1), size: config1.length }, [
        { digest: sha256(layer), size: layer.length },
      ]);
      const absent = ociManifest({ digest: sha256(config1), size: config1.length }, []);
      const index = Buffer.from(
        JSON.stringify({
          schemaVersion: 2,
          mediaType: OCI_INDEX,
          manifests: [present, absent].map((m, i) => ({
            mediaType: OCI_MANIFEST,
            digest: sha256(m),
            size: m.length,
            platform: { os: 'linux', architecture: i === 0 ? 'amd64' : 'arm64' },
          })),
        }),
      );
      const file = join(dir('bundle'), 'tag-to-nothing.tar');
      writeBundle(
        file,
        [
          {
            repository: 'org/multi',
            tag: 'v1',
            digest: sha256(index),
            mediaType: OCI_INDEX,
            size: index.length,
          },
          {
            repository: 'org/multi',
            tag: 'v1-arm64',
            digest: sha256(absent),
            mediaType: OCI_MANIFEST,
            size: absent.length,
          },
        ],
        [config1, layer, present, index],
      );
      const before = snapshot(root);
      const r = await cli('import', '-c', config, file);
      expect(r.code).toBe(1);
      expect(lastLine(r.stderr)).toBe(
        `pullcache: ${file}: manifest ${sha256(absent)} of docker.io/org/multi:v1-arm64 is missing: the bundle is truncated or incomplete\n`,
      );
      expect(snapshot(root)).toEqual(before);
    });

    test('a manifest giving a blob another size than the bundle holds is refused, naming it', async () => {
      const layer = randomBytes(5000);
      const lyingConfig = configBlob('lying');
      const manifest = ociManifest({ digest: sha256(lyingConfig), size: lyingConfig.length }, [
        { digest: sha256(layer), size: 50 },
      ]);
      const file = join(dir('bundle'), 'lying.tar');
      writeBundle(
        file,
        [
          {
            repository: 'org/lying',
            digest: sha256(manifest),
            mediaType: OCI_MANIFEST,
            size: manifest.length,
          },
        ],
        [layer, lyingConfig, manifest],
      );
      const before = snapshot(root);
      const r = await cli('import', '-c', config, file);
      expect(r.code).toBe(1);
      expect(lastLine(r.stderr)).toBe(
        `pullcache: ${file}: blob ${sha256(layer)} of docker.io/org/lying@${sha256(manifest)} is 5000 bytes, not the 50 its manifest says\n`,
      );
      expect(snapshot(root)).toEqual(before);
      expect(sessions(root)).toEqual([]);
    });
  });

  test('a blob twice in the bundle is checked, stored and counted once, and leaves no upload session', async () => {
    const bytes = readFileSync(bundle);
    const entries: { at: number; end: number; name: string }[] = [];
    for (let at = 0; at + 512 <= bytes.length;) {
      const header = bytes.subarray(at, at + 512);
      if (header.every((b) => b === 0)) break;
      const name = header.subarray(0, 100).toString('utf8').replace(/\0.*$/s, '');
      const size = parseInt(header.subarray(124, 136).toString('utf8').replace(/\0.*$/s, ''), 8);
      const end = at + 512 + Math.ceil(size / 512) * 512;
      entries.push({ at, end, name });
      at = end;
    }
    // The bundle's first blob entry, again before the archive's end.
    const blob = entries.find((e) => e.name.startsWith('blobs/'))!;
    const last = entries.at(-1)!;
    const twice = join(dir('bundle'), 'twice.tar');
    writeFileSync(
      twice,
      Buffer.concat([bytes.subarray(0, last.end), bytes.subarray(blob.at, blob.end)]),
    );
    appendFileSync(twice, Buffer.alloc(1024));
    const root = dir('root');
    const r = await cli('import', '-c', configFile(root, { 'docker.io': offline }), twice);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).toMatch(/: 1 images, 4 blobs \(.*\): 4 added/);
    expect(sessions(root)).toEqual([]);
  });

  test('a full disk is told as the storage’s, not the bundle’s, and leaves nothing', async () => {
    const root = dir('full');
    await sh(`mount -t tmpfs -o size=1m pullcache-test ${quote(root)}`);
    try {
      const r = await cli('import', '-c', configFile(root, { 'docker.io': offline }), bundle);
      expect(r.code).toBe(1);
      expect(r.stderr).toMatch(
        new RegExp(
          `(^|\\n)pullcache: cannot write to storage ${root}: no space left on the device\\n$`,
        ),
      );
      expect(hasStackTrace(r.stderr)).toBe(false);
      expect(sessions(root)).toEqual([]);
    } finally {
      await sh(`umount ${quote(root)}`);
    }
  });

  test('a malformed oci-layout and an oversized one are refused in one line naming the entry', async () => {
    const bytes = readFileSync(bundle);
    const layoutSize = parseInt(bytes.subarray(124, 136).toString('utf8').replace(/\0.*$/s, ''), 8);
    const rest = bytes.subarray(512 + Math.ceil(layoutSize / 512) * 512);
    for (const [layout, message] of [
      [Buffer.from('{not json'), 'oci-layout is not valid JSON'],
      [Buffer.alloc(5000, 0x20), 'oci-layout is larger than the 4096 bytes allowed'],
    ] as const) {
      const file = join(dir('bundle'), 'layout.tar');
      writeFileSync(
        file,
        Buffer.concat([
          tarHeader('oci-layout', layout.length),
          layout,
          tarPadding(layout.length),
          rest,
        ]),
      );
      const r = await cli('import', '-c', configFile(dir('root'), { 'docker.io': offline }), file);
      expect(r.code).toBe(1);
      expect(r.stderr).toBe(`pullcache: ${file}: ${message}\n`);
    }
  });

  test('an import past retention.maxSize is refused with the figures, and stores nothing', async () => {
    const root = dir('root');
    const config = configFile(root, { 'docker.io': offline });
    appendFileSync(config, 'retention:\n  maxSize: 1MiB\n');
    const r = await cli('import', '-c', config, bundle);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(
      new RegExp(
        `^pullcache: ${bundle}: it adds [\\d.]+ MiB to the 0 B stored, past retention\\.maxSize \\(1\\.0 MiB\\): the budget would evict it; raise retention\\.maxSize, or import fewer images\\n$`,
        'm',
      ),
    );
    expect(stored(root)).toEqual([]);
    expect(sessions(root)).toEqual([]);
  });

  test('^C stops an import that is reading, cancels its upload sessions and exits 130', async () => {
    const root = dir('root');
    const target = configFile(root, { 'docker.io': offline });
    const bytes = readFileSync(bundle);
    const child = spawn('sh', ['-c', `exec $PULLCACHE import -c ${quote(target)} -`], {
      cwd: dir('cwd'),
      env: { ...process.env, PULLCACHE },
      stdio: ['pipe', 'ignore', 'pipe'],
    });
    let stderr = '';
    child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
    const exited = new Promise<number | null>((resolve) => child.on('close', resolve));
    // Interrupted, the import stops reading: what the pipe still held fails with EPIPE here.
    child.stdin.on('error', () => {});
    // Most of the bundle: blobs are staged, and the import waits for the rest.
    child.stdin.write(bytes.subarray(0, bytes.length - 20_000));
    await vi.waitFor(() => expect(sessions(root).length).toBeGreaterThan(0), {
      timeout: 30_000,
      interval: 50,
    });
    child.kill('SIGINT');
    const timer = setTimeout(() => child.kill('SIGKILL'), 15_000);
    const code = await exited;
    clearTimeout(timer);
    expect(code, stderr).toBe(130);
    expect(stderr).toMatch(/(^|\n)pullcache: interrupted\n$/);
    expect(sessions(root)).toEqual([]);
    expect(stored(root)).toEqual([]);
  });

  test('prefetch of indexes 40 deep, each naming the next twice, fails at once', async () => {
    const nested = nestedIndexes(40, 2);
    const repository = 'org/nested';
    await pushBlob(registry, repository, { digest: sha256(nested.config), bytes: nested.config });
    await pushBlob(registry, repository, { digest: sha256(nested.layer), bytes: nested.layer });
    for (const [i, m] of nested.manifests.entries())
      await pushManifest(registry, repository, sha256(m), m, i === 0 ? OCI_MANIFEST : OCI_INDEX);
    await pushManifest(registry, repository, 'v1', nested.top, OCI_INDEX);
    const config = configFile(dir('cache'), { 'docker.io': { url: registry.url } });
    const r = await sh(`exec $PULLCACHE prefetch -c ${quote(config)} org/nested:v1`, {
      timeout: 30_000,
    });
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/its indexes nest more than 8 deep/);
  });
});
