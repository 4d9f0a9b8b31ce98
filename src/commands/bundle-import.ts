/**
 * `pullcache import`: reads a bundle (see bundle.ts for the format) into the cache. Every blob is
 * verified against its digest while it streams into an upload session, and nothing is made visible
 * until the whole bundle has been read and checked: a damaged, truncated or misplaced bundle
 * leaves the cache as it was.
 */
import { pipeline } from 'node:stream/promises';
import * as tar from 'tar-stream';
import { repositoryLists } from '../access/repositories.js';
import { formatLocation } from '../routing.js';
import { DigestVerifier, parseDigest, type Digest } from '../oci/digest.js';
import { parseManifest } from '../oci/manifest.js';
import type { Runtime } from '../runtime.js';
import type { RepositoryKey } from '../storage/types.js';
import { parseIndex, readAll, type IndexEntry } from './bundle.js';
import { BundleError, cannotRead, openSource, type BundleSource } from './bundle-io.js';
import type { Progress } from './progress.js';

/** Blobs up to this size are kept in memory during import, to read manifests without a second pass. */
const SMALL_BLOB = 4 * 1024 * 1024;

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
}

/**
 * Reads a bundle into the cache. Throws BundleError, leaving the cache unchanged, when it cannot:
 * a damaged, truncated or unreadable bundle, or one with images from an upstream that is not
 * configured (or is a passthrough upstream) and not mapped to one by `upstreamMap`. That check is
 * made before any blob is read when the bundle names its images first, as pullcache's own do.
 */
export async function importBundle(
  runtime: Runtime,
  bundle: BundleSource,
  progress: Progress,
  options: ImportOptions = {},
): Promise<ImportResult> {
  const upstreamMap = options.upstreamMap ?? new Map<string, string>();
  checkUpstreamMap(runtime, upstreamMap);
  const source = await openSource(bundle);
  const file = source.name;
  const staged = new Map<Digest, { id: string; size: number }>();
  const present = new Set<Digest>();
  const small = new Map<Digest, Buffer>();
  let images: IndexEntry[] | undefined;
  const bundleUpstreams = new Set<string>();
  let layoutSeen = false;
  const item = progress.start(file);
  let bytesAdded = 0;
  let bytes = 0;

  const cancelStaged = async () => {
    for (const { id } of staged.values())
      await (await runtime.blobs.resume(id).catch(() => undefined))?.cancel().catch(() => {});
  };

  const extract = tar.extract();
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
    if ((err as Error).message === 'Unexpected end of data')
      throw new BundleError(
        layoutSeen
          ? `${file} is truncated: it ends inside an entry`
          : `${file} is not a bundle: it is not a tar archive, or it ends inside its first entry`,
      );
    throw new BundleError(`${file} is not a readable bundle: ${(err as Error).message}`);
  });
  reading.catch(() => {});
  try {
    const entries = (async () => {
      for await (const entry of extract) {
        const { name, size = 0, type } = entry.header;
        const path = name.replace(/^\.\//, '');
        if (type === 'directory' || path === '' || path.endsWith('/')) {
          entry.resume();
          continue;
        }
        if (type !== 'file')
          throw new BundleError(`${file}: unexpected ${type} entry ${JSON.stringify(name)}`);
        if (path === 'oci-layout') {
          const layout = JSON.parse((await readAll(entry, 4096)).toString('utf8')) as {
            imageLayoutVersion?: string;
          };
          if (layout.imageLayoutVersion !== '1.0.0')
            throw new BundleError(
              `${file}: unsupported image layout version ${String(layout.imageLayoutVersion)}`,
            );
          layoutSeen = true;
          continue;
        }
        if (path === 'index.json') {
          const parsed = parseIndex(await readAll(entry, 16 * 1024 * 1024), file);
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
        const keep = size <= SMALL_BLOB ? ([] as Buffer[]) : undefined;
        if ((await runtime.blobs.stat(digest)).found) {
          // Already stored (verified when it was): check the bundle's copy all the same.
          for await (const chunk of entry) {
            verifier.update(chunk as Buffer);
            keep?.push(chunk as Buffer);
            item.done += (chunk as Buffer).length;
          }
          if (!verifier.matches())
            throw new BundleError(
              `${file}: blob ${digest} is damaged (its content is ${verifier.actual()})`,
            );
          present.add(digest);
        } else {
          const writer = await runtime.blobs.create({ hash: false });
          staged.set(digest, { id: writer.id, size });
          for await (const chunk of entry) {
            verifier.update(chunk as Buffer);
            keep?.push(chunk as Buffer);
            await writer.write(chunk as Buffer);
            item.done += (chunk as Buffer).length;
          }
          await writer.close();
          if (verifier.bytes !== size)
            throw new BundleError(`${file}: blob ${digest} is truncated`);
          if (!verifier.matches())
            throw new BundleError(
              `${file}: blob ${digest} is damaged (its content is ${verifier.actual()})`,
            );
          bytesAdded += size;
        }
        bytes += size;
        if (keep) small.set(digest, Buffer.concat(keep));
        progress.layerDone(file, digest, size, present.has(digest) ? 'present' : 'added');
      }
    })();
    await Promise.all([reading, entries]);

    if (!layoutSeen)
      throw new BundleError(`${file}: no oci-layout entry: not an OCI image layout bundle`);
    if (!images)
      throw new BundleError(`${file}: no index.json: the bundle is truncated or incomplete`);

    // Everything each image needs must be in the bundle or already stored.
    const available = (d: Digest) => staged.has(d) || present.has(d);
    const manifestBytes = async (d: Digest): Promise<Buffer | undefined> => {
      const inMemory = small.get(d);
      if (inMemory) return inMemory;
      if (present.has(d) || (await runtime.blobs.stat(d)).found) {
        const opened = await runtime.blobs.open(d);
        return opened.found ? readAll(opened.stream, SMALL_BLOB) : undefined;
      }
      return undefined;
    };
    const links: {
      repo: RepositoryKey;
      digest: Digest;
      mediaType: string;
      size: number;
      blobs: Digest[];
    }[] = [];
    for (const image of images) {
      const repo = { upstream: image.upstream, repository: image.repository };
      const visit = async (digest: Digest, mediaType: string, top: boolean): Promise<void> => {
        const bytes = await manifestBytes(digest);
        if (!bytes) {
          if (top)
            throw new BundleError(
              `${file}: manifest ${digest} of ${formatLocation(image)} is missing: the bundle is truncated or incomplete`,
            );
          return; // a platform that was never pulled; fetched when asked for, if ever online
        }
        const parsed = parseManifest(bytes, mediaType);
        const needed = parsed.kind === 'index' ? [] : [parsed.config, ...parsed.layers];
        for (const d of needed) {
          if (!available(d.digest) && !(await runtime.blobs.stat(d.digest)).found) {
            throw new BundleError(
              `${file}: blob ${d.digest} of ${formatLocation(image)} is missing: the bundle is truncated or incomplete`,
            );
          }
        }
        // Children first: an index is made visible once every manifest it names is (a pull
        // that gets the index finds its platforms).
        if (parsed.kind === 'index')
          for (const child of parsed.manifests)
            await visit(child.digest, child.mediaType ?? '', false);
        links.push({
          repo,
          digest,
          mediaType: parsed.mediaType,
          size: bytes.length,
          blobs: needed.map((d) => d.digest),
        });
      };
      await visit(image.digest, image.mediaType, true);
    }

    // All verified: make it visible, an image at a time: the blobs it needs committed (each an
    // atomic rename or copy), then its manifest and its layer links. The server's sweep collects
    // a blob no repository links once its last use is 10 minutes old (lifecycle/sweep.ts), and
    // a commit is a use (blob-store.ts): committing every blob of a large bundle before linking
    // any would leave the first ones unlinked for as long as the rest take.
    const blobsAdded = staged.size;
    const commit = async (digest: Digest) => {
      const session = staged.get(digest)!;
      const writer = await runtime.blobs.resume(session.id);
      staged.delete(digest); // committed or failed, the session is gone
      await writer.commit({ digest, size: session.size, verified: true });
    };
    const committed = new Set<Digest>();
    for (const link of links) {
      for (const digest of [link.digest, ...link.blobs]) {
        if (staged.has(digest)) {
          await commit(digest);
          committed.add(digest);
        } else if (!committed.has(digest) && digest !== link.digest) {
          // Stored before the import, and maybe by nothing linked (the sweep's to collect):
          // used now, so that it stays until its link below; and still there.
          await runtime.blobs.markPulled(digest, Date.now());
          if (!(await runtime.blobs.stat(digest)).found)
            throw new BundleError(
              `${file}: blob ${digest} was removed from the cache while the bundle was read; import it again`,
            );
        }
      }
      await runtime.local.manifests.put(
        link.repo,
        (await manifestBytes(link.digest))!,
        link.digest,
        link.mediaType,
      );
      for (const blob of link.blobs) {
        const stat = await runtime.blobs.stat(blob);
        if (stat.found) await runtime.repositories.linkBlob(link.repo, stat.descriptor);
      }
    }
    // Blobs of the bundle no image here needs: stored all the same, as before.
    for (const digest of [...staged.keys()]) await commit(digest);
    let tagsChanged = 0;
    for (const image of images) {
      if (!image.tag) continue;
      const repo = { upstream: image.upstream, repository: image.repository };
      const current = await runtime.local.tags.resolve(repo, image.tag);
      // Running an import twice changes nothing: a tag that already points here is left as it is.
      if (current.found && current.digest === image.digest) continue;
      await runtime.local.tags.tag(repo, image.tag, image.digest);
      tagsChanged++;
    }
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
    source.stream.destroy();
    extract.destroy();
    // A stream error seen by the reader of the entries is told better by the pipeline.
    const reason =
      err instanceof BundleError
        ? err
        : ((await reading.then(
            () => undefined,
            (e: unknown) => e,
          )) ?? err);
    await cancelStaged();
    progress.failed(file);
    if (reason instanceof BundleError) throw reason;
    throw new BundleError(`${file}: ${(reason as Error).message}`);
  }
}

/** Every target of the map is an upstream whose images are cached; throws BundleError if not. */
function checkUpstreamMap(runtime: Runtime, map: ReadonlyMap<string, string>): void {
  for (const [from, to] of map) {
    if (runtime.services.has(to)) continue;
    throw new BundleError(
      `--upstream-map ${from}=${to}: ${to} ${runtime.passthrough.has(to) ? 'is a passthrough upstream (nothing is cached for it)' : `is not a configured upstream (configured: ${configuredUpstreams(runtime)})`}`,
    );
  }
}

/**
 * The bundle's images under the upstreams they are kept under here (mapped or the same name);
 * throws BundleError naming every upstream of the bundle that has no place here.
 */
function placeImages(
  runtime: Runtime,
  images: IndexEntry[],
  map: ReadonlyMap<string, string>,
  file: string,
): IndexEntry[] {
  const placed = images.map((image) => ({
    ...image,
    upstream: map.get(image.upstream) ?? image.upstream,
  }));
  const unplaced = [...new Set(placed.map((image) => image.upstream))].filter(
    (upstream) => !runtime.services.has(upstream),
  );
  const passthrough = unplaced.filter((upstream) => runtime.passthrough.has(upstream));
  const missing = unplaced.filter((upstream) => !runtime.passthrough.has(upstream));
  const mapHint = (names: string[]) =>
    `--upstream-map ${names.map((name) => `${name}=<upstream>`).join(',')}`;
  if (missing.length > 0) {
    const one = missing.length === 1;
    throw new BundleError(
      `${file}: its images are from ${one ? 'upstream' : 'upstreams'} ${missing.join(', ')}, which ${one ? 'is' : 'are'} not configured here (configured: ${configuredUpstreams(runtime)}); add ${one ? 'it' : 'them'}, or map ${one ? 'it' : 'them'} with ${mapHint(missing)}`,
    );
  }
  if (passthrough.length > 0) {
    const one = passthrough.length === 1;
    throw new BundleError(
      `${file}: its images are from ${one ? 'upstream' : 'upstreams'} ${passthrough.join(', ')}, which ${one ? 'is a passthrough upstream' : 'are passthrough upstreams'} here (nothing is cached for ${one ? 'it' : 'them'}); map ${one ? 'it' : 'them'} with ${mapHint(passthrough)}`,
    );
  }
  // Outside an upstream's allow/deny lists: refused, and nothing of the bundle is kept.
  const lists = repositoryLists(runtime.config);
  for (const image of placed) {
    const verdict = lists.verdict(image.upstream, image.repository);
    if (!verdict.allowed)
      throw new BundleError(`${file}: ${formatLocation(image)} is refused: ${verdict.reason}`);
  }
  return placed;
}

function configuredUpstreams(runtime: Runtime): string {
  return [...runtime.services.keys()].join(', ') || 'none';
}
