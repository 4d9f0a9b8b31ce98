/**
 * `pullcache export`: writes cached images to a bundle (see bundle.ts for the format). Needs no
 * upstream: it reads storage only.
 */
import type { Readable } from 'node:stream';
import { once } from 'node:events';
import { finished } from 'node:stream/promises';
import * as tar from 'tar-stream';
import { unlessAborted } from '../abort.js';
import type { Config } from '../config/schema.js';
import { formatLocation, parseLocation, type ImageLocation } from '../routing.js';
import { parseDigest, type Digest } from '../oci/digest.js';
import { parseManifest } from '../oci/manifest.js';
import { parseRepository, parseTag } from '../oci/reference.js';
import type { Runtime } from '../runtime.js';
import type { RepositoryKey } from '../storage/types.js';
import { indexJson, type BundleImage } from './bundle.js';
import {
  BundleError,
  cannotRead,
  cannotWrite,
  openTarget,
  type BundleTarget,
} from './bundle-io.js';
import type { Progress } from './progress.js';

export interface ExportResult {
  images: number;
  blobs: number;
  bytes: number;
  warnings: string[];
}

/**
 * Writes a bundle of the given references (or of every tagged image with `all`). Throws
 * BundleError when an image is not in the cache or the bundle cannot be written; a file target is
 * then left as it was.
 */
export async function exportBundle(
  runtime: Runtime,
  config: Config,
  options: { references: string[]; all: boolean; output: BundleTarget },
  progress: Progress,
): Promise<ExportResult> {
  const { local } = runtime;
  const images: BundleImage[] = [];
  const warnings: string[] = [];
  const add = async (location: ImageLocation) => {
    const repo = { upstream: location.upstream, repository: location.repository };
    let digest = location.digest;
    if (!digest) {
      const tag = location.tag ?? parseTag('latest');
      const resolved = await local.tags.resolve(repo, tag);
      if (!resolved.found)
        throw new BundleError(
          `${formatLocation({ ...location, tag })} is not in the cache (prefetch it first)`,
        );
      digest = resolved.digest;
    }
    const stat = await local.manifests.stat(repo, digest);
    if (!stat.found)
      throw new BundleError(
        `${formatLocation({ ...location, digest })} is not in the cache (prefetch it first)`,
      );
    images.push({
      location: { ...location, digest },
      mediaType: stat.link.mediaType,
      size: stat.link.size,
    });
  };
  if (options.all) {
    for (const upstream of runtime.services.keys()) {
      for (const name of await runtime.repositories.listRepositories(upstream)) {
        const repository = parseRepository(name);
        for (const tag of await local.tags.list({ upstream, repository }))
          await add({ upstream, repository, tag: parseTag(tag) });
      }
    }
  } else {
    for (const reference of options.references) await add(parseLocation(config, reference));
  }
  if (images.length === 0)
    throw new BundleError('nothing to export: the cache holds no tagged image');

  // Every blob each image needs, once. Index children that were never pulled are left out.
  const blobs = new Map<Digest, number>();
  for (const image of images) {
    const repo: RepositoryKey = {
      upstream: image.location.upstream,
      repository: image.location.repository,
    };
    const name = formatLocation(image.location);
    const walk = async (digest: Digest, top: boolean): Promise<boolean> => {
      const manifest = await local.manifests.get(repo, digest);
      if (!manifest.found) {
        if (top) throw new BundleError(`${name}: manifest ${digest} is not in the cache`);
        return false;
      }
      const parsed = parseManifest(manifest.bytes, manifest.link.mediaType);
      const needed = parsed.kind === 'index' ? [] : [parsed.config, ...parsed.layers];
      for (const d of needed) {
        if (!(await runtime.blobs.stat(d.digest)).found) {
          if (top)
            throw new BundleError(
              `${name}: blob ${d.digest} is not in the cache (prefetch the image first)`,
            );
          warnings.push(`${name}: platform manifest ${digest} is incomplete, left out`);
          return false;
        }
      }
      if (parsed.kind === 'index') {
        let any = false;
        for (const child of parsed.manifests) {
          if (await walk(child.digest, false)) any = true;
          else if (!blobs.has(child.digest))
            warnings.push(
              `${name}: platform ${child.platform ? `${child.platform.os}/${child.platform.architecture}` : child.digest} is not cached, left out`,
            );
        }
        if (!any) throw new BundleError(`${name}: no platform of this index is in the cache`);
      }
      blobs.set(digest, manifest.bytes.length);
      for (const d of needed) blobs.set(d.digest, d.size);
      return true;
    };
    await walk(image.location.digest, true);
  }

  const total = [...blobs.values()].reduce((a, b) => a + b, 0);
  const indexBytes = indexJson(images);

  const output = await openTarget(options.output);
  const item = progress.start(output.name);
  item.total = total;
  item.layers = blobs.size;
  // The output can fail at any moment (a full disk, a reader gone away): every wait below races
  // that failure, so that it is reported as it happened and never left unhandled. The archive is
  // copied to the output here rather than by pipeline(), which would pass a failure of the
  // archive (a blob that cannot be read) on to the output, to be taken for the output's own.
  // (Raced with unlessAborted, not Promise.race: see src/abort.ts, a wait per drain adds up.)
  let writeError: Error | undefined;
  const outputFailed = new AbortController();
  output.stream.on('error', (err) => outputFailed.abort((writeError ??= err)));
  const failed = outputFailed.signal;
  const pack = tar.pack();
  const written = (async () => {
    for await (const chunk of pack as AsyncIterable<Buffer>) {
      if (!output.stream.write(chunk)) await unlessAborted(once(output.stream, 'drain'), failed);
    }
    output.stream.end();
    await unlessAborted(finished(output.stream, { readable: false }), failed);
  })();
  written.catch(() => {});
  let reading: Readable | undefined;
  try {
    const entry = (name: string, size: number, source: Readable | Buffer) =>
      unlessAborted(
        new Promise<void>((resolve, reject) => {
          const header = { name, size, mode: 0o644, mtime: new Date(0) };
          const done = (err?: Error | null) => (err ? reject(err) : resolve());
          if (Buffer.isBuffer(source)) {
            pack.entry(header, source, done);
            return;
          }
          const sink = pack.entry(header, done);
          source.on('error', (err) => {
            sink.destroy(err);
            reject(err);
          });
          source.pipe(sink as unknown as NodeJS.WritableStream);
        }),
        failed,
      );
    await entry('oci-layout', 30, Buffer.from('{"imageLayoutVersion":"1.0.0"}'));
    await entry('index.json', indexBytes.length, indexBytes);
    for (const [digest, size] of blobs) {
      const opened = await runtime.blobs.open(digest);
      if (!opened.found)
        throw new BundleError(`blob ${digest} vanished from storage during the export`);
      reading = opened.stream;
      const { algorithm, hex } = parseDigest(digest);
      opened.stream.on('data', (chunk: Buffer) => (item.done += chunk.length));
      await entry(`blobs/${algorithm}/${hex}`, opened.descriptor.size, opened.stream).catch(
        (err: unknown) => {
          throw err === writeError ? err : cannotRead(`blob ${digest} from storage`, err);
        },
      );
      reading = undefined;
      progress.layerDone(output.name, digest, size, 'exported');
    }
    pack.finalize();
    await written;
    await output.commit();
  } catch (err) {
    reading?.destroy();
    pack.destroy();
    await written.catch(() => {});
    await output.discard();
    progress.failed(output.name);
    if (writeError) throw cannotWrite(output.name, writeError);
    throw err;
  }
  progress.finish(output.name);
  return { images: images.length, blobs: blobs.size, bytes: total, warnings };
}
