/**
 * `pullcache export`: writes cached images to a bundle (see bundle.ts for the format). Needs no
 * upstream: it reads storage only.
 */
import type { Readable } from 'node:stream';
import { once } from 'node:events';
import { lstat, readdir, rm } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
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
import { MAX_DEPTH } from './bundle-plan.js';
import type { Progress } from './progress.js';

export interface ExportResult {
  images: number;
  blobs: number;
  bytes: number;
  warnings: string[];
}

/** An image the cache holds only in part: an error when named, left out of `--all`. */
class IncompleteImage extends Error {}

/**
 * Writes a bundle of the given references (or of every tagged image with `all`, leaving out
 * those the cache holds only in part, each with a warning). Throws BundleError when an image
 * named is not in the cache whole or the bundle cannot be written; a file target is then left as
 * it was. With `signal`, stops when it aborts (rejecting with its reason) and removes what it
 * wrote. Before writing a file, removes what killed exports to the same name left beside it.
 */
export async function exportBundle(
  runtime: Runtime,
  config: Config,
  options: { references: string[]; all: boolean; output: BundleTarget; signal?: AbortSignal },
  progress: Progress,
): Promise<ExportResult> {
  const { local } = runtime;
  const { signal } = options;
  const images: BundleImage[] = [];
  const warnings: string[] = [];
  // Every blob the images need, once. Index children that were never pulled are left out.
  const blobs = new Map<Digest, number>();
  /** Whether each (repository, manifest) was found whole: each is walked once. */
  const walked = new Map<string, boolean>();

  /**
   * Adds what the manifest `digest` of `repo` needs to `blobs`, and says whether it is whole.
   * Below the top, what is missing is left out with a warning (a platform never pulled); at the
   * top, it is an IncompleteImage. An index needs at least one whole child.
   */
  const walk = async (
    repo: RepositoryKey,
    name: string,
    digest: Digest,
    depth: number,
  ): Promise<boolean> => {
    signal?.throwIfAborted();
    const key = `${repo.upstream}/${repo.repository}@${digest}`;
    const known = walked.get(key);
    if (known !== undefined) return known;
    if (depth > MAX_DEPTH)
      throw new BundleError(`${name}: indexes nested more than ${MAX_DEPTH} deep`);
    const top = depth === 0;
    const whole = await (async () => {
      const manifest = await local.manifests.get(repo, digest);
      if (!manifest.found) {
        if (top) throw new IncompleteImage(`${name}: manifest ${digest} is not in the cache`);
        return false;
      }
      const parsed = parseManifest(manifest.bytes, manifest.link.mediaType);
      const needed = parsed.kind === 'index' ? [] : [parsed.config, ...parsed.layers];
      for (const d of needed) {
        if (!(await runtime.blobs.stat(d.digest)).found) {
          if (top)
            throw new IncompleteImage(
              `${name}: blob ${d.digest} is not in the cache (prefetch the image first)`,
            );
          warnings.push(`${name}: platform manifest ${digest} is incomplete, left out`);
          return false;
        }
      }
      if (parsed.kind === 'index') {
        let any = false;
        for (const child of parsed.manifests) {
          if (await walk(repo, name, child.digest, depth + 1)) any = true;
          else if (!blobs.has(child.digest))
            warnings.push(
              `${name}: platform ${child.platform ? `${child.platform.os}/${child.platform.architecture}` : child.digest} is not cached, left out`,
            );
        }
        if (!any) {
          if (top) throw new IncompleteImage(`${name}: no platform of this index is in the cache`);
          return false;
        }
      }
      blobs.set(digest, manifest.bytes.length);
      for (const d of needed) blobs.set(d.digest, d.size);
      return true;
    })();
    walked.set(key, whole);
    return whole;
  };

  /** Adds an image; throws IncompleteImage when the cache does not hold all of it. */
  const add = async (location: ImageLocation) => {
    const repo = { upstream: location.upstream, repository: location.repository };
    let digest = location.digest;
    if (!digest) {
      const tag = location.tag ?? parseTag('latest');
      const resolved = await local.tags.resolve(repo, tag);
      if (!resolved.found)
        throw new IncompleteImage(
          `${formatLocation({ ...location, tag })} is not in the cache (prefetch it first)`,
        );
      digest = resolved.digest;
    }
    const stat = await local.manifests.stat(repo, digest);
    if (!stat.found)
      throw new IncompleteImage(
        `${formatLocation({ ...location, digest })} is not in the cache (prefetch it first)`,
      );
    const image: BundleImage = {
      location: { ...location, digest },
      mediaType: stat.link.mediaType,
      size: stat.link.size,
    };
    // Walked before as another image's child and found incomplete: the walk remembers it (and
    // throws only at a first visit), so it is refused here.
    if (!(await walk(repo, formatLocation(image.location), digest, 0)))
      throw new IncompleteImage(
        `${formatLocation(image.location)}: it is not whole in the cache (prefetch it first)`,
      );
    images.push(image);
  };
  if (options.all) {
    // A pull-through cache often holds tags whose layers were never all pulled: left out.
    for (const upstream of runtime.services.keys()) {
      for (const name of await runtime.repositories.listRepositories(upstream)) {
        const repository = parseRepository(name);
        for (const tag of await local.tags.list({ upstream, repository })) {
          await add({ upstream, repository, tag: parseTag(tag) }).catch((err: unknown) => {
            if (!(err instanceof IncompleteImage)) throw err;
            warnings.push(`${err.message}, left out`);
          });
        }
      }
    }
  } else {
    for (const reference of options.references) {
      await add(parseLocation(config, reference)).catch((err: unknown) => {
        throw err instanceof IncompleteImage ? new BundleError(err.message) : err;
      });
    }
  }
  if (images.length === 0)
    throw new BundleError('nothing to export: the cache holds no complete tagged image');
  signal?.throwIfAborted();

  const total = [...blobs.values()].reduce((a, b) => a + b, 0);
  const indexBytes = indexJson(images);

  if ('path' in options.output) await removeStalePartials(options.output.path);
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
  // Interrupted (^C): stopped as a failed output is, and what was written is removed.
  const failed = signal ? AbortSignal.any([outputFailed.signal, signal]) : outputFailed.signal;
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
      signal?.throwIfAborted();
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
    // Interrupted: that is what happened, whatever the teardown made the output say.
    if (signal?.aborted) throw signal.reason;
    if (writeError) throw cannotWrite(output.name, writeError);
    throw err;
  }
  progress.finish(output.name);
  return {
    images: images.length,
    blobs: blobs.size,
    bytes: total,
    warnings: [...new Set(warnings)],
  };
}

/** How long a temporary file goes unwritten before it is taken for a killed export's. */
const STALE_PARTIAL_MS = 60_000;

/**
 * Removes what exports to `path` that were killed (SIGKILL, a power cut) left beside it: files
 * named as `openTarget` names its temporary files (`.NAME.<8 hex>.partial`), untouched for a
 * minute (a running export writes its own all the time). Nothing else is touched; failures are
 * passed over (the export itself says what is wrong with the directory).
 */
async function removeStalePartials(path: string): Promise<void> {
  const dir = dirname(path);
  const prefix = `.${basename(path)}.`;
  const names = await readdir(dir).catch(() => [] as string[]);
  for (const name of names) {
    if (!name.startsWith(prefix) || !/^[0-9a-f]{8}\.partial$/.test(name.slice(prefix.length)))
      continue;
    const file = join(dir, name);
    const info = await lstat(file).catch(() => undefined);
    if (info?.isFile() && Date.now() - info.mtimeMs > STALE_PARTIAL_MS)
      await rm(file, { force: true }).catch(() => {});
  }
}
