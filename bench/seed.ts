/**
 * Generated images for the benchmark, written to files and pushed as streams (a 1 GiB layer is
 * never held in memory): a 1 GiB layer, a 256 MiB layer, and a 5-layer image of about 400 MiB of
 * realistic, compressible content (gzip'd tar of part binary-like, part text data).
 */
import { createHash, randomBytes } from 'node:crypto';
import { createReadStream, createWriteStream, statSync } from 'node:fs';
import { once } from 'node:events';
import { join } from 'node:path';
import { createGzip } from 'node:zlib';
import { request } from 'undici';
import { ociManifest, tarHeader, tarPadding } from '../test/helpers/images.js';
import type { TestRegistry } from '../test/helpers/registry.js';

export interface FileBlob {
  path: string;
  digest: string;
  size: number;
  diffId?: string;
}

const MiB = 1024 * 1024;

async function write(stream: NodeJS.WritableStream, chunk: Buffer): Promise<void> {
  if (!stream.write(chunk)) await once(stream, 'drain');
}

/** Incompressible bytes, as a gzip'd layer looks on the wire. */
export async function randomBlob(dir: string, name: string, size: number): Promise<FileBlob> {
  const path = join(dir, name);
  const out = createWriteStream(path);
  const hash = createHash('sha256');
  for (let done = 0; done < size;) {
    const chunk = randomBytes(Math.min(4 * MiB, size - done));
    hash.update(chunk);
    await write(out, chunk);
    done += chunk.length;
  }
  out.end();
  await once(out, 'finish');
  return { path, digest: `sha256:${hash.digest('hex')}`, size };
}

const WORDS =
  'lib usr bin share locale include python3 node_modules package json index js ts so a conf etc var log cache'.split(
    ' ',
  );

/** A gzip'd one-file tar of `rawSize` bytes: 60% random (binaries), 40% text (scripts, configs). */
export async function realisticLayer(
  dir: string,
  name: string,
  rawSize: number,
): Promise<FileBlob> {
  const path = join(dir, name);
  const out = createWriteStream(path);
  const gzip = createGzip({ level: 1 });
  const blobHash = createHash('sha256');
  const diffHash = createHash('sha256');
  gzip.on('data', (c: Buffer) => blobHash.update(c));
  gzip.pipe(out);
  const header = tarHeader(`${name}.bin`, rawSize);
  const feed = async (chunk: Buffer) => {
    diffHash.update(chunk);
    if (!gzip.write(chunk)) await once(gzip, 'drain');
  };
  await feed(header);
  const text = Buffer.from(
    Array.from({ length: 40_000 }, (_, i) => WORDS[(i * 7919) % WORDS.length]).join('/'),
  );
  for (let done = 0; done < rawSize;) {
    const n = Math.min(MiB, rawSize - done);
    const block = Buffer.concat([randomBytes(Math.floor(n * 0.6)), text]).subarray(0, n);
    await feed(block);
    done += n;
  }
  await feed(Buffer.concat([tarPadding(rawSize), Buffer.alloc(1024)]));
  gzip.end();
  await once(out, 'finish');
  return {
    path,
    digest: `sha256:${blobHash.digest('hex')}`,
    size: statSync(path).size,
    diffId: `sha256:${diffHash.digest('hex')}`,
  };
}

async function auth(registry: TestRegistry, repository: string) {
  return { authorization: `Bearer ${registry.tokens.pushToken(repository)}` };
}

export async function pushFileBlob(
  registry: TestRegistry,
  repository: string,
  blob: { digest: string; size: number; path?: string; bytes?: Buffer },
): Promise<void> {
  const headers = await auth(registry, repository);
  const start = await request(`${registry.url}/v2/${repository}/blobs/uploads/`, {
    method: 'POST',
    headers,
  });
  await start.body.dump();
  if (start.statusCode !== 202) throw new Error(`start upload: HTTP ${start.statusCode}`);
  const location = new URL(String(start.headers.location), registry.url);
  location.searchParams.set('digest', blob.digest);
  const put = await request(location, {
    method: 'PUT',
    headers: {
      ...headers,
      'content-type': 'application/octet-stream',
      'content-length': String(blob.size),
    },
    body: blob.bytes ?? createReadStream(blob.path!),
  });
  const text = await put.body.text();
  if (put.statusCode !== 201)
    throw new Error(`put blob ${blob.digest}: HTTP ${put.statusCode} ${text}`);
}

export async function pushManifest(
  registry: TestRegistry,
  repository: string,
  tag: string,
  manifest: Buffer,
  mediaType: string,
): Promise<void> {
  const res = await request(`${registry.url}/v2/${repository}/manifests/${tag}`, {
    method: 'PUT',
    headers: { ...(await auth(registry, repository)), 'content-type': mediaType },
    body: manifest,
  });
  const text = await res.body.text();
  if (res.statusCode !== 201) throw new Error(`put manifest: HTTP ${res.statusCode} ${text}`);
}

export interface PushedImage {
  repository: string;
  tag: string;
  digest: string;
  manifest: Buffer;
  layers: FileBlob[];
}

/** An OCI image of the given layers (and a generated config), pushed and tagged. */
export async function pushImage(
  registry: TestRegistry,
  repository: string,
  tag: string,
  layers: FileBlob[],
): Promise<PushedImage> {
  const config = Buffer.from(
    JSON.stringify({
      architecture: 'amd64',
      os: 'linux',
      rootfs: { type: 'layers', diff_ids: layers.map((l) => l.diffId ?? l.digest) },
      config: { Cmd: ['/bin/sh'] },
    }),
  );
  const configDigest = `sha256:${createHash('sha256').update(config).digest('hex')}`;
  await pushFileBlob(registry, repository, {
    digest: configDigest,
    size: config.length,
    bytes: config,
  });
  for (const layer of layers) await pushFileBlob(registry, repository, layer);
  const mediaType = 'application/vnd.oci.image.manifest.v1+json';
  const manifest = ociManifest({ digest: configDigest, size: config.length }, layers);
  await pushManifest(registry, repository, tag, manifest, mediaType);
  return {
    repository,
    tag,
    digest: `sha256:${createHash('sha256').update(manifest).digest('hex')}`,
    manifest,
    layers,
  };
}
