/**
 * The image graph kept in step with storage: counted from storage at start and afresh on a
 * recount (while serving goes on: what changes meanwhile is applied to the fresh graph too), told
 * what this process stores (tracking.ts's hooks) and removes, and what the other processes on the
 * same storage say they stored or removed (fleet/forget.ts). What this process stores or removes
 * is told to them in turn (`onStored`, `onRemoved`).
 *
 * What another process says is not applied as said: messages from several processes (and ones
 * sent again) arrive in no set order, so each names a thing (a blob, a link, a manifest of a
 * repository, a tag) whose state is read from storage, and the graph takes that state. One read
 * at a time per thing; a change this process makes to the thing while it is read (it stored or
 * removed the thing itself, and knows better) wins over what the read found.
 */
import type { Digest } from '../oci/digest.js';
import type { Logger } from '../log/logger.js';
import type { BlobStore, RepositoryStore } from '../storage/types.js';
import { ImageGraph } from './image-graph.js';
import {
  readReferences,
  scanStorage,
  UNREAD,
  type Counted,
  type KnownManifests,
  type References,
  type Suspect,
} from './scan.js';
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
  /** Told, once a count's graph is in place, the blobs it found that may be torn (torn.ts). */
  suspects?: (found: Suspect[]) => void;
  /** The fewest entries of the sizes the manifests give their blobs that are pruned (tests). */
  expectedPruneMin?: number;
}

/** `expected` is pruned no sooner than at this many entries (about 150 bytes each). */
const EXPECTED_PRUNE_MIN = 10_000;

/** A thing of the graph, as an event names it. */
export type Thing = StoredEvent | RemovedEvent;

/** Which thing an event is about, whatever was done to it. */
function thingOf(event: Thing): string {
  const where = 'repo' in event ? ` ${event.repo.upstream}/${event.repo.repository}` : '';
  return `${event.kind}${where} ${event.kind === 'tag' ? event.tag : event.digest}`;
}

export class GraphKeeper {
  private current = new ImageGraph();
  /**
   * The size the manifests in the graph give each blob they reference: from the last count
   * (scan.ts), and from each manifest read since, for the next count, which reads none of them
   * again (the torn-blob check compares these with the blobs' stored sizes).
   */
  private expected = new Map<Digest, number>();
  /** The fewest entries `expected` is pruned at (`expectedPruneMin`, else EXPECTED_PRUNE_MIN). */
  private readonly pruneMin: number;
  /** Past this many entries, `expected` drops the blobs no manifest of the graph holds. */
  private pruneExpectedAt: number;
  /** While a recount runs: the sizes of the manifests read meanwhile, for the count's map. */
  private expectedMeanwhile: Map<Digest, number> | undefined;
  /** While a recount builds a fresh graph: the changes to apply to it as well. */
  private replay: ((graph: ImageGraph) => unknown)[] | undefined;
  /** Per thing, the last read of it from storage queued (the next one waits for it). */
  private readonly queues = new Map<string, Promise<void>>();
  /** Per thing, the reads under way; a change made here marks them out of date. */
  private readonly reading = new Map<string, Set<{ outdated: boolean }>>();

  constructor(private readonly d: GraphKeeperDeps) {
    this.pruneMin = d.expectedPruneMin ?? EXPECTED_PRUNE_MIN;
    this.pruneExpectedAt = this.pruneMin;
  }

  /** The graph as it stands (a recount replaces it). */
  get graph(): ImageGraph {
    return this.current;
  }

  /**
   * Builds a graph from storage while serving goes on, then puts it in place (the start-up scan
   * and every recount): what changes meanwhile is applied to it as well.
   */
  async recount(): Promise<Omit<Counted, 'suspects' | 'expected'>> {
    const fresh = new ImageGraph();
    this.replay = [];
    const meanwhile = new Map<Digest, number>();
    this.expectedMeanwhile = meanwhile;
    let counted: Counted;
    try {
      const { blobs, repositories, upstreams, log } = this.d;
      counted = await scanStorage({
        graph: fresh,
        blobs,
        repositories,
        upstreams,
        log,
        known: knownManifests(this.current),
        knownSizes: this.expected,
      });
      for (const apply of this.replay) apply(fresh);
      this.current = fresh;
    } finally {
      this.replay = undefined;
      this.expectedMeanwhile = undefined;
    }
    const { suspects, expected, ...counts } = counted;
    for (const [digest, size] of meanwhile) expected.set(digest, size);
    this.expected = expected;
    this.pruneExpectedAt = Math.max(this.pruneMin, 2 * expected.size);
    this.d.suspects?.(suspects);
    return counts;
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
    this.changedHere(event);
    const references =
      event.kind === 'manifest' ? await readReferences(this.d.blobs, event.digest) : undefined;
    this.count(counting(event, this.d.now(), references));
    this.d.onStored?.(event);
  }

  /** Applies a change; one that may have added a blob has the budget check. */
  private count(change: Change): void {
    this.change(change.apply);
    // Noted with the manifest's arrival in the graph, not before: a prune in between would drop
    // sizes no manifest of the graph held yet, for good (a recount reads that manifest no more).
    for (const [digest, size] of change.sizes ?? []) {
      this.expected.set(digest, size);
      this.expectedMeanwhile?.set(digest, size);
    }
    if (this.expected.size > this.pruneExpectedAt) this.pruneExpected();
    if (change.blob) this.d.added();
  }

  /** This process removed a tag (the tag service, upstream's word): it leaves the graph. */
  tagDeleted(event: Extract<RemovedEvent, { kind: 'tag' }>): void {
    this.changedHere(event);
    this.change((g) => g.drop(event));
    this.d.onRemoved?.(event);
  }

  /**
   * This process changed the thing in storage: what a read of it under way found is out of date.
   */
  changedHere(event: Thing): void {
    for (const read of this.reading.get(thingOf(event)) ?? []) read.outdated = true;
  }

  /**
   * This process removed the thing from storage (removal.ts, which drops it from the graph as it
   * stands): out of date as `changedHere` says, and dropped from a graph a recount is building too
   * (a torn blob's removal runs outside the lifecycle's chain of work, beside a recount).
   */
  removedHere(event: RemovedEvent): void {
    this.changedHere(event);
    this.replay?.push((g) => g.drop(event));
  }

  /**
   * Another process on this storage stored or removed a thing: the graph takes what storage holds
   * of it (whichever the message said).
   */
  changedElsewhere(event: Thing): Promise<void> {
    // An upstream this process does not cache (another config) is none of its business.
    if (event.kind !== 'blob' && !this.d.upstreams.includes(event.repo.upstream))
      return Promise.resolve();
    const thing = thingOf(event);
    const run = (this.queues.get(thing) ?? Promise.resolve()).then(async () => {
      const read = { outdated: false };
      const reads = this.reading.get(thing) ?? new Set();
      this.reading.set(thing, reads.add(read));
      try {
        const change = await this.inStorage(event);
        if (!read.outdated) this.count(change);
      } finally {
        reads.delete(read);
        if (reads.size === 0) this.reading.delete(thing);
      }
    });
    const settled = run.catch(() => {});
    this.queues.set(thing, settled);
    void settled.then(() => {
      if (this.queues.get(thing) === settled) this.queues.delete(thing);
    });
    return run;
  }

  /**
   * Drops from `expected` the blobs that no manifest of the graph holds any more: eviction and
   * removal leave their entries, and a process that does not sweep (a worker or replica that is
   * not the owner) counts afresh only when it may have missed news, so without this the map grew
   * with every manifest ever stored (a client that may pull chooses how many).
   */
  private pruneExpected(): void {
    for (const digest of this.expected.keys())
      if (this.current.refs(digest) === 0) this.expected.delete(digest);
    this.pruneExpectedAt = Math.max(this.pruneMin, 2 * this.expected.size);
  }

  /** What storage holds of the thing now, as the change that gives the graph the same. */
  private async inStorage(event: Thing): Promise<Change> {
    const { blobs, repositories } = this.d;
    const at = this.d.now();
    switch (event.kind) {
      case 'blob': {
        const { digest } = event;
        const stat = await blobs.stat(digest);
        if (!stat.found) return { apply: (g) => g.drop({ kind: 'blob', digest }) };
        return counting({ kind: 'blob', digest, size: stat.descriptor.size }, at);
      }
      case 'link': {
        const { kind, repo, digest } = event;
        if (await repositories.hasBlob(repo, digest)) return counting({ kind, repo, digest }, at);
        return gone({ kind, repo, digest });
      }
      case 'manifest': {
        const { kind, repo, digest } = event;
        if (!(await repositories.getManifest(repo, digest))) return gone({ kind, repo, digest });
        return counting({ kind, repo, digest }, at, await readReferences(blobs, digest));
      }
      case 'tag': {
        const { kind, repo, tag } = event;
        const link = await repositories.getTag(repo, tag);
        if (!link) return gone({ kind, repo, tag });
        return counting({ kind, repo, tag, digest: link.digest }, at);
      }
    }
  }
}

/**
 * A change to the graph; `blob` when it may add a blob (the budget then checks); `sizes`, those a
 * manifest it adds gives its blobs (`expected`).
 */
interface Change {
  apply: (graph: ImageGraph) => void;
  blob?: boolean;
  sizes?: ReadonlyMap<Digest, number> | undefined;
}

/** The manifests of `graph` whose bytes were read, with their bytes' size, for a recount. */
function knownManifests(graph: ImageGraph): KnownManifests {
  const known = new Map<Digest, { size: number; references: References }>();
  for (const node of graph.repositories.values())
    for (const manifest of node.manifests.values()) {
      const size = graph.blobs.get(manifest.digest)?.size;
      if (manifest.unread || size === undefined || known.has(manifest.digest)) continue;
      known.set(manifest.digest, { size, references: manifest });
    }
  return known;
}

/**
 * How a stored thing is counted in the graph (a manifest with what it references: nothing known
 * when its bytes are not in storage).
 */
function counting(event: StoredEvent, at: number, references: References = UNREAD): Change {
  switch (event.kind) {
    case 'blob':
      return { apply: (g) => g.addBlob(event.digest, event.size, at), blob: true };
    case 'link':
      return { apply: (g) => g.linkBlob(event.repo, event.digest) };
    case 'manifest':
      return {
        apply: (g) => g.addManifest(event.repo, event.digest, references, at),
        sizes: references.sizes,
      };
    case 'tag':
      return { apply: (g) => g.setTag(event.repo, event.tag, event.digest) };
  }
}

/** Drops a thing of a repository, and the repository when it then holds nothing. */
function gone(event: Exclude<RemovedEvent, { kind: 'blob' }>): Change {
  return {
    apply: (g) => {
      g.drop(event);
      g.pruneRepository(event.repo);
    },
  };
}
