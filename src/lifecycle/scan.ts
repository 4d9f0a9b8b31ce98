/**
 * Builds the image graph from storage: every blob with its size and last-pulled time, then every
 * repository's manifests (parsed for what they reference), layer links and tags. It runs in the
 * background after the server listens: serving never waits for it, eviction does.
 */
import type { Logger } from '../log/logger.js';
import type { Digest } from '../oci/digest.js';
import { parseManifest, type ParsedManifest } from '../oci/manifest.js';
import { isTag } from '../oci/reference.js';
import type { BlobStore, RepositoryKey, RepositoryStore } from '../storage/types.js';
import type { ImageGraph } from './image-graph.js';

/** Manifests read at once during the scan. */
const MANIFEST_BATCH = 32;

/** What a manifest references, for the graph: child manifests of an index, else config and layers. */
function manifestReferences(manifest: ParsedManifest): {
  children: Digest[];
  blobs: Digest[];
} {
  return manifest.kind === 'index'
    ? { children: manifest.manifests.map((d) => d.digest), blobs: [] }
    : { children: [], blobs: [manifest.config.digest, ...manifest.layers.map((d) => d.digest)] };
}

/** Reads a stored manifest's references; undefined when its bytes are missing or unreadable. */
export async function readReferences(
  blobs: BlobStore,
  digest: Digest,
): Promise<{ children: Digest[]; blobs: Digest[] } | undefined> {
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
}): Promise<{ blobs: number; manifests: number; repositories: number }> {
  const { graph, blobs, repositories } = deps;
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
  return { blobs: blobCount, manifests: manifestCount, repositories: repositoryCount };
}
