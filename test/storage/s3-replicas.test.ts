/**
 * Three replicas on one S3 bucket (a real Ceph radosgw) and one Redis (`cache.store: redis`):
 * each serves what any stored, a tag refreshed by one is fresh for all, one at a time manages
 * the cache (a lease in Redis) and judges by every replica's last pulls, and a blob one replica
 * is streaming survives its eviction by another.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { HeadObjectCommand } from '@aws-sdk/client-s3';
import { afterAll, afterEach, beforeAll, describe, expect, test } from 'vitest';
import { parseDigest } from '../../src/oci/digest.js';
import { parseRepository, parseTag } from '../../src/oci/reference.js';
import { paths } from '../../src/storage/paths.js';
import { makeImage, pushImage, sha256, type Image } from '../helpers/images.js';
import { waitFor } from '../helpers/net.js';
import { startPullcache, type TestPullcache } from '../helpers/pullcache.js';
import { Recorder } from '../helpers/recorder.js';
import { startRedis, type TestRedis } from '../helpers/redis.js';
import { TestRegistry } from '../helpers/registry.js';
import { expectDirHolds, skopeoCopy } from '../helpers/skopeo.js';
import { useStorage } from '../helpers/storage-drivers.js';

const tmp = () => mkdtempSync(join(tmpdir(), 'pullcache-replicas-'));
const ref = (image: Image) => `${image.repository}:${image.tag}`;
const bytesOf = (image: Image) =>
  image.manifest.length + image.blobs.reduce((sum, b) => sum + b.bytes.length, 0);

let registry: TestRegistry;
let recorder: Recorder;
let redis: TestRedis;
const images: Record<string, Image> = {};

beforeAll(async () => {
  registry = await TestRegistry.start();
  for (const name of ['p', 'q', 'r']) {
    images[name] = makeImage(`org/${name}`, 'v1', 'oci', [400_000]);
    await pushImage(registry, images[name]);
  }
  images.moving = makeImage('org/moving', 'v1', 'oci', [20_000]);
  images.moved = makeImage('org/moving', 'v1', 'oci', [21_000]);
  await pushImage(registry, images.moving);
  images.large = makeImage('org/large', 'v1', 'oci', [24 * 1024 * 1024]);
  await pushImage(registry, images.large);
  recorder = await Recorder.start(registry.url);
  redis = await startRedis();
}, 120_000);
afterAll(async () => {
  await redis?.stop();
  await recorder?.close();
  await registry?.close();
});

const storage = useStorage('s3');
let replicas: TestPullcache[] = [];
afterEach(async () => {
  for (const pc of replicas) await pc.stop();
  replicas = [];
});

async function startReplicas(retention: Record<string, unknown> = {}): Promise<TestPullcache[]> {
  for (let i = 0; i < 3; i++)
    replicas.push(
      await startPullcache({
        storage: storage.config(),
        cache: { store: 'redis', redis: { url: redis.url } },
        upstreams: { 'docker.io': { url: recorder.url, tagTTL: '1s' } },
        retention,
      }),
    );
  for (const pc of replicas) await pc.runtime.lifecycle.whenReady();
  return replicas;
}

async function pull(pc: TestPullcache, image: Image): Promise<void> {
  const dir = tmp();
  try {
    await skopeoCopy(pc.host, ref(image), dir);
    expectDirHolds(dir, image);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

async function stored(digest: string): Promise<boolean> {
  const key = storage.prefix + paths.blobData(parseDigest(digest).digest);
  try {
    await storage.s3!.client.send(new HeadObjectCommand({ Bucket: storage.bucket!, Key: key }));
    return true;
  } catch {
    return false;
  }
}

describe('three replicas on one bucket and one Redis', () => {
  test('each serves what any of them stored, without asking the upstream for a blob', async () => {
    const [a, b, c] = await startReplicas();
    await pull(a!, images.p!);
    recorder.reset();
    await pull(b!, images.p!);
    await pull(c!, images.p!);
    expect(recorder.requests.filter((r) => r.path.includes('/blobs/'))).toEqual([]);
  });

  test('a tag refreshed by one replica is fresh for all: the others serve the new digest', async () => {
    const [a, b, c] = await startReplicas();
    for (const pc of [a!, b!, c!]) await pull(pc, images.moving!);
    await pushImage(registry, images.moved!);
    await new Promise((r) => setTimeout(r, 1100)); // past the 1 s tagTTL
    await pull(a!, images.moved!);
    recorder.reset();
    for (const pc of [b!, c!]) {
      const res = await fetch(`${pc.url}/v2/org/moving/manifests/v1`, {
        headers: { accept: images.moved!.mediaType },
      });
      expect(res.headers.get('docker-content-digest')).toBe(images.moved!.digest);
    }
    // Neither fetched the new manifest or its blobs: what a stored and confirmed was enough.
    expect(recorder.requests.filter((r) => r.method === 'GET')).toEqual([]);
  });

  test('one replica at a time manages the cache, and another takes over when it stops', async () => {
    const started = await startReplicas();
    const owners = () => replicas.filter((pc) => pc.runtime.lifecycle.ownership.isOwner);
    expect(owners()).toHaveLength(1);
    const owner = owners()[0]!;
    await owner.stop();
    replicas = started.filter((pc) => pc !== owner);
    // The others try every 10 s; the lease was given up at once.
    await waitFor(async () => owners().length === 1, 'a new owner', 25_000);
    expect(owners()).toHaveLength(1);
  }, 60_000);

  test('the evicting replica judges by every replica’s last pulls', async () => {
    const { p, q, r } = images as Record<string, Image>;
    const unit = Math.max(bytesOf(p!), bytesOf(q!), bytesOf(r!));
    // Room for two images: a third evicts the least recently pulled one.
    const all = await startReplicas({ maxSize: 2 * unit + 1000, lowWater: '100%' });
    const owner = all.find((pc) => pc.runtime.lifecycle.ownership.isOwner)!;
    const other = all.find((pc) => pc !== owner)!;
    await pull(owner, q!);
    await pull(owner, p!);
    // As far as the owner knows, q is the older. Another replica pulls q now.
    await pull(other, q!);
    await other.runtime.lifecycle.flush();
    await pull(owner, r!);
    await owner.runtime.lifecycle.settle();
    expect(await stored(q!.blobs[1]!.digest)).toBe(true);
    expect(await stored(p!.blobs[1]!.digest)).toBe(false);
    expect((await owner.runtime.lifecycle.images()).map((i) => i.repository).sort()).toEqual([
      'org/q',
      'org/r',
    ]);
  });

  test('a blob one replica is streaming survives its eviction by another', async () => {
    const [a, b] = await startReplicas();
    const owner = replicas.find((pc) => pc.runtime.lifecycle.ownership.isOwner)!;
    const server = owner === a ? b! : a!;
    const layer = images.large!.blobs[1]!;
    await pull(owner, images.large!);
    const res = await fetch(`${server.url}/v2/org/large/blobs/${layer.digest}`);
    expect(res.status).toBe(200);
    const reader = res.body!.getReader();
    const chunks: Uint8Array[] = [(await reader.read()).value!];
    // The owner removes the image while the other replica is still streaming its layer.
    const report = await owner.runtime.lifecycle.remove(
      [
        {
          upstream: 'docker.io',
          repository: parseRepository('org/large'),
          tag: parseTag('v1'),
          reference: 'docker.io/org/large:v1',
        },
      ],
      false,
    );
    expect(report.removed.length).toBe(1);
    expect(await stored(layer.digest)).toBe(false);
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      chunks.push(value);
    }
    expect(sha256(Buffer.concat(chunks))).toBe(layer.digest);
  });
});
