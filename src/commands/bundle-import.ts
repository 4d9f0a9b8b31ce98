/**
 * `pullcache import`: reads a bundle (see bundle.ts for the format) into the cache. Every blob is
 * verified against its digest while it streams into an upload session, and nothing is made visible
 * until the whole bundle has been read and checked: a damaged, truncated or misplaced bundle
 * leaves the cache as it was. What the cache admits (upstreams, allow/deny lists, the retention
 * budget) is bundle-admission.ts; what each image needs, bundle-plan.ts.
 */
import { pipeline } from 'node:stream/promises';
import * as tar from 'tar-stream';
import { DigestVerifier, parseDigest, type Digest } from '../oci/digest.js';
import type { Runtime } from '../runtime.js';
import type { BlobWriter } from '../storage/types.js';
import { parseIndex, readAll, type IndexEntry } from './bundle.js';
import { checkBudget, checkUpstreamMap, placeImages } from './bundle-admission.js';
import {
  BundleError,
  cannotRead,
  cannotStore,
  openSource,
  type BundleSource,
} from './bundle-io.js';
import { MANIFEST_LIMIT, planImport } from './bundle-plan.js';
import type { Progress } from './progress.js';

/**
 * Bytes of the bundle's blobs kept in memory while it is read, for reading manifests without a
 * second pass: only what may be one (JSON, at most MANIFEST_LIMIT), and no more than this in all;
 * the rest is read back from its upload session (or storage) when needed.
 */
const KEPT_BYTES = 64 * 1024 * 1024;
/** Tags set at once. */
const TAG_WRITERS = 16;
/**
 * `{`: manifests are JSON objects; compressed layers (gzip, zstd) never start with it, and what
 * else does is held to KEPT_BYTES all the same.
 */
const JSON_OBJECT = 0x7b;

export interface ImportResult {
  images: number;
  /** Blobs in the bundle, and their bytes. */
  blobs: number;
  bytes: number;
  blobsAdded: number;
  bytesAdded: number;
  blobsPresent: number;
  tagsChanged: number;
  warnings: string[];
}

export interface ImportOptions {
  /**
   * Bundle upstream name -> configured upstream name: images the bundle has from the first are
   * kept under the second (same repository and tag).
   */
  upstreamMap?: ReadonlyMap<string, string>;
  /**
   * Aborting stops the import: reading ends, the upload sessions it staged are cancelled, and it
   * throws BundleError('interrupted'). Images already made visible (the last phase) stay.
   */
  signal?: AbortSignal;
}

/**
 * Reads a bundle into the cache. Throws BundleError, leaving the cache unchanged, when it cannot:
 * a damaged, truncated or unreadable bundle, one with images from an upstream that is not
 * configured (or is a passthrough upstream) and not mapped to one by `upstreamMap`, one that
 * would take storage past `retention.maxSize`, or storage that fails (full). The upstream check
 * is made before any blob is read when the bundle names its images first, as pullcache's own do.
 * On any failure, the upload sessions it staged are cancelled.
 */
export async function importBundle(
  runtime: Runtime,
  bundle: BundleSource,
  progress: Progress,
  options: ImportOptions = {},
): Promise<ImportResult> {
  const { signal } = options;
  const upstreamMap = options.upstreamMap ?? new Map<string, string>();
  checkUpstreamMap(runtime, upstreamMap);
  if (signal?.aborted) throw new BundleError('interrupted');
  const source = await openSource(bundle);
  const file = source.name;
  const storage = storageName(runtime);
  /** Storage operations: a failure there is the storage's, not the bundle's. */
  const store = <T>(work: Promise<T>): Promise<T> =>
    work.catch((err: unknown) => {
      throw cannotStore(storage, err);
    });
  const staged = new Map<Digest, { id: string; size: number }>();
  const present = new Set<Digest>();
  /** Every blob of the bundle (verified), with its size. */
  const inBundle = new Map<Digest, number>();
  const kept = new Map<Digest, Buffer>();
  let keptBytes = 0;
  let images: IndexEntry[] | undefined;
  const bundleUpstreams = new Set<string>();
  let layoutSeen = false;
  const item = progress.start(file);
  let bytesAdded = 0;
  let bytes = 0;
  /** The session being written, until it is closed. */
  let writing: BlobWriter | undefined;

  const cancelStaged = async () => {
    await writing?.cancel().catch(() => {});
    for (const { id } of staged.values())
      await (await runtime.blobs.resume(id).catch(() => undefined))?.cancel().catch(() => {});
    staged.clear();
  };
  const checkAborted = () => {
    if (signal?.aborted) throw new BundleError('interrupted');
  };

  const extract = tar.extract();
  const stopReading = () => {
    source.stream.destroy();
    extract.destroy();
  };
  signal?.addEventListener('abort', stopReading, { once: true });
  // An error of the archive (not a tar) reaches the source too, through the pipeline: only an
  // error the source has first is its own.
  let readError: Error | undefined;
  let extractFailed = false;
  extract.on('error', () => (extractFailed ||= readError === undefined));
  source.stream.on('error', (err) => {
    if (!extractFailed) readError ??= err;
  });
  const reading = pipeline(source.stream, extract).catch((err: unknown) => {
    if (readError) throw cannotRead(file, readError);
    // The reader of the entries stopped (its own error, or an interruption): that is the reason.
    if ((err as NodeJS.ErrnoException).code === 'ERR_STREAM_PREMATURE_CLOSE') throw err;
    if ((err as Error).message === 'Unexpected end of data')
      throw new BundleError(
        layoutSeen
          ? `${file} is truncated: it ends inside an entry`
          : `${file} is not a bundle: it is not a tar archive, or it ends inside its first entry`,
      );
    throw new BundleError(`${file} is not a readable bundle: ${(err as Error).message}`);
  });
  reading.catch(() => {});

  /** A manifest of the bundle: kept in memory, or read back from its session or storage. */
  const bundled = async (digest: Digest): Promise<Buffer> => {
    const inMemory = kept.get(digest);
    if (inMemory) return inMemory;
    const session = staged.get(digest);
    let read: Buffer;
    if (session) {
      const writer = await store(runtime.blobs.resume(session.id));
      try {
        read = await readAll(
          await store(writer.readWritten(0, session.size)),
          MANIFEST_LIMIT,
          `${file}: manifest ${digest}`,
        );
      } finally {
        await store(writer.close());
      }
    } else {
      const opened = await runtime.blobs.open(digest);
      if (!opened.found)
        throw new BundleError(
          `${file}: blob ${digest} was removed from the cache while the bundle was read; import it again`,
        );
      read = await readAll(opened.stream, MANIFEST_LIMIT, `${file}: manifest ${digest}`);
    }
    if (keptBytes + read.length <= KEPT_BYTES) {
      kept.set(digest, read);
      keptBytes += read.length;
    }
    return read;
  };

  try {
    const entries = (async () => {
      for await (const entry of extract) {
        checkAborted();
        const { name, size = 0, type } = entry.header;
        const path = name.replace(/^\.\//, '');
        if (type === 'directory' || path === '' || path.endsWith('/')) {
          entry.resume();
          continue;
        }
        if (type !== 'file')
          throw new BundleError(`${file}: unexpected ${type} entry ${JSON.stringify(name)}`);
        if (path === 'oci-layout') {
          const text = (await readAll(entry, 4096, `${file}: oci-layout`)).toString('utf8');
          let layout: { imageLayoutVersion?: string } | undefined;
          try {
            layout = JSON.parse(text) as { imageLayoutVersion?: string } | undefined;
          } catch {
            throw new BundleError(`${file}: oci-layout is not valid JSON`);
          }
          if (layout?.imageLayoutVersion !== '1.0.0')
            throw new BundleError(
              `${file}: unsupported image layout version ${String(layout?.imageLayoutVersion)}`,
            );
          layoutSeen = true;
          continue;
        }
        if (path === 'index.json') {
          const parsed = parseIndex(
            await readAll(entry, 16 * 1024 * 1024, `${file}: index.json`),
            file,
          );
          for (const image of parsed) bundleUpstreams.add(image.upstream);
          images = placeImages(runtime, parsed, upstreamMap, file);
          continue;
        }
        const m = /^blobs\/(sha256|sha512)\/([a-f0-9]+)$/.exec(path);
        if (!m)
          throw new BundleError(`${file}: unexpected entry ${JSON.stringify(name.slice(0, 200))}`);
        let digest: Digest;
        try {
          digest = parseDigest(`${m[1]}:${m[2]}`).digest;
        } catch {
          throw new BundleError(
            `${file}: ${JSON.stringify(name.slice(0, 200))} does not name a valid digest`,
          );
        }
        const verifier = new DigestVerifier(parseDigest(digest));
        const verify = () => {
          if (verifier.bytes !== size)
            throw new BundleError(`${file}: blob ${digest} is truncated`);
          if (!verifier.matches())
            throw new BundleError(
              `${file}: blob ${digest} is damaged (its content is ${verifier.actual()})`,
            );
        };
        // Maybe a manifest: kept, within KEPT_BYTES in all (a first chunk that is not JSON drops it).
        let keep =
          size <= MANIFEST_LIMIT && keptBytes + size <= KEPT_BYTES ? ([] as Buffer[]) : undefined;
        const take = (chunk: Buffer) => {
          verifier.update(chunk);
          if (keep && keep.length === 0 && chunk.length > 0 && chunk[0] !== JSON_OBJECT)
            keep = undefined;
          keep?.push(chunk);
          item.done += chunk.length;
        };
        if (inBundle.has(digest)) {
          // A second copy: checked, and dropped (one session and one count per blob).
          keep = undefined;
          for await (const chunk of entry) take(chunk as Buffer);
          verify();
          continue;
        }
        if ((await store(runtime.blobs.stat(digest))).found) {
          // Already stored (verified when it was): check the bundle's copy all the same.
          for await (const chunk of entry) take(chunk as Buffer);
          verify();
          present.add(digest);
        } else {
          const writer = await store(runtime.blobs.create({ hash: false }));
          writer.expectSize(size);
          writing = writer;
          staged.set(digest, { id: writer.id, size });
          for await (const chunk of entry) {
            take(chunk as Buffer);
            await store(writer.write(chunk as Buffer));
          }
          await store(writer.close());
          writing = undefined;
          verify();
          bytesAdded += size;
        }
        inBundle.set(digest, size);
        bytes += size;
        if (keep) {
          kept.set(digest, Buffer.concat(keep));
          keptBytes += size;
        }
        progress.layerDone(file, digest, size, present.has(digest) ? 'present' : 'added');
      }
    })();
    await Promise.all([reading, entries]);
    checkAborted();

    if (!layoutSeen)
      throw new BundleError(`${file}: no oci-layout entry: not an OCI image layout bundle`);
    if (!images)
      throw new BundleError(`${file}: no index.json: the bundle is truncated or incomplete`);

    // Everything each image needs must be in the bundle or already held by its repository.
    const planned = await planImport(runtime, images, { file, inBundle, bundled, checkAborted });
    await checkBudget(runtime, file, bytesAdded);

    // All verified: make it visible, an image at a time: the blobs it needs committed (each an
    // atomic rename or copy), then its manifest and its layer links. The server's sweep collects
    // a blob no repository links once its last use is 10 minutes old (lifecycle/sweep.ts), and
    // a commit is a use (blob-store.ts): committing every blob of a large bundle before linking
    // any would leave the first ones unlinked for as long as the rest take.
    const blobsAdded = staged.size;
    const commit = async (digest: Digest) => {
      const session = staged.get(digest)!;
      const writer = await store(runtime.blobs.resume(session.id));
      staged.delete(digest); // committed or failed, the session is gone
      await store(writer.commit({ digest, size: session.size, verified: true }));
    };
    const committed = new Set<Digest>();
    for (const link of planned) {
      checkAborted();
      // The manifest's bytes first, while it may still be read from its session.
      const manifest = await bundled(link.digest);
      for (const digest of [link.digest, ...link.blobs]) {
        if (staged.has(digest)) {
          await commit(digest);
          committed.add(digest);
        } else if (!committed.has(digest) && digest !== link.digest) {
          // Stored before the import, and maybe by nothing linked (the sweep's to collect):
          // used now, so that it stays until its link below; and still there.
          await store(runtime.blobs.markPulled(digest, Date.now()));
          if (!(await runtime.blobs.stat(digest)).found)
            throw new BundleError(
              `${file}: blob ${digest} was removed from the cache while the bundle was read; import it again`,
            );
        }
      }
      await store(runtime.local.manifests.put(link.repo, manifest, link.digest, link.mediaType));
      for (const blob of link.blobs) {
        const stat = await runtime.blobs.stat(blob);
        if (stat.found) await store(runtime.repositories.linkBlob(link.repo, stat.descriptor));
      }
    }
    // Blobs of the bundle no image here needs: stored all the same, as before.
    for (const digest of [...staged.keys()]) await commit(digest);
    let tagsChanged = 0;
    // The last word for each tag (the same tag named twice: as it was, the later one wins).
    const tags = new Map<string, IndexEntry>();
    for (const image of images)
      if (image.tag) tags.set(`${image.upstream}/${image.repository}:${image.tag}`, image);
    // Each tag is a file of its own: set a few at once (a bundle may tag one image 30,000 times).
    const queue = [...tags.values()];
    const setTags = async () => {
      for (let image = queue.shift(); image; image = queue.shift()) {
        checkAborted();
        const repo = { upstream: image.upstream, repository: image.repository };
        const current = await runtime.local.tags.resolve(repo, image.tag!);
        // Running an import twice changes nothing: a tag that already points here is left as it is.
        if (current.found && current.digest === image.digest) continue;
        await store(runtime.local.tags.tag(repo, image.tag!, image.digest));
        tagsChanged++;
      }
    };
    await Promise.all(Array.from({ length: TAG_WRITERS }, setTags));
    progress.finish(file);
    const warnings = [...upstreamMap]
      .filter(([from]) => !bundleUpstreams.has(from))
      .map(([from, to]) => `--upstream-map ${from}=${to}: the bundle has no images from ${from}`);
    return {
      images: images.length,
      blobs: blobsAdded + present.size,
      bytes,
      blobsAdded,
      bytesAdded,
      blobsPresent: present.size,
      tagsChanged,
      warnings,
    };
  } catch (err) {
    stopReading();
    // A stream error seen by the reader of the entries is told better by the pipeline; the
    // pipeline's "premature close" (the reader stopped) is told better by the reader's own.
    let reason: unknown = err;
    if (!(err instanceof BundleError)) {
      const piped = await reading.then(
        () => undefined,
        (e: unknown) => e,
      );
      if (piped instanceof BundleError) reason = piped;
    }
    await cancelStaged();
    progress.failed(file);
    if (signal?.aborted) throw new BundleError('interrupted');
    if (reason instanceof BundleError) throw reason;
    // The stream closed early with nothing better known of why.
    if ((reason as NodeJS.ErrnoException).code === 'ERR_STREAM_PREMATURE_CLOSE')
      throw new BundleError(`${file} is not a readable bundle: ${(reason as Error).message}`);
    throw new BundleError(`${file}: ${(reason as Error).message}`);
  } finally {
    signal?.removeEventListener('abort', stopReading);
  }
}

/** Where storage is, for messages: the root directory, or the S3 bucket and prefix. */
function storageName(runtime: Runtime): string {
  const { storage } = runtime.config;
  return storage.driver === 's3'
    ? `s3://${storage.s3.bucket}/${storage.s3.prefix}`
    : storage.filesystem.root;
}
