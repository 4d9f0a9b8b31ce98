/**
 * What the lifecycle runs on its own once a serving process starts it, and when storage is
 * counted (graph-keeper.ts counts): the start-up scan, after which the lifecycle is ready; the
 * owner record renewed every few seconds (owner.ts), when a failed scan is tried again and a
 * replica that took over counts storage afresh; the last-pulled times written every few seconds
 * (pulls.ts); the sweep every `retention.sweepInterval` (sweep.ts). And the counts afresh asked
 * for while serving goes on: on `recount`, and when content was added beside this process. A
 * count afresh runs in the lifecycle's chain of work, after the last pulls are written.
 */
import type { Logger } from '../log/logger.js';
import type { MetadataCache } from '../metadata/types.js';
import type { GraphKeeper } from './graph-keeper.js';
import type { Ownership } from './owner.js';
import type { Pins } from './pins.js';
import type { PullRecorder } from './pulls.js';
import type { ManifestMemory } from './removal.js';
import type { RetentionConfig } from './types.js';

/** How often last-pulled times go to storage: never one write per request. */
const FLUSH_INTERVAL_MS = 5000;
/** How often the owner record is renewed (its TTL is 30 s). */
const OWNER_RENEW_MS = 10_000;

export interface BackgroundDeps {
  retention: RetentionConfig;
  keeper: GraphKeeper;
  pins: Pins;
  ownership: Ownership;
  pulls: PullRecorder;
  cache: MetadataCache;
  manifestMemory: ManifestMemory;
  /** Other processes share this storage (workers, replicas). */
  replicas: boolean;
  /** The sweep (sweep.ts): `unusedFor`, then the collection, on the owner only. */
  sweep: () => Promise<unknown>;
  /** Runs lifecycle work after the work before it: never two evictions at once. */
  serially: <T>(work: () => Promise<T>) => Promise<T>;
  /** Holds the budget: starts an eviction when storage is past it (budget.ts). */
  checkBudget: () => void;
  /** Logs a failure of background work. */
  warn: (err: unknown) => void;
  log: Logger;
  now: () => number;
}

export class Background {
  private scanned = false;
  private scanning: Promise<void> | undefined;
  /** A recount waiting for its turn: calls meanwhile share it. */
  private queuedRecount: Promise<void> | undefined;
  private readonly timers: NodeJS.Timeout[] = [];

  constructor(private readonly d: BackgroundDeps) {}

  /** Whether the start-up scan is done. */
  get ready(): boolean {
    return this.scanned;
  }

  /**
   * Starts the scan, then the work on a timer: the flush of last-pulled times, the renewal of
   * the owner record and, with `sweep`, the sweep.
   */
  start(sweep: boolean): void {
    this.startScan();
    const every = (ms: number, work: () => Promise<unknown>) => {
      const t = setInterval(() => void work().catch((err: unknown) => this.d.warn(err)), ms);
      t.unref();
      this.timers.push(t);
    };
    every(FLUSH_INTERVAL_MS, () => this.d.pulls.flush());
    every(OWNER_RENEW_MS, async () => {
      const was = this.d.ownership.isOwner;
      await this.d.ownership.acquire();
      if (!this.scanning)
        this.startScan(); // the last one failed: try again
      // A replica that takes over counts storage afresh: it may have missed what the others said.
      else if (this.d.replicas && !was && this.d.ownership.isOwner) await this.recount();
    });
    // The sweep counts storage afresh first (what a message lost on the way left out).
    if (sweep && this.d.retention.sweepInterval > 0)
      every(this.d.retention.sweepInterval, () => this.d.sweep());
  }

  /** Stops the work on a timer. */
  stop(): void {
    for (const t of this.timers) clearInterval(t);
  }

  /** Starts the scan in the background; a failure is logged and tried again later. */
  private startScan(): void {
    const scanning = this.scan();
    this.scanning = scanning;
    scanning.catch((err: unknown) => {
      this.d.warn(err);
      if (this.scanning === scanning) this.scanning = undefined;
    });
  }

  /** Resolves once the start-up scan is done; rejects when it failed. */
  async whenReady(): Promise<void> {
    this.scanning ??= this.scan();
    await this.scanning;
  }

  private async scan(): Promise<void> {
    const started = this.d.now();
    await this.d.pins.load();
    await this.d.ownership.acquire();
    const counts = await this.d.keeper.recount();
    this.scanned = true;
    this.d.pulls.graphReady();
    this.d.log.info(
      {
        ...counts,
        bytes: this.d.keeper.graph.bytes,
        durationMs: this.d.now() - started,
        owner: this.d.ownership.isOwner,
      },
      'storage scanned',
    );
    this.d.checkBudget();
  }

  /**
   * Counts storage afresh, for content another process added (a prefetch or an import beside the
   * server, what another worker or replica said that may have been lost), then holds the budget.
   * The count starts after the call; calls made before it starts share it.
   */
  recount(): Promise<void> {
    if (this.queuedRecount) return this.queuedRecount;
    const run = (async () => {
      await this.whenReady();
      await this.d.serially(() => {
        this.queuedRecount = undefined; // a call from now on may be about what this one misses
        return this.rescan();
      });
      this.d.checkBudget();
    })();
    this.queuedRecount = run;
    void run
      .catch(() => {})
      .finally(() => {
        if (this.queuedRecount === run) this.queuedRecount = undefined;
      });
    return run;
  }

  /**
   * Content was added beside this process (`pullcache import` or `prefetch` on the same storage):
   * a tag may have moved beneath what the caches in front of storage remember, so they are
   * cleared, in every process on the storage (the metadata cache tells the others, which count
   * storage afresh too), before storage is counted afresh. Storage is the truth: the caches only
   * save reads.
   */
  async changedBeside(): Promise<void> {
    this.d.manifestMemory.forgetAll?.();
    await this.d.cache.clear();
    await this.recount();
  }

  /** Counts storage afresh while serving goes on, with the last pulls written first. */
  async rescan(): Promise<void> {
    await this.d.pulls.flush();
    await this.d.keeper.recount();
  }
}
