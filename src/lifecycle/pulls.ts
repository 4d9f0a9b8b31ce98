/**
 * Last-pulled times: recorded in the graph at once, written to storage every few seconds (never
 * one write per request), and remembered while the start-up scan has not built the graph yet.
 * In storage a last pull is a file's modification time: a manifest's revision link, or the data
 * of a blob no manifest holds (see src/storage/paths.ts).
 */
import type { Digest } from '../oci/digest.js';
import type { BlobStore, RepositoryKey, RepositoryStore } from '../storage/types.js';
import { repositoryId, type ImageGraph } from './image-graph.js';

/** Pulls remembered while the start-up scan runs, at most. */
const PENDING_MAX = 100_000;

export class PullRecorder {
  /** Until the graph is built: pulls to apply once it is. */
  private pending: [RepositoryKey, Digest, number, boolean][] | undefined = [];
  private dirtyManifests = new Map<string, { repo: RepositoryKey; digest: Digest; at: number }>();
  private dirtyBlobs = new Map<Digest, number>();

  constructor(
    private readonly d: {
      /** Applies a change to the graph (and to the one a rescan is building). */
      change: (apply: (graph: ImageGraph) => unknown) => ImageGraph;
      blobs: BlobStore;
      repositories: RepositoryStore;
    },
  ) {}

  /** The graph is built: the pulls seen meanwhile count now. */
  graphReady(): void {
    const pending = this.pending ?? [];
    this.pending = undefined;
    for (const [repo, digest, at, manifest] of pending) this.pulled(repo, digest, at, manifest);
  }

  /**
   * A manifest or blob of a repository was served (hits included). A manifest the graph does not
   * know (another replica stored it since this one's scan) still has its pull written.
   */
  pulled(repo: RepositoryKey, digest: Digest, at: number, manifest = false): void {
    if (this.pending) {
      if (this.pending.length < PENDING_MAX) this.pending.push([repo, digest, at, manifest]);
      return;
    }
    let changed: ReturnType<ImageGraph['markPulled']> | undefined;
    this.d.change((graph) => {
      const result = graph.markPulled(repo, digest, at);
      changed ??= result; // the first graph is the current one; a replay must not overwrite it
    });
    for (const m of changed!.manifests)
      this.dirtyManifests.set(`${repositoryId(repo)}@${m}`, { repo, digest: m, at });
    if (manifest && changed!.manifests.length === 0)
      this.dirtyManifests.set(`${repositoryId(repo)}@${digest}`, { repo, digest, at });
    if (changed!.blob) this.dirtyBlobs.set(digest, at);
  }

  /**
   * Writes the last-pulled times recorded since the last flush. One that fails (storage did not
   * answer) is kept for the next flush, unless a later pull replaced it meanwhile; the first
   * failure is thrown once the others are written.
   */
  async flush(): Promise<void> {
    const manifests = this.dirtyManifests;
    const blobs = this.dirtyBlobs;
    this.dirtyManifests = new Map();
    this.dirtyBlobs = new Map();
    let failure: unknown;
    for (const [key, entry] of manifests) {
      try {
        await this.d.repositories.markManifestPulled(entry.repo, entry.digest, entry.at);
      } catch (err) {
        failure ??= err;
        if ((this.dirtyManifests.get(key)?.at ?? -1) < entry.at)
          this.dirtyManifests.set(key, entry);
      }
    }
    for (const [digest, at] of blobs) {
      try {
        await this.d.blobs.markPulled(digest, at);
      } catch (err) {
        failure ??= err;
        if ((this.dirtyBlobs.get(digest) ?? -1) < at) this.dirtyBlobs.set(digest, at);
      }
    }
    if (failure !== undefined) throw failure;
  }
}
