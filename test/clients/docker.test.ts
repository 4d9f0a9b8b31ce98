/**
 * Docker Engine pulling through pullcache, as users set it up: pullcache as a `registry-mirrors`
 * entry in daemon.json. dockerd asks its mirrors only for Docker Hub names (docker.io/...), and
 * falls back to Docker Hub itself when they fail; Docker Hub cannot be reached from the tests, so
 * a pull that succeeds came from the mirror. Other registries are pulled by naming pullcache:
 * `docker pull PULLCACHE_HOST/UPSTREAM/repository:tag`.
 */
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { parseDigest } from '../../src/oci/digest.js';
import { TestDockerd } from '../helpers/dockerd.js';
import { makeImage, pushImage, type Image } from '../helpers/images.js';
import { startPullcache, type TestPullcache } from '../helpers/pullcache.js';
import { Recorder } from '../helpers/recorder.js';
import { TestRegistry } from '../helpers/registry.js';

describe('docker pull through pullcache as a registry mirror', () => {
  let registry: TestRegistry;
  let recorder: Recorder;
  let pc: TestPullcache;
  let dockerd: TestDockerd;
  let hubImage: Image;
  let otherImage: Image;

  beforeAll(async () => {
    registry = await TestRegistry.start();
    hubImage = makeImage('library/pullcache-fixture', 'v1', 'docker', [300_000, 40_000]);
    otherImage = makeImage('org/tool', 'v2', 'oci', [60_000]);
    await pushImage(registry, hubImage);
    await pushImage(registry, otherImage);
    recorder = await Recorder.start(registry.url);
    pc = await startPullcache({
      upstreams: {
        // Docker Hub, for dockerd, is the test registry here.
        'docker.io': { url: recorder.url },
        'registry.test': { url: recorder.url },
      },
    });
    dockerd = await TestDockerd.start({
      daemonConfig: { 'registry-mirrors': [pc.url], 'insecure-registries': [pc.host] },
    });
  });
  afterAll(async () => {
    await dockerd?.stop();
    await pc?.stop();
    await recorder?.close();
    await registry?.close();
  });

  /** What dockerd knows of a pulled image: its id (the config digest) and its repo digests. */
  async function inspect(ref: string): Promise<{ Id: string; RepoDigests: string[] }> {
    const out = await dockerd.docker('image', 'inspect', '--format', '{{json .}}', ref);
    return JSON.parse(out) as { Id: string; RepoDigests: string[] };
  }

  function expectStored(image: Image): void {
    for (const blob of image.blobs) {
      const { algorithm, hex } = parseDigest(blob.digest);
      const file = join(pc.root, 'blobs', algorithm, hex.slice(0, 2), hex, 'data');
      expect(existsSync(file), `${blob.digest} in pullcache's storage`).toBe(true);
      expect(readFileSync(file).equals(blob.bytes)).toBe(true);
    }
  }

  test('docker pull of a Docker Hub name is answered by the mirror from its docker.io upstream', async () => {
    await dockerd.docker('pull', 'library/pullcache-fixture:v1');

    const pulled = await inspect('pullcache-fixture:v1');
    expect(pulled.Id).toBe(hubImage.blobs[0]!.digest); // the image config
    expect(pulled.RepoDigests).toContain(`pullcache-fixture@${hubImage.digest}`);
    expectStored(hubImage);
    for (const blob of hubImage.blobs) {
      expect(recorder.count('GET', new RegExp(`/blobs/${blob.digest}$`))).toBe(1);
    }
  });

  test('docker pulls again from the mirror with the upstream down, after removing the image', async () => {
    await dockerd.docker('pull', 'library/pullcache-fixture:v1');
    await dockerd.docker('image', 'rm', 'pullcache-fixture:v1');
    recorder.reset();
    await recorder.down();
    try {
      await dockerd.docker('pull', 'library/pullcache-fixture:v1');
    } finally {
      await recorder.up();
    }

    expect((await inspect('pullcache-fixture:v1')).Id).toBe(hubImage.blobs[0]!.digest);
    expect(recorder.requests).toEqual([]);
  });

  test('docker pulls an image of another upstream by naming pullcache and the upstream', async () => {
    const ref = `${pc.host}/registry.test/org/tool:v2`;
    await dockerd.docker('pull', ref);

    const pulled = await inspect(ref);
    expect(pulled.Id).toBe(otherImage.blobs[0]!.digest);
    expect(pulled.RepoDigests).toContain(`${pc.host}/registry.test/org/tool@${otherImage.digest}`);
    expectStored(otherImage);
    for (const blob of otherImage.blobs) {
      expect(recorder.count('GET', new RegExp(`/blobs/${blob.digest}$`))).toBe(1);
    }
  });
});
