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
import type {
  BlobStore,
  RepositoryKey,
  RepositoryStore,
  UpstreamRepository,
} from '../storage/types.js';
import type { ImageGraph } from './image-graph.js';

/** Manifests (and tags) of a repository read at once during the scan. */
const MANIFEST_BATCH = 32;

/** Repositories counted at once during the scan. */
const REPOSITORY_CONCURRENCY = 8;

/**
 * What a manifest references, for the graph: child manifests of an index, else config and layers
 * (and the sizes the manifest gives them).
 */
export interface References {
  children: Digest[];
  blobs: Digest[];
  /** The size of each of `blobs`, as the manifest's descriptors give it. */
  sizes?: Map<Digest, number>;
  /** The manifest's bytes were missing or unreadable: nothing is known of what it references. */
  unread?: boolean;
}

/** What a manifest nothing could be read of references: nothing known. */
export const UNREAD: References = { children: [], blobs: [], unread: true };

/**
 * What an earlier count read of each manifest, with the size of its bytes then: a manifest is
 * immutable (its digest is its bytes), so a recount takes it from here instead of reading the
 * bytes again while they are stored with that size (on S3 a GET per manifest per recount).
 */
export type KnownManifests = ReadonlyMap<Digest, { size: number; references: References }>;

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
  /** The size the manifests give each blob they reference, for the next count (`knownSizes`). */
  expected: Map<Digest, number>;
}

/** Runs `each` over `items`, MANIFEST_BATCH at once, a batch after the other. */
async function inBatches<T>(items: readonly T[], each: (item: T) => Promise<void>): Promise<void> {
  for (let i = 0; i < items.length; i += MANIFEST_BATCH)
    await Promise.all(items.slice(i, i + MANIFEST_BATCH).map(each));
}

export async function scanStorage(deps: {
  graph: ImageGraph;
  blobs: BlobStore;
  repositories: RepositoryStore;
  upstreams: string[];
  log: Logger;
  /** What an earlier count of this process read (the graph it replaces). */
  known?: KnownManifests;
  /** That count's `expected`: the sizes the manifests in `known` give their blobs. */
  knownSizes?: ReadonlyMap<Digest, number>;
}): Promise<Counted> {
  const { graph, blobs, repositories, known, knownSizes } = deps;
  /** The size each manifest read gives its blobs: a stored blob of another size may be torn. */
  const expected = new Map<Digest, number>();
  let blobCount = 0;
  for await (const blob of blobs.list()) {
    graph.addBlob(blob.digest, blob.size, blob.pulledAt);
    blobCount++;
  }
  let manifestCount = 0;
  let repositoryCount = 0;
  /**
   * Counts one repository: its layer links, its manifests (read a batch at once), its tags;
   * `listed`: what one listing of its upstream found of them (`listUpstream`).
   */
  const countRepository = async (
    repo: RepositoryKey,
    listed: UpstreamRepository | undefined,
  ): Promise<void> => {
    for (const digest of listed?.blobLinks ?? (await repositories.listBlobLinks(repo)))
      graph.linkBlob(repo, digest);
    const manifests = listed
      ? await repositories.manifestsPulled(repo, listed.manifests)
      : await repositories.listManifests(repo);
    await inBatches(manifests, async ({ digest, pulledAt }) => {
      // Read before, and its bytes still stored as they were: not read again, and the sizes
      // it gives its blobs are the last count's.
      const prior = known?.get(digest);
      let references: References;
      if (prior && graph.blobs.get(digest)?.size === prior.size) {
        references = prior.references;
        for (const blob of references.blobs) {
          const size = knownSizes?.get(blob);
          if (size !== undefined) expected.set(blob, size);
        }
      } else {
        // A link whose bytes are gone (a crash mid-removal) holds nothing: the sweep drops it.
        references = (await readReferences(blobs, digest)) ?? UNREAD;
        for (const [blob, size] of references.sizes ?? []) expected.set(blob, size);
      }
      graph.addManifest(repo, digest, references, pulledAt);
      manifestCount++;
    });
    const tags = (listed?.tags ?? (await repositories.listTags(repo))).filter(isTag);
    await inBatches(tags, async (tag) => {
      const link = await repositories.getTag(repo, tag);
      if (link) graph.setTag(repo, tag, link.digest);
    });
  };
  for (const upstream of deps.upstreams) {
    // One listing of all its keys where the driver can (S3), else a few calls per repository.
    const layout = await repositories.listUpstream?.(upstream);
    const names = layout
      ? [...layout.keys()].sort()
      : await repositories.listRepositories(upstream);
    const queue = names.map((repository) => ({ upstream, repository }) as RepositoryKey);
    repositoryCount += queue.length;
    // Several repositories at once: each is a few listings one after another, which on S3 are
    // round trips of tens of milliseconds. After a failure no other repository is started.
    let failed = false;
    await Promise.all(
      Array.from({ length: Math.min(REPOSITORY_CONCURRENCY, queue.length) }, async () => {
        for (let repo = queue.shift(); repo && !failed; repo = queue.shift()) {
          await countRepository(repo, layout?.get(repo.repository)).catch((err: unknown) => {
            failed = true;
            throw err;
          });
        }
      }),
    );
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
    expected,
  };
}
