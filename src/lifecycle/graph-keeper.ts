/**
 * The image graph kept in step with storage: counted from storage at start and afresh on a
 * recount (while serving goes on: what changes meanwhile is applied to the fresh graph too), told
 * what this process stores (tracking.ts's hooks) and removes, and what the other processes on the
 * same storage say they stored or removed (fleet/forget.ts). What this process stores or removes
 * is told to them in turn (`onStored`, `onRemoved`).
 */
import type { Logger } from '../log/logger.js';
import type { BlobStore, RepositoryStore } from '../storage/types.js';
import { ImageGraph } from './image-graph.js';
import { readReferences, scanStorage } from './scan.js';
import type { RemovedEvent, StoredEvent } from './types.js';

export interface GraphKeeperDeps {
  blobs: BlobStore;
  repositories: RepositoryStore;
  /** The upstreams this process caches: what another says of any other is none of its business. */
  upstreams: string[];
  log: Logger;
  now: () => number;
  /** A blob joined the graph: the budget checks. */
  added: () => void;
  /** Told what this process stored, for the other processes on the storage. */
  onStored?: ((event: StoredEvent) => void) | undefined;
  /** Told what this process removed (removal.ts tells its own), for the others. */
  onRemoved?: ((event: RemovedEvent) => void) | undefined;
}

export class GraphKeeper {
  private current = new ImageGraph();
  /** While a recount builds a fresh graph: the changes to apply to it as well. */
  private replay: ((graph: ImageGraph) => unknown)[] | undefined;

  constructor(private readonly d: GraphKeeperDeps) {}

  /** The graph as it stands (a recount replaces it). */
  get graph(): ImageGraph {
    return this.current;
  }

  /** Counts storage into the graph: the start-up scan. */
  scan(): ReturnType<typeof scanStorage> {
    return scanStorage({ ...this.storage(), graph: this.current });
  }

  /** Builds a fresh graph from storage while serving goes on, then puts it in place. */
  async recount(): Promise<void> {
    const fresh = new ImageGraph();
    this.replay = [];
    try {
      await scanStorage({ ...this.storage(), graph: fresh });
      for (const apply of this.replay) apply(fresh);
      this.current = fresh;
    } finally {
      this.replay = undefined;
    }
  }

  private storage() {
    const { blobs, repositories, upstreams, log } = this.d;
    return { blobs, repositories, upstreams, log };
  }

  /** Applies a change to the graph, and to the one a recount is building; returns the graph. */
  change(apply: (graph: ImageGraph) => unknown): ImageGraph {
    apply(this.current);
    this.replay?.push(apply);
    return this.current;
  }

  /**
   * This process stored something (a blob committed, a link, a manifest, a tag): counted, then
   * told to the others. A manifest is read from storage for what it references.
   */
  async stored(event: StoredEvent): Promise<void> {
    await this.count(event);
    this.d.onStored?.(event);
  }

  /** This process removed a tag (the tag service, upstream's word): it leaves the graph. */
  tagDeleted(event: Extract<RemovedEvent, { kind: 'tag' }>): void {
    this.change((g) => g.drop(event));
    this.d.onRemoved?.(event);
  }

  /** Another process on this storage stored something: counted here too, and told to nobody. */
  async storedElsewhere(event: StoredEvent): Promise<void> {
    if (this.othersBusiness(event)) return;
    await this.count(event);
  }

  /**
   * Another process on this storage removed something: it leaves this graph too, once storage
   * agrees. Storage decides, not the order of messages: what was stored again since (here or by
   * a third process) stays.
   */
  async removedElsewhere(event: RemovedEvent): Promise<void> {
    if (this.othersBusiness(event) || (await this.stillStored(event))) return;
    this.change((g) => {
      g.drop(event);
      if (event.kind !== 'blob') g.pruneRepository(event.repo);
    });
  }

  /** An upstream this process does not cache (another config) is none of its business. */
  private othersBusiness(event: StoredEvent | RemovedEvent): boolean {
    return event.kind !== 'blob' && !this.d.upstreams.includes(event.repo.upstream);
  }

  /** Runs synchronously to its end but for a manifest, whose references are read first. */
  private async count(event: StoredEvent): Promise<void> {
    const at = this.d.now();
    switch (event.kind) {
      case 'blob':
        this.change((g) => g.addBlob(event.digest, event.size, at));
        this.d.added();
        return;
      case 'link':
        this.change((g) => g.linkBlob(event.repo, event.digest));
        return;
      case 'manifest': {
        const references = (await readReferences(this.d.blobs, event.digest)) ?? {
          children: [],
          blobs: [],
        };
        this.change((g) => g.addManifest(event.repo, event.digest, references, at));
        return;
      }
      case 'tag':
        this.change((g) => g.setTag(event.repo, event.tag, event.digest));
        return;
    }
  }

  private async stillStored(event: RemovedEvent): Promise<boolean> {
    const { blobs, repositories } = this.d;
    switch (event.kind) {
      case 'blob':
        return (await blobs.stat(event.digest)).found;
      case 'link':
        return repositories.hasBlob(event.repo, event.digest);
      case 'manifest':
        return (await repositories.getManifest(event.repo, event.digest)) !== undefined;
      case 'tag':
        return (await repositories.getTag(event.repo, event.tag)) !== undefined;
    }
  }
}
