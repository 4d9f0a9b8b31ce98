/**
 * The byte budget: storage held to `retention.maxSize` and the disk to `retention.minFree` by
 * evicting the least recently pulled images in the background, one eviction at a time, never on
 * a client's request path. A blob larger than the whole budget is streamed, not kept.
 */
import type { Logger } from '../log/logger.js';
import type { Digest } from '../oci/digest.js';
import type { StorageDriver } from '../storage/types.js';
import type { Evictor } from './eviction.js';
import type { ImageGraph } from './image-graph.js';
import type { RetentionConfig } from './types.js';

/** How often free space is looked at when blobs are added (it is a system call). */
const SPACE_CHECK_MS = 1000;
/** A process that does not own storage tells the owner it is full once per this long at most. */
const FULL_TOLD_MS = 1000;

export interface BudgetDeps {
  retention: RetentionConfig;
  driver: StorageDriver;
  /** The graph as it stands (a rescan replaces it). */
  graph: () => ImageGraph;
  /** False until the start-up scan has built the graph: nothing is evicted before. */
  ready: () => boolean;
  /** Only the owner of the storage evicts (owner.ts). */
  isOwner: () => boolean;
  /** Runs lifecycle work after the work before it: never two evictions at once. */
  serially: <T>(work: () => Promise<T>) => Promise<T>;
  evictor: Evictor;
  log: Logger;
  /** Logs a failure of background work. */
  warn: (err: unknown) => void;
  now: () => number;
  /** A process that does not own storage found it full: tells the owner, which evicts. */
  onFull?: ((bytes: number) => void) | undefined;
}

export class Budget {
  /** The eviction running now; a second trigger joins it. */
  private evicting: Promise<void> | undefined;
  /** Bytes an eviction must free beyond the budget (a disk that filled up). */
  private extraToFree = 0;
  private lastSpaceCheck = 0;
  private spaceTimer: NodeJS.Timeout | undefined;
  private spaceCheck: Promise<void> | undefined;
  private lastShortfallLog = 0;
  private tooLargeLogged = new Set<Digest>();
  private closed = false;
  /** The most a full disk asked for since the owner was last told (`onFull`), and when that was. */
  private untold = 0;
  private fullToldAt = -Infinity;
  private fullTimer: NodeJS.Timeout | undefined;
  /**
   * Bytes of blobs being fetched to be kept (`reserve`), counted with the stored ones: a burst
   * of cold fetches makes room as it starts, so storage is held near `maxSize` plus what is
   * still in flight of the one process, not plus every fetch's bytes. Only this process's
   * fetches are known here (another worker's or replica's are not).
   */
  private reserved = 0;
  private reservedDuringEviction = false;

  constructor(private readonly d: BudgetDeps) {}

  /**
   * False for a blob larger than the whole budget: it is streamed to its clients and not kept
   * (logged once per digest).
   */
  accepts(digest: Digest, size: number | undefined): boolean {
    const max = this.d.retention.maxSize;
    if (max === 0 || size === undefined || size <= max) return true;
    if (!this.tooLargeLogged.has(digest)) {
      // Said once per digest since the set was last emptied (at a thousand): it does not grow
      // for ever.
      if (this.tooLargeLogged.size >= 1000) this.tooLargeLogged.clear();
      this.tooLargeLogged.add(digest);
      this.d.log.warn(
        { digest, bytes: size, maxSize: max },
        'blob larger than the whole budget: streamed, not kept',
      );
    }
    return false;
  }

  reserve(bytes: number): () => void {
    this.reserved += bytes;
    // An eviction running now measured before this: looked at again once it ends.
    if (this.evicting) this.reservedDuringEviction = true;
    this.check();
    let ended = false;
    return () => {
      if (ended) return;
      ended = true;
      this.reserved -= bytes;
    };
  }

  /** Bytes held against `maxSize`: those stored, and those being fetched to be kept. */
  private get held(): number {
    return this.d.graph().bytes + this.reserved;
  }

  /** Storage ran out of space: evict at least `bytes` more than the budget asks. */
  diskFull(bytes: number): void {
    this.extraToFree = Math.max(this.extraToFree, bytes);
    this.startEviction();
    if (this.d.isOwner()) {
      this.d.log.warn({ bytes }, 'storage is full: evicting');
      return;
    }
    // Only the owner evicts. A full disk fails every write: it is told once a second at most,
    // and what a second asked for at its end (the most of it: a larger blob may come last).
    this.untold = Math.max(this.untold, bytes);
    if (this.fullTimer || this.closed) return;
    const wait = this.fullToldAt + FULL_TOLD_MS - this.d.now();
    if (wait <= 0) return this.tellFull();
    this.fullTimer = setTimeout(() => {
      this.fullTimer = undefined;
      this.tellFull();
    }, wait);
    this.fullTimer.unref();
  }

  private tellFull(): void {
    const bytes = this.untold;
    this.untold = 0;
    this.fullToldAt = this.d.now();
    this.d.log.warn({ bytes }, 'storage is full: the owner evicts');
    this.d.onFull?.(bytes);
  }

  /**
   * Starts an eviction when storage is past `maxSize` or the disk below `minFree`. Free space is
   * a system call: it is looked at once a second at most, and a check that comes sooner is
   * deferred to then (the last blob of a burst is the one that counts); `now` looks at once.
   */
  check(now = false): void {
    if (this.closed || !this.d.ready() || this.evicting) return;
    const { maxSize, minFree } = this.d.retention;
    if (maxSize > 0 && this.held > maxSize) {
      this.startEviction();
      return;
    }
    if (minFree === 0) return;
    const wait = SPACE_CHECK_MS - (this.d.now() - this.lastSpaceCheck);
    if (wait > 0 && !now) {
      this.spaceTimer ??= setTimeout(() => {
        this.spaceTimer = undefined;
        this.check();
      }, wait);
      this.spaceTimer.unref();
      return;
    }
    this.lastSpaceCheck = this.d.now();
    this.spaceCheck = this.d.driver.space().then(
      (space) => {
        if (space && space.free < minFree) this.startEviction();
      },
      (err: unknown) => this.d.warn(err),
    );
  }

  /** Checks at once; resolves once the free-space check and the eviction it started are done. */
  async settle(): Promise<void> {
    this.check(true);
    await this.spaceCheck;
    await this.evicting;
  }

  /** Drops a deferred check; resolves once the eviction running now is done. None starts after. */
  async close(): Promise<void> {
    this.closed = true;
    clearTimeout(this.spaceTimer);
    clearTimeout(this.fullTimer);
    await this.evicting?.catch(() => {});
  }

  private startEviction(): void {
    if (this.evicting || this.closed || !this.d.ready()) return;
    // In the background, never on a client's request path.
    this.evicting = new Promise<void>((resolve) => setImmediate(resolve))
      .then(() =>
        this.d.serially(() => (this.d.isOwner() ? this.evictToBudget() : Promise.resolve(0))),
      )
      .catch((err: unknown) => {
        this.d.warn(err);
        return 0;
      })
      .then((freed) => {
        this.evicting = undefined;
        // A disk that filled up while it ran asks for another at once (only the owner evicts:
        // another process keeps the request for when it owns the storage, and does not spin);
        // blobs added meanwhile may have crossed the budget again.
        const reserved = this.reservedDuringEviction;
        this.reservedDuringEviction = false;
        if (this.extraToFree > 0 && this.d.isOwner()) this.startEviction();
        else if (freed > 0 || reserved) this.check();
      });
  }

  /** Bytes to free now so that storage is back at the low-water mark, and `extra` at least. */
  private async bytesToFree(extra: number): Promise<number> {
    const { maxSize, minFree, lowWater } = this.d.retention;
    let need = 0;
    if (maxSize > 0 && this.held > maxSize) need = this.held - maxSize * lowWater;
    if (minFree > 0) {
      const space = await this.d.driver.space();
      if (space && space.free < minFree)
        need = Math.max(need, minFree * (2 - lowWater) - space.free);
    }
    return Math.max(need, extra);
  }

  /** Resolves to the bytes freed. */
  private async evictToBudget(): Promise<number> {
    // Taken now: a disk that fills up from here on is the next eviction's.
    const extra = this.extraToFree;
    this.extraToFree = 0;
    const need = await this.bytesToFree(extra);
    if (need <= 0) return 0;
    const started = this.d.now();
    const report = await this.d.evictor.evict('size', need);
    this.d.log.info(
      {
        need: Math.round(need),
        freed: report.bytes,
        evicted: report.removed.length,
        durationMs: this.d.now() - started,
        bytes: this.d.graph().bytes,
      },
      'evicted least recently pulled images',
    );
    // Once a minute at most: while pins alone exceed the budget, every added blob gets here.
    if (report.bytes < need && this.d.now() - this.lastShortfallLog >= 60_000) {
      this.lastShortfallLog = this.d.now();
      this.d.log.warn(
        { need: Math.round(need), freed: report.bytes },
        'budget not reached: the rest is pinned or being served',
      );
    }
    return report.bytes;
  }
}
