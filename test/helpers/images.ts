/**
 * Generated images for the tests: real gzip'd tar layers, image configs, Docker v2 and OCI
 * manifests and a multi-platform manifest list, pushed to the test registry over its API.
 */
import { createHash, randomBytes } from 'node:crypto';
import { gzipSync } from 'node:zlib';
import type { TestRegistry } from './registry.js';

export interface Blob {
  digest: string;
  bytes: Buffer;
  mediaType: string;
}

export interface Image {
  repository: string;
  tag: string;
  /** The manifest (or index) bytes exactly as pushed. */
  manifest: Buffer;
  digest: string;
  mediaType: string;
  blobs: Blob[];
  /** For an index: the child images. */
  children?: Image[];
}

export const sha256 = (b: Uint8Array | string) =>
  `sha256:${createHash('sha256').update(b).digest('hex')}`;

/** The 512-byte ustar header of one regular file. */
export function tarHeader(name: string, size: number): Buffer {
  const header = Buffer.alloc(512);
  header.write(name, 0, 100);
  header.write('0000644\0', 100);
  header.write('0000000\0', 108);
  header.write('0000000\0', 116);
  header.write(size.toString(8).padStart(11, '0') + '\0', 124);
  header.write('00000000000\0', 136);
  header.write('        ', 148);
  header.write('0', 156);
  header.write('ustar\0', 257);
  header.write('00', 263);
  let sum = 0;
  for (const byte of header) sum += byte;
  header.write(sum.toString(8).padStart(6, '0') + '\0 ', 148);
  return header;
}

/** Zero bytes that pad a file's content to whole 512-byte blocks. */
export function tarPadding(size: number): Buffer {
  return Buffer.alloc((512 - (size % 512)) % 512);
}

/** A one-file tar archive (ustar), as a layer's uncompressed content. */
export function tar(name: string, content: Buffer): Buffer {
  return Buffer.concat([
    tarHeader(name, content.length),
    content,
    tarPadding(content.length),
    Buffer.alloc(1024),
  ]);
}

export function layer(
  size: number,
  mediaType: string,
  seed = randomBytes(8).toString('hex'),
): Blob & { diffId: string } {
  // Half random, half text: compressible like real layers, unique per seed.
  const content = Buffer.concat([
    randomBytes(Math.floor(size / 2)),
    Buffer.from(`${seed} `.repeat(Math.ceil(size / 2 / (seed.length + 1)))),
  ]).subarray(0, size);
  const raw = tar(`file-${seed}.bin`, content);
  const bytes = gzipSync(raw, { level: 1 });
  return { digest: sha256(bytes), bytes, mediaType, diffId: sha256(raw) };
}

function config(diffIds: string[], mediaType: string, architecture = 'amd64'): Blob {
  const bytes = Buffer.from(
    JSON.stringify({
      architecture,
      os: 'linux',
      created: '2026-01-01T00:00:00Z',
      config: { Env: ['PATH=/usr/bin'], Cmd: ['/bin/sh'] },
      rootfs: { type: 'layers', diff_ids: diffIds },
      history: diffIds.map(() => ({
        created: '2026-01-01T00:00:00Z',
        created_by: 'pullcache test',
      })),
    }),
  );
  return { digest: sha256(bytes), bytes, mediaType };
}

/** An OCI image manifest's bytes (compact JSON) for this config and these gzip'd layers. */
export function ociManifest(
  config: { digest: string; size: number },
  layers: { digest: string; size: number }[],
): Buffer {
  return Buffer.from(
    JSON.stringify({
      schemaVersion: 2,
      mediaType: 'application/vnd.oci.image.manifest.v1+json',
      config: {
        mediaType: 'application/vnd.oci.image.config.v1+json',
        digest: config.digest,
        size: config.size,
      },
      layers: layers.map(({ digest, size }) => ({
        mediaType: 'application/vnd.oci.image.layer.v1.tar+gzip',
        digest,
        size,
      })),
    }),
  );
}

export type ImageKind = 'docker' | 'oci';

export function makeImage(
  repository: string,
  tag: string,
  kind: ImageKind,
  layerSizes: number[],
  architecture = 'amd64',
): Image {
  const layerType =
    kind === 'docker'
      ? 'application/vnd.docker.image.rootfs.diff.tar.gzip'
      : 'application/vnd.oci.image.layer.v1.tar+gzip';
  const configType =
    kind === 'docker'
      ? 'application/vnd.docker.container.image.v1+json'
      : 'application/vnd.oci.image.config.v1+json';
  const mediaType =
    kind === 'docker'
      ? 'application/vnd.docker.distribution.manifest.v2+json'
      : 'application/vnd.oci.image.manifest.v1+json';
  const layers = layerSizes.map((size) => layer(size, layerType));
  const cfg = config(
    layers.map((l) => l.diffId),
    configType,
    architecture,
  );
  const manifest = Buffer.from(
    JSON.stringify(
      {
        schemaVersion: 2,
        mediaType,
        config: { mediaType: configType, size: cfg.bytes.length, digest: cfg.digest },
        layers: layers.map((l) => ({
          mediaType: layerType,
          size: l.bytes.length,
          digest: l.digest,
        })),
      },
      null,
      3, // Not how we would print it: byte-equality tests must catch any re-serialisation.
    ),
  );
  return {
    repository,
    tag,
    manifest,
    digest: sha256(manifest),
    mediaType,
    blobs: [cfg, ...layers],
  };
}

export function makeIndex(
  repository: string,
  tag: string,
  kind: ImageKind,
  architectures: string[],
): Image {
  const children = architectures.map((arch) =>
    makeImage(repository, `${tag}-${arch}`, kind, [20_000, 5_000], arch),
  );
  const mediaType =
    kind === 'docker'
      ? 'application/vnd.docker.distribution.manifest.list.v2+json'
      : 'application/vnd.oci.image.index.v1+json';
  const manifest = Buffer.from(
    JSON.stringify({
      schemaVersion: 2,
      mediaType,
      manifests: children.map((c, i) => ({
        mediaType: c.mediaType,
        size: c.manifest.length,
        digest: c.digest,
        platform: { architecture: architectures[i], os: 'linux' },
      })),
    }),
  );
  return { repository, tag, manifest, digest: sha256(manifest), mediaType, blobs: [], children };
}

async function check(res: Response, what: string): Promise<Response> {
  if (!res.ok) throw new Error(`${what}: HTTP ${res.status} ${await res.text()}`);
  return res;
}

export async function pushBlob(
  registry: TestRegistry,
  repository: string,
  blob: { digest: string; bytes: Buffer },
): Promise<void> {
  const auth = { authorization: `Bearer ${registry.tokens.pushToken(repository)}` };
  const head = await fetch(`${registry.url}/v2/${repository}/blobs/${blob.digest}`, {
    method: 'HEAD',
    headers: auth,
  });
  if (head.ok) return;
  const start = await check(
    await fetch(`${registry.url}/v2/${repository}/blobs/uploads/`, {
      method: 'POST',
      headers: auth,
    }),
    'start upload',
  );
  const location = new URL(start.headers.get('location')!, registry.url);
  location.searchParams.set('digest', blob.digest);
  await check(
    await fetch(location, {
      method: 'PUT',
      headers: { ...auth, 'content-type': 'application/octet-stream' },
      body: blob.bytes,
    }),
    `put blob ${blob.digest}`,
  );
}

/** `size` random bytes pushed to `repository` as a blob. */
export async function pushRandomBlob(
  registry: TestRegistry,
  repository: string,
  size: number,
): Promise<{ digest: string; bytes: Buffer }> {
  const bytes = randomBytes(size);
  const digest = sha256(bytes);
  await pushBlob(registry, repository, { digest, bytes });
  return { digest, bytes };
}

export async function pushManifest(
  registry: TestRegistry,
  repository: string,
  reference: string,
  manifest: Buffer,
  mediaType: string,
): Promise<void> {
  const auth = { authorization: `Bearer ${registry.tokens.pushToken(repository)}` };
  await check(
    await fetch(`${registry.url}/v2/${repository}/manifests/${reference}`, {
      method: 'PUT',
      headers: { ...auth, 'content-type': mediaType },
      body: manifest,
    }),
    `put manifest ${repository}:${reference}`,
  );
}

/** Pushes an image or index with every blob and child, and tags it. */
export async function pushImage(registry: TestRegistry, image: Image): Promise<void> {
  for (const child of image.children ?? []) {
    for (const blob of child.blobs) await pushBlob(registry, image.repository, blob);
    await pushManifest(registry, image.repository, child.digest, child.manifest, child.mediaType);
  }
  for (const blob of image.blobs) await pushBlob(registry, image.repository, blob);
  await pushManifest(registry, image.repository, image.tag, image.manifest, image.mediaType);
}
