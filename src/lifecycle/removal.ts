/**
 * Removing content from storage in the one order that leaves a consistent cache at every step,
 * so that a process killed at any moment leaves nothing the cache would answer for in part:
 *
 *   1. the image's tags          (no tag ever points at a missing manifest)
 *   2. its manifest links, root first (a child left behind is an image of its own, whole)
 *   3. the repository's layer links to blobs none of its kept manifests holds
 *   4. blob data no manifest holds and no repository links (never a blob a kept manifest had)
 *
 * What a crash leaves between those steps is whole images and unlinked blobs, which the next
 * collection (`collect`, below) removes. Every metadata cache in front of storage forgets each entry before
 * and after it leaves storage: a request in between can only fill a cache from what is still
 * there, and the second pass removes that too.
 */
import type { MetadataCache } from '../metadata/types.js';
import type { Digest } from '../oci/digest.js';
import type { BlobStore, RepositoryKey, RepositoryStore } from '../storage/types.js';
import { repositoryId, type Image, type ImageGraph, type RepositoryNode } from './image-graph.js';
import type { RemovalReport, RemovedEvent } from './types.js';

/** What lives in memory in front of storage besides the metadata cache (the manifest LRU). */
export interface ManifestMemory {
  forget(repo: RepositoryKey, digest: Digest): void;
  /** Drops every manifest held in memory (storage changed beneath it: `changedBeside`). */
  forgetAll?(): void;
}

export interface RemovalDeps {
  /** The graph as it stands (a rescan replaces it). */
  graph: () => ImageGraph;
  blobs: BlobStore;
  repositories: RepositoryStore;
  cache: MetadataCache;
  manifestMemory: ManifestMemory;
  /** True while a blob is being served or fetched: it stays. */
  inUse: (digest: Digest) => boolean;
  /**
   * A blob's last pull as storage has it now (its modification time; undefined when it is not
   * stored): read again before an unlinked blob is collected.
   */
  lastPulled?: (digest: Digest) => Promise<number | undefined>;
  /** Told what left storage, for the other processes on it (`GraphKeeper.changedElsewhere`). */
  onRemoved?: (event: RemovedEvent) => void;
}

export class Removal {
  /** Blobs whose data is being removed now. */
  private readonly removing = new Set<Digest>();

  constructor(private readonly d: RemovalDeps) {}

  /** Removes an image and what only it held; resolves to the bytes that left storage. */
  async removeImage(node: RepositoryNode, image: Image): Promise<number> {
    const { repositories } = this.d;
    const graph = this.d.graph();
    const repo = node.key;
    const forget = () => this.forgetImage(repo, image);
    await forget();
    // Within a step the removals run at once (a file system answers several at a time); the
    // steps themselves stay in order.
    await Promise.all(
      image.tags.map(async (tag) => {
        await repositories.deleteTag(repo, tag);
        this.dropped(graph, { kind: 'tag', repo, tag });
      }),
    );
    // A child another kept index of the repository also references stays with that one.
    const [root, ...children] = image.manifests.filter((digest) => {
      const manifest = node.manifests.get(digest);
      return manifest && ![...manifest.parents].some((p) => !image.manifests.includes(p));
    });
    const unlink = async (digest: Digest) => {
      await repositories.unlinkManifest(repo, digest);
      this.dropped(graph, { kind: 'manifest', repo, digest });
    };
    // Root first: a child manifest left by a crash is then an image of its own, not a part.
    if (root) await unlink(root);
    await Promise.all(children.map(unlink));
    const freed = await this.dropUnheld(node, image.blobs);
    await forget();
    await this.pruneRepository(repo);
    return freed;
  }

  /** Removes a blob no manifest holds, with every repository's link to it. */
  async removeOrphan(digest: Digest): Promise<number> {
    const { repositories, cache } = this.d;
    const graph = this.d.graph();
    const blob = graph.blobs.get(digest);
    if (!blob || graph.refs(digest) > 0 || this.d.inUse(digest)) return 0;
    for (const id of [...blob.links]) {
      const repo = graph.repositoryKey(id);
      if (!repo) continue;
      await cache.deleteRepositoryDescriptor(repo, digest);
      await repositories.unlinkBlob(repo, digest);
      this.dropped(graph, { kind: 'link', repo, digest });
      await cache.deleteRepositoryDescriptor(repo, digest);
      await this.pruneRepository(repo);
    }
    return (await this.removeData(digest)) ?? 0;
  }

  /**
   * Layer links of the repository to blobs none of its manifests holds any more, then the data
   * of those no manifest and no repository holds.
   */
  private async dropUnheld(node: RepositoryNode, blobs: Digest[]): Promise<number> {
    const { repositories, cache } = this.d;
    const graph = this.d.graph();
    const repo = node.key;
    await Promise.all(
      blobs
        .filter((digest) => !node.blobHolders.has(digest) && node.links.has(digest))
        .map(async (digest) => {
          await cache.deleteRepositoryDescriptor(repo, digest);
          await repositories.unlinkBlob(repo, digest);
          this.dropped(graph, { kind: 'link', repo, digest });
          await cache.deleteRepositoryDescriptor(repo, digest);
        }),
    );
    const freed = await Promise.all(
      blobs
        .filter((digest) => {
          const blob = graph.blobs.get(digest);
          return blob && graph.refs(digest) === 0 && blob.links.size === 0;
        })
        .map(async (digest) => (await this.removeData(digest)) ?? 0),
    );
    return freed.reduce((sum, bytes) => sum + bytes, 0);
  }

  /**
   * A blob's data that the owner found torn (torn.ts: its bytes are not its digest's), removed as
   * any blob's data is (`removeData`). Kept while it is in use, and when storage no longer holds
   * the file that was hashed (`hashedSize` bytes): a fetch that found it torn has replaced it
   * meanwhile with a whole copy. True when removed.
   */
  async removeTorn(digest: Digest, hashedSize: number): Promise<boolean> {
    const sameFile = async () => {
      const now = await this.d.blobs.stat(digest);
      return now.found && now.descriptor.size === hashedSize;
    };
    return (await this.removeData(digest, sameFile)) !== undefined;
  }

  /**
   * Removes a blob's data, unless it is in use, being removed already, or `still` (asked once
   * no other removal of it can start) says otherwise; resolves to its bytes, undefined when kept.
   */
  private async removeData(
    digest: Digest,
    still: () => Promise<boolean> = async () => true,
  ): Promise<number | undefined> {
    const { blobs, cache } = this.d;
    const blob = this.d.graph().blobs.get(digest);
    // Two images removed at once may both find a blob they shared unheld: one removes it.
    if (!blob || this.d.inUse(digest) || this.removing.has(digest)) return undefined;
    this.removing.add(digest);
    // A torn blob keeps its repositories' links (their next pull fetches it again): what is
    // cached of it per repository goes with the data too. Others have no links left here.
    const graph = this.d.graph();
    const linked = [...blob.links].flatMap((id) => graph.repositoryKey(id) ?? []);
    const forget = async () => {
      await cache.deleteDescriptor(digest);
      for (const repo of linked) await cache.deleteRepositoryDescriptor(repo, digest);
    };
    try {
      if (!(await still())) return undefined;
      await forget();
      await blobs.remove(digest);
      // The graph as it stands now: a torn blob's removal runs outside the lifecycle's chain of
      // work, and a recount may have replaced the graph meanwhile (`onRemoved` tells the keeper,
      // for the one a recount is building).
      this.dropped(this.d.graph(), { kind: 'blob', digest });
      await forget();
    } finally {
      this.removing.delete(digest);
    }
    return blob.size;
  }

  /** What left storage leaves the graph, and the other processes on the storage are told. */
  private dropped(graph: ImageGraph, event: RemovedEvent): void {
    graph.drop(event);
    this.d.onRemoved?.(event);
  }

  private async forgetImage(repo: RepositoryKey, image: Image): Promise<void> {
    const { cache, manifestMemory } = this.d;
    for (const tag of image.tags) await cache.deleteTag(repo, tag);
    for (const digest of image.manifests) {
      manifestMemory.forget(repo, digest);
      await cache.deleteManifest(repo, digest);
    }
  }

  /**
   * Whether a blob the graph lacks is in storage all the same, and then it joins the graph. The
   * scan lists blobs before links and tags, and another process (a worker, a replica) may store
   * a blob, then link it, in between: its links and tags are in the graph, its blob is not.
   */
  private async storedSinceScan(graph: ImageGraph, digest: Digest): Promise<boolean> {
    const stat = await this.d.blobs.stat(digest);
    if (!stat.found) return false;
    graph.addBlob(digest, stat.descriptor.size, Date.now());
    return true;
  }

  private async pruneRepository(repo: RepositoryKey): Promise<void> {
    if (this.d.graph().pruneRepository(repo)) await this.d.repositories.prune(repo);
  }

  /**
   * The collection: tags pointing at no manifest, manifest links without their bytes, layer
   * links without their blob, blobs no repository holds (last pulled before `unlinkedBefore`: a
   * younger one may be a fetch between its commit and its link), upload sessions started before
   * `uploadsBefore`. With `dryRun`, only what it would remove.
   */
  async collect(
    dryRun: boolean,
    before: { unlinkedBefore: number; uploadsBefore: Date },
  ): Promise<RemovalReport> {
    const report: RemovalReport = { dryRun, removed: [], bytes: 0, problems: [] };
    const { repositories, cache, manifestMemory, inUse } = this.d;
    const graph = this.d.graph();
    for (const node of [...graph.repositories.values()]) {
      const repo = node.key;
      for (const [tag, digest] of [...node.tags]) {
        if (node.manifests.has(digest)) continue;
        // Linked by another process since the scan listed this repository's manifests: storage,
        // not this graph, says whether the manifest is missing.
        if (await repositories.getManifest(repo, digest)) continue;
        report.removed.push({
          kind: 'image',
          name: `${repositoryId(repo)}:${tag} (tag of a missing manifest)`,
          bytes: 0,
        });
        if (!dryRun) {
          await cache.deleteTag(repo, tag);
          await repositories.deleteTag(repo, tag);
          this.dropped(graph, { kind: 'tag', repo, tag });
        }
      }
      for (const manifest of [...node.manifests.values()]) {
        if (graph.blobs.has(manifest.digest) || inUse(manifest.digest)) continue;
        if (await this.storedSinceScan(graph, manifest.digest)) continue;
        report.removed.push({
          kind: 'image',
          name: `${repositoryId(repo)}@${manifest.digest} (manifest without its bytes)`,
          bytes: 0,
        });
        if (!dryRun) {
          manifestMemory.forget(repo, manifest.digest);
          await cache.deleteManifest(repo, manifest.digest);
          await repositories.unlinkManifest(repo, manifest.digest);
          this.dropped(graph, { kind: 'manifest', repo, digest: manifest.digest });
        }
      }
      for (const digest of [...node.links]) {
        if (graph.blobs.has(digest) || inUse(digest) || dryRun) continue;
        if (await this.storedSinceScan(graph, digest)) continue;
        await cache.deleteRepositoryDescriptor(repo, digest);
        await repositories.unlinkBlob(repo, digest);
        this.dropped(graph, { kind: 'link', repo, digest });
      }
      if (!dryRun) await this.pruneRepository(repo);
    }
    for (const blob of [...graph.orphans()]) {
      if (blob.links.size > 0 || blob.pulledAt >= before.unlinkedBefore || inUse(blob.digest))
        continue;
      // Storage, not this graph, has the last word: another process (an import, a fetch) may
      // have committed or used the blob since the count, and is about to link it.
      const stored = await this.d.lastPulled?.(blob.digest);
      if (stored !== undefined && stored >= before.unlinkedBefore) {
        graph.addBlob(blob.digest, blob.size, stored);
        continue;
      }
      const bytes = dryRun ? blob.size : await this.removeOrphan(blob.digest);
      report.removed.push({ kind: 'blob', name: blob.digest, bytes });
      report.bytes += bytes;
    }
    if (!dryRun) {
      const purged = await this.d.blobs.purgeUploads(before.uploadsBefore);
      if (purged > 0)
        report.removed.push({ kind: 'upload', name: `${purged} upload sessions`, bytes: 0 });
    }
    return report;
  }
}
