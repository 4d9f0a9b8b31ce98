/**
 * The cache's lifecycle: keeps the image graph in step with storage (graph-keeper.ts), records
 * last-pulled times (in memory at once, in storage every few seconds), holds the budget
 * (budget.ts) by evicting the least recently pulled images in the background, runs the retention
 * sweep, the collection and `rm` in the same chain of work (sweep.ts), and answers `ls`, `du`,
 * `pin`, `rm` and `gc`.
 *
 * Never evicted: pinned images, and anything being served or fetched at that moment.
 */
import type { Logger } from '../log/logger.js';
import type { MetadataCache } from '../metadata/types.js';
import type { Metrics } from '../metrics.js';
import type { Digest } from '../oci/digest.js';
import type { BlobStore, RepositoryKey, RepositoryStore, StorageDriver } from '../storage/types.js';
import { Background } from './background.js';
import { Budget } from './budget.js';
import type { ImageGraph } from './image-graph.js';
import { GraphKeeper } from './graph-keeper.js';
import { Evictor, type Entry } from './eviction.js';
import { InUse } from './in-use.js';
import { Ownership } from './owner.js';
import type { Lease } from './lease.js';
import { paths } from '../storage/paths.js';
import { Pins } from './pins.js';
import { PullRecorder } from './pulls.js';
import { graphUsage, imageInfos } from './inventory.js';
import { Removal, type ManifestMemory } from './removal.js';
import { Sweeper } from './sweep.js';
import { TornBlobs } from './torn.js';
import type {
  ImageInfo,
  ImageRef,
  RemovalReport,
  RemovedEvent,
  RetentionConfig,
  StoredEvent,
  Usage,
} from './types.js';

export interface LifecycleDeps {
  retention: RetentionConfig;
  /** Pins from the config (`retention.pins`); `pin` adds others, kept in storage. */
  configPins: ImageRef[];
  driver: StorageDriver;
  blobs: BlobStore;
  repositories: RepositoryStore;
  cache: MetadataCache;
  manifestMemory: ManifestMemory;
  upstreams: string[];
  log: Logger;
  metrics: Metrics;
  /** True while a fetch of the digest is in flight. */
  fetching: (digest: Digest) => boolean;
  /** Upload sessions older than this are collected by `gc` (ms). */
  uploadsPurgeAge: number;
  /**
   * Other processes share this storage: replicas (`cache.store: redis`), or the workers of one
   * host (`server.workers`). An entry another of them pulled since this one's graph says is not
   * evicted. With a `lease`, the lease decides who evicts; without, the owner record does.
   */
  replicas?: { lease?: Lease };
  /** Told what this process stored, for the other processes on the storage (graph-keeper.ts). */
  onStored?: (event: StoredEvent) => void;
  /** Told what this process removed, for the other processes on the storage. */
  onRemoved?: (event: RemovedEvent) => void;
  /**
   * Told that this process found storage full while another owns the budget: the owner makes
   * room (it hears it through `diskFullElsewhere`).
   */
  onFull?: (bytes: number) => void;
  now?: () => number;
}

export class Lifecycle {
  /** The graph, in step with storage: what this process and the others store and remove. */
  readonly keeper: GraphKeeper;
  /** Evictions, sweeps, removals and rescans run one at a time, in this chain. */
  private work: Promise<unknown> = Promise.resolve();
  private readonly log: Logger;
  private readonly now: () => number;
  private readonly removal: Removal;
  private readonly torn: TornBlobs;
  private readonly evictor: Evictor;
  private readonly pins: Pins;
  readonly ownership: Ownership;
  /** The start-up scan, the work on a timer and the counts afresh (background.ts). */
  private readonly background: Background;
  private readonly serving: InUse;
  private readonly pulls: PullRecorder;
  private readonly budget: Budget;
  private readonly sweeper: Sweeper;

  constructor(private readonly d: LifecycleDeps) {
    this.log = d.log.child({ module: 'lifecycle' });
    this.now = d.now ?? Date.now;
    this.serving = new InUse({
      fetching: (digest) => d.fetching(digest),
      // An eviction may have had to leave a blob served no more: it can go now.
      released: () => this.budget.check(),
    });
    this.keeper = new GraphKeeper({
      blobs: d.blobs,
      repositories: d.repositories,
      upstreams: d.upstreams,
      log: this.log,
      now: this.now,
      added: () => this.budget.check(),
      onStored: d.onStored,
      onRemoved: d.onRemoved,
      suspects: (found) => this.torn.found(found),
    });
    this.removal = new Removal({
      graph: () => this.graph,
      blobs: d.blobs,
      repositories: d.repositories,
      cache: d.cache,
      manifestMemory: d.manifestMemory,
      inUse: (digest) => this.inUse(digest),
      lastPulled: async (digest) =>
        (await d.driver.stat(paths.blobData(digest)))?.modTime.getTime(),
      onRemoved: (event) => {
        this.keeper.removedHere(event);
        d.onRemoved?.(event);
      },
    });
    this.torn = new TornBlobs(d.blobs, this.removal, () => this.ownership.isOwner, this.log);
    this.pins = new Pins(d.driver, d.configPins, this.log);
    this.evictor = new Evictor({
      graph: () => this.graph,
      pinned: (node, image) => this.pins.covers(node, image),
      inUse: (digest) => this.inUse(digest),
      removal: this.removal,
      metrics: d.metrics,
      log: this.log,
      ...(d.replicas
        ? {
            pulledElsewhere: (entry) => this.pulledElsewhere(entry),
            beforeChoosing: () => this.freshPins(),
          }
        : {}),
    });
    this.pulls = new PullRecorder({
      change: (apply) => this.keeper.change(apply),
      blobs: d.blobs,
      repositories: d.repositories,
    });
    this.ownership = new Ownership(d.driver, d.replicas?.lease, this.log);
    this.budget = new Budget({
      retention: d.retention,
      driver: d.driver,
      graph: () => this.graph,
      ready: () => this.background.ready,
      isOwner: () => this.ownership.isOwner,
      serially: (work) => this.serially(work),
      evictor: this.evictor,
      log: this.log,
      warn: (err) => this.warn(err),
      now: this.now,
      onFull: d.onFull,
    });
    this.sweeper = new Sweeper({
      retention: d.retention,
      graph: () => this.graph,
      pinned: (node, image) => this.pins.covers(node, image),
      freshPins: () => this.freshPins(),
      inUse: (digest) => this.inUse(digest),
      evictor: this.evictor,
      removal: this.removal,
      metrics: d.metrics,
      uploadsPurgeAge: d.uploadsPurgeAge,
      replicas: Boolean(d.replicas),
      whenReady: () => this.whenReady(),
      isOwner: () => this.ownership.isOwner,
      serially: (work) => this.serially(work),
      rescan: () => this.background.rescan(),
      checkBudget: () => this.budget.check(),
      now: this.now,
    });
    this.background = new Background({
      retention: d.retention,
      keeper: this.keeper,
      pins: this.pins,
      ownership: this.ownership,
      pulls: this.pulls,
      cache: d.cache,
      manifestMemory: d.manifestMemory,
      replicas: Boolean(d.replicas),
      sweep: () => this.sweep(),
      serially: (work) => this.serially(work),
      checkBudget: () => this.budget.check(),
      warn: (err) => this.warn(err),
      log: this.log,
      now: this.now,
    });
    d.metrics.setStorageStatus(() => ({
      bytes: this.background.ready ? this.graph.bytes : undefined,
      limit: d.retention.maxSize,
    }));
  }

  /** The graph as it stands (a recount replaces it). */
  get graph(): ImageGraph {
    return this.keeper.graph;
  }

  get retention(): RetentionConfig {
    return this.d.retention;
  }

  get ready(): boolean {
    return this.background.ready;
  }

  /**
   * Starts the background work: the scan of storage, then (as the owner) the budget and the
   * sweep. `url` is where this process's admin API answers, for the commands.
   */
  start(options: { url?: string; sweep?: boolean } = {}): void {
    if (options.url) this.ownership.setUrl(options.url);
    // Serving: as the owner, it removes the torn blobs its counts find (a command never does).
    this.torn.enable();
    this.background.start(options.sweep !== false);
  }

  /** Resolves once the start-up scan is done; rejects when it failed (background.ts). */
  whenReady(): Promise<void> {
    return this.background.whenReady();
  }

  /** Resolves once the scan is done and the budget holds as far as eviction can make it. */
  async settle(): Promise<void> {
    await this.whenReady();
    await this.torn.idle();
    await this.budget.settle();
    await this.work;
  }

  async close(): Promise<void> {
    this.background.stop();
    await this.torn.close();
    await this.budget.close();
    await this.flush().catch((err: unknown) => this.warn(err));
    await this.ownership.release().catch(() => {});
  }

  /**
   * Whether another replica pulled an entry since this graph says (it may be streaming it now),
   * by the last-pulled time in storage, where every replica writes its own within
   * FLUSH_INTERVAL_MS; the graph learns the newer time, so a later eviction judges it by that.
   */
  private async pulledElsewhere(entry: Entry): Promise<boolean> {
    const path =
      entry.kind === 'image'
        ? paths.manifestRevisionLink(entry.node.key, entry.image.digest)
        : paths.blobData(entry.digest);
    const at = (await this.d.driver.stat(path))?.modTime.getTime();
    if (at === undefined || at <= entry.pulledAt) return false;
    if (entry.kind === 'image')
      this.keeper.change((g) => g.markPulled(entry.node.key, entry.image.digest, at));
    return true;
  }

  /** Runs lifecycle work after the work before it: never two evictions at once. */
  private serially<T>(work: () => Promise<T>): Promise<T> {
    const run = this.work.then(work);
    this.work = run.catch(() => {});
    return run;
  }

  // ---- serving tells the lifecycle what happens (storage tells the keeper) -----------------

  /** A manifest or blob of a repository was served (hits included). */
  pulled(
    repo: RepositoryKey,
    digest: Digest,
    options: { at?: number; manifest?: boolean } = {},
  ): void {
    this.pulls.pulled(repo, digest, options.at ?? this.now(), options.manifest ?? false);
  }

  /** A blob is being served: it is not evicted until the returned function is called. */
  serve(digest: Digest): () => void {
    return this.serving.serve(digest);
  }

  /** True while the blob is being served or fetched (in-use.ts). */
  inUse(digest: Digest): boolean {
    return this.serving.has(digest);
  }

  /**
   * False for a blob larger than the whole budget: it is streamed to its clients and not kept
   * (logged once per digest).
   */
  accepts(digest: Digest, size: number | undefined): boolean {
    return this.budget.accepts(digest, size);
  }

  /** Storage ran out of space: evict at least `bytes` more than the budget asks. */
  reserve(bytes: number): () => void {
    return this.budget.reserve(bytes);
  }

  /** Storage ran out of space (budget.ts: the owner evicts, another process tells it). */
  diskFull(bytes: number): void {
    this.budget.diskFull(bytes);
  }

  /** Another process on the storage found it full (`onFull` there): the owner makes room. */
  diskFullElsewhere(bytes: number): void {
    if (this.ownership.isOwner) this.budget.diskFull(bytes);
  }

  /** Writes the last-pulled times recorded since the last flush. */
  flush(): Promise<void> {
    return this.pulls.flush();
  }

  // ---- the sweep: retention and collection (sweep.ts) -------------------------------------

  /** The sweep, now (sweep.ts): `unusedFor`, then the collection, on the owner only. */
  sweep(): Promise<RemovalReport> {
    return this.sweeper.sweep();
  }

  /** Counts storage afresh, then holds the budget (background.ts). */
  recount(): Promise<void> {
    return this.background.recount();
  }

  /** Content was added beside this process: caches cleared, storage counted (background.ts). */
  changedBeside(): Promise<void> {
    return this.background.changedBeside();
  }

  /** `pullcache gc` (sweep.ts). */
  gc(dryRun: boolean): Promise<RemovalReport> {
    return this.sweeper.gc(dryRun);
  }

  // ---- what the commands and the admin API ask -------------------------------------------

  async images(): Promise<ImageInfo[]> {
    await this.whenReady();
    await this.freshPins();
    return imageInfos(this.graph, (node, image) => this.pins.covers(node, image));
  }

  async usage(): Promise<Usage> {
    const space = await this.d.driver.space().catch(() => undefined);
    return {
      ...graphUsage(this.graph),
      maxSize: this.d.retention.maxSize,
      minFree: this.d.retention.minFree,
      free: space ? space.free : null,
      evictedBytes: this.evictor.evictedBytes,
      ready: this.background.ready,
    };
  }

  async pinned(): Promise<string[]> {
    return (await this.pinnedRefs()).map((pin) => pin.reference);
  }

  /** The pins in force, each with the upstream and repository it was stored with. */
  async pinnedRefs(): Promise<ImageRef[]> {
    // Asked before the start-up scan read them: read now, not an empty list.
    await this.pins.loaded();
    await this.freshPins();
    return this.pins.all();
  }

  /**
   * Other processes on this storage may have pinned or unpinned through their own admin API:
   * the pins are read again from storage (where `pin` keeps them) before they are relied on.
   * A storage that does not answer leaves the pins last read.
   */
  private async freshPins(): Promise<void> {
    if (!this.d.replicas) return;
    await this.pins.load().catch((err: unknown) => this.warn(err));
  }

  async pin(refs: ImageRef[]): Promise<void> {
    await this.pins.add(refs);
  }

  /** Resolves to the references that were not pinned with `pin` (config pins stay). */
  async unpin(refs: ImageRef[]): Promise<string[]> {
    return this.pins.remove(refs);
  }

  /** `pullcache rm` (sweep.ts). */
  remove(refs: ImageRef[], dryRun: boolean): Promise<RemovalReport> {
    return this.sweeper.remove(refs, dryRun);
  }

  private warn(err: unknown): void {
    this.log.warn({ err: (err as Error).message ?? String(err) }, 'lifecycle work failed');
  }
}
