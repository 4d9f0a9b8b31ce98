/**
 * podman's partial pull of zstd:chunked images through pullcache: containers/image asks for the
 * pieces of a layer it lacks with one GET of many ranges, and takes the answer's parts by
 * position. Two images made by podman itself (zstd:chunked, from two file trees that share half
 * their files) are pushed to the real upstream; podman pulls the first, then the second, through
 * a recorder in front of pullcache. The second layer's GET must ask only for the files podman
 * does not have and be answered with only those bytes, and both images must hold their trees.
 *
 * A podman that fails a partial pull falls back to downloading the whole layer and still
 * succeeds: the test reads podman's debug log to tell the two apart.
 */
import { execFile } from 'node:child_process';
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { pushBlob, pushManifest, sha256 } from '../helpers/images.js';
import { startPullcache, type TestPullcache } from '../helpers/pullcache.js';
import { Recorder } from '../helpers/recorder.js';
import { TestRegistry } from '../helpers/registry.js';

const run = promisify(execFile);
const FILE_SIZES = [300_000, 500_000, 200_000, 100_000, 400_000, 50_000, 5_000, 1_000];

describe('podman partial pulls (zstd:chunked) through pullcache', () => {
  let work: string;
  let registry: TestRegistry;
  let pc: TestPullcache;
  let front: Recorder;
  const layers: Record<string, { digest: string; size: number }> = {};

  /**
   * podman with a storage of its own (overlay: partial pulls need it) and its blob-info cache,
   * which as root is always /var/lib/containers/cache, in a private mount namespace.
   */
  const podman = async (storage: string, ...args: string[]) => {
    const dir = join(work, storage);
    mkdirSync(join(dir, 'cache'), { recursive: true });
    mkdirSync(join(dir, 'tmp'), { recursive: true });
    writeFileSync(join(dir, 'auth.json'), '{}'); // its own, not the host's credentials
    writeFileSync(
      join(dir, 'storage.conf'),
      [
        '[storage]',
        'driver = "overlay"',
        `graphroot = "${dir}/root"`,
        `runroot = "${dir}/run"`,
        '[storage.options]',
        'pull_options = {enable_partial_images = "true", use_hard_links = "false", ostree_repos = ""}',
      ].join('\n'),
    );
    writeFileSync(
      join(dir, 'containers.conf'),
      [
        '[engine]',
        'events_logger = "none"',
        'cgroup_manager = "cgroupfs"',
        `tmp_dir = "${dir}/tmp"`,
        `static_dir = "${dir}/root/libpod"`,
        `volume_path = "${dir}/root/volumes"`,
      ].join('\n'),
    );
    mkdirSync('/var/lib/containers/cache', { recursive: true });
    const mount = 'mount --bind "$0" /var/lib/containers/cache && exec "$@"';
    try {
      return await run(
        'unshare',
        ['-m', '--propagation', 'private', 'sh', '-c', mount, join(dir, 'cache'), ...args],
        {
          timeout: 120_000,
          maxBuffer: 64 << 20,
          env: {
            ...process.env,
            CONTAINERS_STORAGE_CONF: join(dir, 'storage.conf'),
            CONTAINERS_CONF: join(dir, 'containers.conf'),
            REGISTRY_AUTH_FILE: join(dir, 'auth.json'),
          },
        },
      );
    } catch (err) {
      const { stderr, message } = err as { stderr?: string; message: string };
      throw new Error(`${args.join(' ')} failed: ${stderr?.slice(-2000) || message}`);
    }
  };

  /** The tree's files read back from a pulled image, checked against what was written. */
  const expectImageHolds = async (image: string, tree: string) => {
    const script = `m=$(podman image mount ${image}) && diff -r "$m" ${tree}; r=$?; podman image unmount -a >/dev/null; exit $r`;
    await podman('pull', 'sh', '-c', script);
  };

  beforeAll(async () => {
    work = mkdtempSync(join(tmpdir(), 'pullcache-partial-'));
    // Two trees: v2 keeps v1's even-numbered files and changes the others.
    for (const version of ['v1', 'v2']) mkdirSync(join(work, version, 'data'), { recursive: true });
    FILE_SIZES.forEach((size, i) => {
      const bytes = randomBytes(size);
      writeFileSync(join(work, 'v1', 'data', `f${i}.bin`), bytes);
      writeFileSync(join(work, 'v2', 'data', `f${i}.bin`), i % 2 === 0 ? bytes : randomBytes(size));
    });
    registry = await TestRegistry.start();
    pc = await startPullcache({ upstreams: { 'docker.io': { url: registry.url } } });
    front = await Recorder.start(pc.url);
    // Made by podman as zstd:chunked into an OCI layout, then pushed to the upstream.
    for (const version of ['v1', 'v2']) {
      const tar = join(work, `${version}.tar`);
      const layout = join(work, `layout-${version}`);
      await run('tar', ['-C', join(work, version), '-cf', tar, '.']);
      await podman(
        'push',
        'sh',
        '-c',
        `podman import -q ${tar} localhost/pp:${version} >/dev/null && ` +
          `podman push -q --compression-format zstd:chunked localhost/pp:${version} oci:${layout}:${version}`,
      );
      const blobs = join(layout, 'blobs', 'sha256');
      const index = JSON.parse(readFileSync(join(layout, 'index.json'), 'utf8')) as {
        manifests: { digest: string; mediaType: string }[];
      };
      const entry = index.manifests[0]!;
      const manifest = readFileSync(join(blobs, entry.digest.slice('sha256:'.length)));
      const parsed = JSON.parse(manifest.toString()) as {
        layers: { digest: string; size: number; mediaType: string }[];
      };
      expect(parsed.layers[0]!.mediaType).toBe('application/vnd.oci.image.layer.v1.tar+zstd');
      layers[version] = parsed.layers[0]!;
      for (const name of readdirSync(blobs)) {
        const bytes = readFileSync(join(blobs, name));
        expect(sha256(bytes)).toBe(`sha256:${name}`);
        if (`sha256:${name}` !== entry.digest)
          await pushBlob(registry, 'team/pp', { digest: `sha256:${name}`, bytes });
      }
      await pushManifest(registry, 'team/pp', version, manifest, entry.mediaType);
    }
  }, 120_000);

  afterAll(async () => {
    await front?.close();
    await pc?.stop();
    await registry?.close();
    if (work) rmSync(work, { recursive: true, force: true });
  });

  test('the second image fetches only the files the first lacks, as one GET of several ranges', async () => {
    const image = (version: string) => `${front.url.replace('http://', '')}/team/pp:${version}`;
    const layerGets = (version: string) =>
      front.requests
        .map((r, i) => ({ ...r, range: front.headers[i]!.range }))
        .filter((r) => r.method === 'GET' && r.path.endsWith(`/blobs/${layers[version]!.digest}`));

    /** Pulls into the test's storage; fails unless podman says the layer came in pieces. */
    const partialPull = async (version: string) => {
      const pulled = await podman(
        'pull',
        'podman',
        'pull',
        '--log-level=debug',
        '--tls-verify=false',
        image(version),
      );
      expect(pulled.stderr).toContain('Retrieved partial blob');
      expect(pulled.stderr).not.toContain('Failed to retrieve partial blob');
    };
    await partialPull('v1');
    await partialPull('v2');
    const gets = layerGets('v2');
    // The footer (one range), then the changed files' chunks (several, one request).
    const multi = gets.filter((r) => String(r.range).includes(','));
    expect(multi).toHaveLength(1);
    expect(multi[0]!.status).toBe(206);
    expect(gets.every((r) => r.range !== undefined)).toBe(true);
    const served = gets.reduce((n, r) => n + r.bytes, 0);
    // The changed (odd-numbered) files are 42 % of the data, and about that much is sent.
    expect(served).toBeLessThan(layers.v2!.size * 0.6);
    expect(served).toBeGreaterThan(layers.v2!.size * 0.3);

    await expectImageHolds(image('v1'), join(work, 'v1'));
    await expectImageHolds(image('v2'), join(work, 'v2'));
  }, 180_000);
});
