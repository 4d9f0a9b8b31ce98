/**
 * Builds the image graph from storage: every blob with its size and last-pulled time, then every
 * repository's manifests (parsed for what they reference), layer links and tags. It runs in the
 * background after the server listens: serving never waits for it, eviction does. It reads no
 * blob but manifests: a blob stored with another size than a manifest gives it (torn by a power
 * loss?) is only named, for the owner to hash after the count (torn.ts).
 */
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

/**
 * A stored blob of another size than a manifest gives it: torn by a power loss, or the manifest is
 * wrong (torn.ts tells which).
 */
export interface Suspect {
  digest: Digest;
  /** Its size in storage at the count. */
  size: number;
  /** The size a manifest gives it. */
  expected: number;
}

/** What a count found: how many of each, and the blobs that may be torn (`Suspect`). */
export interface Counted {
  blobs: number;
  manifests: number;
  repositories: number;
  suspects: Suspect[];
}

export async function scanStorage(deps: {
  graph: ImageGraph;
  blobs: BlobStore;
  repositories: RepositoryStore;
  upstreams: string[];
  log: Logger;
}): Promise<Counted> {
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
  const suspects: Suspect[] = [];
  for (const [digest, size] of expected) {
    const stored = graph.blobs.get(digest);
    if (stored && stored.size !== size)
      suspects.push({ digest, size: stored.size, expected: size });
  }
  return {
    blobs: blobCount,
    manifests: manifestCount,
    repositories: repositoryCount,
    suspects,
  };
}
