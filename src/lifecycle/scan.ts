/**
 * Builds the image graph from storage: every blob with its size and last-pulled time, then every
 * repository's manifests (parsed for what they reference), layer links and tags. It runs in the
 * background after the server listens: serving never waits for it, eviction does.
 */
import { createHash } from 'node:crypto';
import type { Logger } from '../log/logger.js';
import type { Digest } from '../oci/digest.js';
import { parseManifest, type ParsedManifest } from '../oci/manifest.js';
import { isTag } from '../oci/reference.js';
import type { BlobStore, RepositoryKey, RepositoryStore } from '../storage/types.js';
import type { ImageGraph } from './image-graph.js';

/** Manifests read at once during the scan. */
const MANIFEST_BATCH = 32;

/**
 * What a manifest references, for the graph: child manifests of an index, else config and layers
 * (and the sizes the manifest gives them).
 */
export interface References {
  children: Digest[];
  blobs: Digest[];
  /** The size of each of `blobs`, as the manifest's descriptors give it. */
  sizes?: Map<Digest, number>;
}

function manifestReferences(manifest: ParsedManifest): References {
  if (manifest.kind === 'index')
    return { children: manifest.manifests.map((d) => d.digest), blobs: [] };
  const descriptors = [manifest.config, ...manifest.layers];
  return {
    children: [],
    blobs: descriptors.map((d) => d.digest),
    sizes: new Map(descriptors.map((d) => [d.digest, d.size])),
  };
}

/** Reads a stored manifest's references; undefined when its bytes are missing or unreadable. */
export async function readReferences(
  blobs: BlobStore,
  digest: Digest,
): Promise<References | undefined> {
  const opened = await blobs.open(digest);
  if (!opened.found) return undefined;
  const chunks: Buffer[] = [];
  for await (const chunk of opened.stream) chunks.push(chunk as Buffer);
  try {
    return manifestReferences(parseManifest(Buffer.concat(chunks)));
  } catch {
    return undefined;
  }
}

export async function scanStorage(deps: {
  graph: ImageGraph;
  blobs: BlobStore;
  repositories: RepositoryStore;
  upstreams: string[];
  log: Logger;
  /** A torn blob was removed (see `removeTorn`). */
  removed?: (digest: Digest) => void;
  /**
   * Blobs hashed whole although a manifest gives them another size: not hashed again (a count
   * runs at each sweep). Kept by the caller across counts.
   */
  whole?: Set<Digest>;
}): Promise<{ blobs: number; manifests: number; repositories: number }> {
  const { graph, blobs, repositories } = deps;
  /** The size each manifest read gives its blobs: a stored blob of another size may be torn. */
  const expected = new Map<Digest, number>();
  let blobCount = 0;
  for await (const blob of blobs.list()) {
    graph.addBlob(blob.digest, blob.size, blob.pulledAt);
    blobCount++;
  }
  let manifestCount = 0;
  let repositoryCount = 0;
  for (const upstream of deps.upstreams) {
    for (const repository of await repositories.listRepositories(upstream)) {
      const repo = { upstream, repository } as RepositoryKey;
      repositoryCount++;
      for (const digest of await repositories.listBlobLinks(repo)) graph.linkBlob(repo, digest);
      const manifests = await repositories.listManifests(repo);
      for (let i = 0; i < manifests.length; i += MANIFEST_BATCH) {
        await Promise.all(
          manifests.slice(i, i + MANIFEST_BATCH).map(async ({ digest, pulledAt }) => {
            // A link whose bytes are gone (a crash mid-removal) holds nothing: the sweep drops it.
            const references = (await readReferences(blobs, digest)) ?? { children: [], blobs: [] };
            for (const [blob, size] of references.sizes ?? []) expected.set(blob, size);
            graph.addManifest(repo, digest, references, pulledAt);
            manifestCount++;
          }),
        );
      }
      for (const tag of await repositories.listTags(repo)) {
        if (!isTag(tag)) continue;
        const link = await repositories.getTag(repo, tag);
        if (link) graph.setTag(repo, tag, link.digest);
      }
    }
  }
  for (const [digest, size] of expected) {
    const stored = graph.blobs.get(digest);
    if (!stored || stored.size === size || deps.whole?.has(digest)) continue;
    if (await removeTorn(blobs, digest, size, deps.log)) {
      graph.removeBlob(digest);
      deps.removed?.(digest);
      blobCount--;
    } else deps.whole?.add(digest);
  }
  return { blobs: blobCount, manifests: manifestCount, repositories: repositoryCount };
}

/**
 * A stored blob of another size than a manifest gives it: a power loss can leave a blob's file
 * short at its name (the filesystem driver does not flush blob data; docs/design.md), and every
 * pull would get it. It is read and hashed (a manifest may also give a wrong size for a good
 * blob: that one is kept), and removed when its bytes are not its digest's and its size is still
 * the wrong one (not replaced meanwhile by a fetch that found it torn). True when removed.
 */
async function removeTorn(
  blobs: BlobStore,
  digest: Digest,
  size: number,
  log: Logger,
): Promise<boolean> {
  const opened = await blobs.open(digest);
  if (!opened.found) return false;
  const hash = createHash('sha256');
  for await (const chunk of opened.stream) hash.update(chunk as Buffer);
  if (`sha256:${hash.digest('hex')}` === digest) return false;
  const now = await blobs.stat(digest);
  if (!now.found || now.descriptor.size === size) return false;
  await blobs.remove(digest);
  log.warn(
    { digest, bytes: opened.descriptor.size, manifestSays: size },
    'a stored blob does not match its digest (torn by a crash?): removed',
  );
  return true;
}
