/**
 * What an import will make visible, checked before anything is: each image's manifests (an
 * index's children before it) and, for each manifest, every blob it names. A blob must be in the
 * bundle or already held by the same repository here, at the size its descriptor says: content
 * stored for another repository is never linked on a bundle's word (blobs are shared by digest on
 * disk, not between repositories). Each (repository, manifest) is walked once, indexes nest at
 * most MAX_DEPTH deep and a bundle names at most MAX_MANIFESTS of them: a bundle of indexes that
 * name each other many times over is refused, not walked for ever.
 */
import { formatLocation } from '../routing.js';
import type { Digest } from '../oci/digest.js';
import type { Descriptor } from '../oci/descriptor.js';
import { parseManifest } from '../oci/manifest.js';
import type { Runtime } from '../runtime.js';
import type { RepositoryKey } from '../storage/types.js';
import { readAll, type IndexEntry } from './bundle.js';
import { BundleError } from './bundle-io.js';

/** The largest manifest read (the reference registry's limit is the same 4 MiB). */
export const MANIFEST_LIMIT = 4 * 1024 * 1024;
/** How deep indexes may nest: an image index of images indexes is already unusual. */
export const MAX_DEPTH = 8;
/** Manifests (per repository) one bundle may name: far more than any real bundle has. */
export const MAX_MANIFESTS = 100_000;

/** A manifest to make visible in a repository, with the blobs (config, layers) it needs. */
export interface PlannedManifest {
  repo: RepositoryKey;
  digest: Digest;
  mediaType: string;
  blobs: Digest[];
}

export interface PlanSources {
  /** The bundle's name, for messages. */
  file: string;
  /** Every blob of the bundle (verified), with its size. */
  inBundle: ReadonlyMap<Digest, number>;
  /** The bytes of a manifest the bundle holds. */
  bundled(digest: Digest): Promise<Buffer>;
  /** Throws when the import was interrupted. */
  checkAborted(): void;
}

/**
 * The manifests to link, children before the indexes that name them, each (repository, digest)
 * once. Throws BundleError naming the image and digest for anything missing, of the wrong size,
 * or nested too deep.
 */
export async function planImport(
  runtime: Runtime,
  images: readonly IndexEntry[],
  sources: PlanSources,
): Promise<PlannedManifest[]> {
  const { file, inBundle } = sources;
  const planned: PlannedManifest[] = [];
  const visited = new Set<string>();
  /** Those of `visited` whose bytes are neither in the bundle nor held (platforms left out). */
  const absent = new Set<string>();
  const blobsChecked = new Set<string>();
  const repoId = (repo: RepositoryKey) => `${repo.upstream}/${repo.repository}`;

  /** The manifest's bytes: from the bundle, or as this repository holds it; else undefined. */
  const manifestBytes = async (repo: RepositoryKey, digest: Digest, where: string) => {
    const size = inBundle.get(digest);
    if (size !== undefined) {
      if (size > MANIFEST_LIMIT)
        throw new BundleError(
          `${file}: manifest ${digest} of ${where} is larger than the ${MANIFEST_LIMIT} bytes allowed`,
        );
      return sources.bundled(digest);
    }
    if (!(await runtime.repositories.getManifest(repo, digest))) return undefined;
    const opened = await runtime.blobs.open(digest);
    return opened.found
      ? readAll(opened.stream, MANIFEST_LIMIT, `${file}: manifest ${digest}`)
      : undefined;
  };

  /** In the bundle, or held by the repository already, at the size the descriptor says. */
  const checkBlob = async (repo: RepositoryKey, d: Descriptor, where: string) => {
    const key = `${repoId(repo)}@${d.digest}`;
    if (blobsChecked.has(key)) return;
    let size = inBundle.get(d.digest);
    if (size === undefined && (await runtime.repositories.hasBlob(repo, d.digest))) {
      const stat = await runtime.blobs.stat(d.digest);
      if (stat.found) size = stat.descriptor.size;
    }
    if (size === undefined)
      throw new BundleError(
        `${file}: blob ${d.digest} of ${where} is missing: the bundle is truncated or incomplete`,
      );
    if (size !== d.size)
      throw new BundleError(
        `${file}: blob ${d.digest} of ${where} is ${size} bytes, not the ${d.size} its manifest says`,
      );
    blobsChecked.add(key);
  };

  const visit = async (
    image: IndexEntry,
    repo: RepositoryKey,
    descriptor: { digest: Digest; mediaType: string; size: number },
    depth: number,
  ): Promise<void> => {
    const { digest } = descriptor;
    const key = `${repoId(repo)}@${digest}`;
    const where = formatLocation(image);
    // Visited before (as another image's child): an image of its own must have its bytes.
    if (visited.has(key)) {
      if (depth === 0 && absent.has(key))
        throw new BundleError(
          `${file}: manifest ${digest} of ${where} is missing: the bundle is truncated or incomplete`,
        );
      return;
    }
    if (depth > MAX_DEPTH)
      throw new BundleError(
        `${file}: ${where}: its indexes nest more than ${MAX_DEPTH} deep (at ${digest})`,
      );
    if (visited.size >= MAX_MANIFESTS)
      throw new BundleError(`${file}: it names more than ${MAX_MANIFESTS} manifests`);
    visited.add(key);
    sources.checkAborted();
    const bytes = await manifestBytes(repo, digest, where);
    if (!bytes) {
      if (depth === 0)
        throw new BundleError(
          `${file}: manifest ${digest} of ${where} is missing: the bundle is truncated or incomplete`,
        );
      absent.add(key);
      return; // a platform that was never pulled; fetched when asked for, if ever online
    }
    // An index's own size of 0 is a bundle from a tool that leaves it out.
    if (descriptor.size > 0 && bytes.length !== descriptor.size)
      throw new BundleError(
        `${file}: manifest ${digest} of ${where} is ${bytes.length} bytes, not the ${descriptor.size} named for it`,
      );
    const parsed = parseManifest(bytes, descriptor.mediaType);
    const needed = parsed.kind === 'index' ? [] : [parsed.config, ...parsed.layers];
    for (const d of needed) await checkBlob(repo, d, where);
    // Children first: an index is made visible once every manifest it names is (a pull that
    // gets the index finds its platforms).
    if (parsed.kind === 'index')
      for (const child of parsed.manifests)
        await visit(
          image,
          repo,
          { digest: child.digest, mediaType: child.mediaType ?? '', size: child.size },
          depth + 1,
        );
    planned.push({
      repo,
      digest,
      mediaType: parsed.mediaType,
      blobs: [...new Set(needed.map((d) => d.digest))],
    });
  };

  for (const image of images) {
    const repo = { upstream: image.upstream, repository: image.repository };
    await visit(image, repo, image, 0);
  }
  return planned;
}
