/**
 * What leaves the cache by rule or on request, beside the budget's evictions (budget.ts): the
 * sweep (images not pulled for `retention.unusedFor`, then the collection) every
 * `retention.sweepInterval` and on `gc`, and the images `rm` names. Each runs in the lifecycle's
 * chain of work, one at a time with the evictions and the recounts.
 */
import type { Metrics } from '../metrics.js';
import type { Digest } from '../oci/digest.js';
import type { Evictor } from './eviction.js';
import type { Image, ImageGraph, RepositoryNode } from './image-graph.js';
import { imageReferences, matchingImages } from './inventory.js';
import type { Removal } from './removal.js';
import type { ImageRef, RemovalReport, RetentionConfig } from './types.js';

/** A blob no repository links is collected only this long after its last use: it may be a
 * fetch's or an import's between its commit (a use: storage/blob-store.ts) and its link. */
const UNLINKED_GRACE_MS = 10 * 60_000;

export interface SweeperDeps {
  retention: RetentionConfig;
  /** The graph as it stands (a recount replaces it). */
  graph: () => ImageGraph;
  pinned: (node: RepositoryNode, image: Image) => boolean;
  /** Reads the pins again from storage when other processes share it (lifecycle.ts). */
  freshPins: () => Promise<void>;
  /** True while a blob is being served or fetched. */
  inUse: (digest: Digest) => boolean;
  evictor: Evictor;
  removal: Removal;
  metrics: Metrics;
  /** Upload sessions older than this are collected by `gc` (ms). */
  uploadsPurgeAge: number;
  /** Other processes share this storage (workers, replicas). */
  replicas: boolean;
  /** Resolves once the start-up scan is done; rejects when it failed. */
  whenReady: () => Promise<void>;
  /** Only the owner of the storage sweeps (owner.ts). */
  isOwner: () => boolean;
  /** Runs lifecycle work after the work before it: never two evictions at once. */
  serially: <T>(work: () => Promise<T>) => Promise<T>;
  /** Counts storage afresh while serving goes on, with the last pulls written first. */
  rescan: () => Promise<void>;
  /** Holds the budget: starts an eviction when storage is past it (budget.ts). */
  checkBudget: () => void;
  now: () => number;
}

export class Sweeper {
  constructor(private readonly d: SweeperDeps) {}

  /**
   * Counts storage afresh (another process, a prefetch or an import, may have added to it),
   * removes images not pulled for `unusedFor`, collects garbage, and holds the budget.
   */
  async sweep(): Promise<RemovalReport> {
    await this.d.whenReady();
    if (!this.d.isOwner()) return { dryRun: false, removed: [], bytes: 0, problems: [] };
    const report = await this.d.serially(async () => {
      await this.d.rescan();
      return this.sweepNow();
    });
    this.d.checkBudget();
    return report;
  }

  private async sweepNow(dryRun = false): Promise<RemovalReport> {
    const report: RemovalReport = { dryRun, removed: [], bytes: 0, problems: [] };
    const { unusedFor } = this.d.retention;
    if (unusedFor > 0) {
      await this.d.freshPins();
      const before = this.d.now() - unusedFor;
      for (const entry of this.d.evictor.candidates()) {
        if (entry.pulledAt >= before) break;
        if (!dryRun) await this.d.evictor.removeEntry(entry, 'unused', report);
        else if (entry.kind === 'image') {
          const name = imageReferences(entry.node.key, entry.image).join(', ');
          report.removed.push({ kind: 'image', name, bytes: entry.image.ownBytes });
          report.bytes += entry.image.ownBytes;
        }
      }
    }
    const collected = await this.collectNow(dryRun);
    report.removed.push(...collected.removed);
    report.bytes += collected.bytes;
    return report;
  }

  /**
   * `pullcache gc`: the retention sweep and the collection, now; with `dryRun`, what they would
   * remove. The caller makes sure this process is the owner (owner.ts).
   */
  async gc(dryRun: boolean): Promise<RemovalReport> {
    await this.d.whenReady();
    return this.d.serially(async () => {
      if (!dryRun) await this.d.rescan();
      return this.sweepNow(dryRun);
    });
  }

  private async collectNow(dryRun: boolean): Promise<RemovalReport> {
    const report = await this.d.removal.collect(dryRun, {
      unlinkedBefore: this.d.now() - UNLINKED_GRACE_MS,
      uploadsBefore: new Date(this.d.now() - this.d.uploadsPurgeAge),
    });
    if (!dryRun) this.d.metrics.gcRuns.inc();
    return report;
  }

  /**
   * Removes images now, with the blobs no kept image holds. With several processes on one
   * storage (workers, replicas), a reference this graph lacks may be an image another process
   * stored since this one's last count: storage is counted afresh first.
   */
  async remove(refs: ImageRef[], dryRun: boolean): Promise<RemovalReport> {
    await this.d.whenReady();
    return this.d.serially(async () => {
      if (this.d.replicas && refs.some((ref) => this.matching(ref).images.length === 0))
        await this.d.rescan();
      return this.removeNow(refs, dryRun);
    });
  }

  /** The repository a reference names in the graph, and its images that match it. */
  private matching(ref: ImageRef) {
    const graph = this.d.graph();
    const node = graph.repositories.get(`${ref.upstream}/${ref.repository}`);
    return { node, images: node ? matchingImages(graph, node, ref) : [] };
  }

  private async removeNow(refs: ImageRef[], dryRun: boolean): Promise<RemovalReport> {
    const report: RemovalReport = { dryRun, removed: [], bytes: 0, problems: [] };
    await this.d.freshPins();
    for (const ref of refs) {
      const { node, images } = this.matching(ref);
      if (!node || images.length === 0) {
        report.problems.push(`${ref.reference}: not cached`);
        continue;
      }
      for (const image of images) {
        const names = imageReferences(node.key, image).join(', ');
        if (this.d.pinned(node, image)) {
          report.problems.push(`${names}: pinned (unpin it first)`);
          continue;
        }
        if (image.blobs.some((d) => this.d.inUse(d))) {
          report.problems.push(`${names}: being served now; try again`);
          continue;
        }
        if (dryRun) {
          report.removed.push({ kind: 'image', name: names, bytes: image.ownBytes });
          report.bytes += image.ownBytes;
        } else {
          await this.d.evictor.removeEntry(
            { kind: 'image', node, image, pulledAt: Infinity },
            'manual',
            report,
          );
        }
      }
    }
    return report;
  }
}
