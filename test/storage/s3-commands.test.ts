/**
 * Everything above the driver, unchanged, on S3 (a real Ceph radosgw): prefetch, export and
 * import with the real command, and the budget's evictions.
 */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { HeadObjectCommand } from '@aws-sdk/client-s3';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { parseDigest } from '../../src/oci/digest.js';
import { paths } from '../../src/storage/paths.js';
import { cli } from '../helpers/cli.js';
import { makeImage, pushImage, type Image } from '../helpers/images.js';
import { startPullcache, type TestPullcache } from '../helpers/pullcache.js';
import { TestRegistry } from '../helpers/registry.js';
import { expectDirHolds, skopeoCopy } from '../helpers/skopeo.js';
import { useStorage } from '../helpers/storage-drivers.js';

const tmp = () => mkdtempSync(join(tmpdir(), 'pullcache-s3cmd-'));
const bytesOf = (image: Image) =>
  image.manifest.length + image.blobs.reduce((sum, b) => sum + b.bytes.length, 0);

let registry: TestRegistry;
const images: Record<string, Image> = {};

beforeAll(async () => {
  registry = await TestRegistry.start();
  images.alpine = makeImage('library/alpine', '3.20', 'docker', [600_000, 20_000]);
  for (const name of ['a', 'b', 'c', 'd'])
    images[name] = makeImage(`org/${name}`, 'v1', 'oci', [300_000]);
  for (const image of Object.values(images)) await pushImage(registry, image);
}, 120_000);
afterAll(async () => {
  await registry?.close();
});

const storage = useStorage('s3');

/** A config file for the command: this storage section and these upstreams. */
function configFile(storageSection: Record<string, unknown>, url: string): string {
  const file = join(tmp(), 'pullcache.yaml');
  writeFileSync(
    file,
    JSON.stringify({ storage: storageSection, upstreams: { 'docker.io': { url } } }),
  );
  return file;
}

async function stored(prefix: string, digest: string): Promise<boolean> {
  try {
    await storage.s3!.client.send(
      new HeadObjectCommand({
        Bucket: storage.bucket!,
        Key: prefix + paths.blobData(parseDigest(digest).digest),
      }),
    );
    return true;
  } catch {
    return false;
  }
}

describe('commands on S3 storage', () => {
  test('prefetch fills the bucket; export and import carry it to another; served offline from there', async () => {
    const source = storage.config();
    const prefetched = await cli('prefetch', '-c', configFile(source, registry.url), 'alpine:3.20');
    expect(prefetched.stderr).toContain('1 of 1 images complete');
    const alpine = images.alpine!;
    for (const blob of alpine.blobs) expect(await stored(storage.prefix!, blob.digest)).toBe(true);

    const bundle = join(tmp(), 'b.tar');
    const exported = await cli(
      'export',
      '-c',
      configFile(source, registry.url),
      '-o',
      bundle,
      '--all',
    );
    expect(exported.stderr).not.toMatch(/error/i);
    expect(exported.code).toBe(0);

    const target = storage.another() as { s3: { prefix: string } };
    const offline = 'http://registry.invalid';
    const imported = await cli('import', '-c', configFile(target, offline), bundle);
    expect(imported.code).toBe(0);
    const pc = await startPullcache({
      storage: target,
      upstreams: { 'docker.io': { url: offline, offline: true } },
    });
    try {
      const dir = tmp();
      await skopeoCopy(pc.host, 'alpine:3.20', dir);
      expectDirHolds(dir, alpine);
      rmSync(dir, { recursive: true, force: true });
    } finally {
      await pc.stop();
    }
  });

  test('the budget evicts the least recently pulled image, whole, from the bucket', async () => {
    const { a, b, c, d } = images as Record<string, Image>;
    const unit = Math.max(...[a!, b!, c!, d!].map(bytesOf));
    let pc: TestPullcache | undefined;
    try {
      pc = await startPullcache({
        storage: storage.config(),
        upstreams: { 'docker.io': { url: registry.url } },
        retention: { maxSize: 3 * unit + 1000, lowWater: '100%' },
      });
      const pull = async (image: Image) => {
        const dir = tmp();
        await skopeoCopy(pc!.host, `${image.repository}:${image.tag}`, dir);
        expectDirHolds(dir, image);
        rmSync(dir, { recursive: true, force: true });
      };
      for (const image of [a!, b!, c!]) await pull(image);
      await pull(a!); // b is the oldest now
      await pull(d!);
      await pc.runtime.lifecycle.settle();
      expect((await pc.runtime.lifecycle.images()).map((i) => i.repository).sort()).toEqual([
        'org/a',
        'org/c',
        'org/d',
      ]);
      for (const blob of [b!.blobs[0]!, b!.blobs[1]!])
        expect(await stored(storage.prefix!, blob.digest)).toBe(false);
      for (const image of [a!, c!, d!])
        expect(await stored(storage.prefix!, image.blobs[1]!.digest)).toBe(true);
      // b again: fetched afresh, whole.
      await pull(b!);
    } finally {
      await pc?.stop();
    }
  });
});
