/**
 * What an eviction removes: every image and blob of no image that may go (not pinned), least
 * recently pulled first, a few at a time, each skipped while it is being served or when it was
 * pulled again since the list was made.
 */
import type { Logger } from '../log/logger.js';
import type { Metrics } from '../metrics.js';
import type { Digest } from '../oci/digest.js';
import type { Image, ImageGraph, RepositoryNode } from './image-graph.js';
import { imageReferences } from './inventory.js';
import type { Removal } from './removal.js';
import type { EvictionReason, RemovalReport } from './types.js';

/** Entries an eviction removes at once: removals wait on the file system more than on anything. */
const EVICTION_BATCH = 8;

export interface EvictorDeps {
  /** The graph as it stands (a rescan replaces it). */
  graph: () => ImageGraph;
  pinned: (node: RepositoryNode, image: Image) => boolean;
  /** True while a blob is being served or fetched. */
  inUse: (digest: Digest) => boolean;
  removal: Removal;
  metrics: Metrics;
  log: Logger;
  /**
   * Replicas on one storage: true when another process pulled the entry since this one's graph
   * says (storage keeps everyone's last pulls), or so recently that it may be serving it; the
   * graph is brought up to date. Asked right before each removal.
   */
  pulledElsewhere?: (entry: Entry) => Promise<boolean>;
  /**
   * Replicas on one storage: reads again what another process may have changed that the choice
   * depends on (the pins in storage). Asked before each eviction chooses its victims.
   */
  beforeChoosing?: () => Promise<void>;
}

export class Evictor {
  /** Bytes evicted since the process started. */
  evictedBytes = 0;

  constructor(private readonly d: EvictorDeps) {}

  /** Evicts entries, least recently pulled first, until `need` bytes are free. */
  async evict(reason: EvictionReason, need: number): Promise<RemovalReport> {
    const report: RemovalReport = { dryRun: false, removed: [], bytes: 0, problems: [] };
    await this.d.beforeChoosing?.();
    // A few at a time: removals wait on the file system more than on anything else. Each batch
    // holds what is planned to cover the rest of `need` (at most EVICTION_BATCH entries).
    const victims = this.candidates();
    while (victims.length > 0 && report.bytes < need) {
      const batch: Entry[] = [];
      let planned = report.bytes;
      while (victims.length > 0 && batch.length < EVICTION_BATCH && planned < need) {
        const victim = victims.shift()!;
        batch.push(victim);
        planned += victim.kind === 'image' ? victim.image.ownBytes : victim.bytes;
      }
      await Promise.all(batch.map((victim) => this.removeEntry(victim, reason, report)));
    }
    return report;
  }

  /** Every image and orphan blob that may go, least recently pulled first. */
  candidates(): Entry[] {
    const entries: Entry[] = [];
    for (const node of this.d.graph().repositories.values()) {
      for (const root of this.d.graph().roots(node)) {
        const image = this.d.graph().image(node, root);
        if (!this.d.pinned(node, image))
          entries.push({ kind: 'image', node, image, pulledAt: image.pulledAt });
      }
    }
    for (const blob of this.d.graph().orphans())
      if (blob.links.size > 0)
        entries.push({
          kind: 'blob',
          digest: blob.digest,
          bytes: blob.size,
          pulledAt: blob.pulledAt,
        });
    return entries.sort((a, b) => a.pulledAt - b.pulledAt);
  }

  /** Removes one entry unless it is being served; records it in the report and the metrics. */
  async removeEntry(entry: Entry, reason: EvictionReason, report: RemovalReport): Promise<void> {
    let bytes: number;
    let name: string;
    if (entry.kind === 'image') {
      if (entry.image.blobs.some((d) => this.d.inUse(d))) return;
      // Pulled again since the list was made: it is no longer the least recently pulled.
      const root = entry.node.manifests.get(entry.image.digest);
      if (!root || root.pulledAt > entry.pulledAt) return;
      if (await this.d.pulledElsewhere?.(entry)) return;
      bytes = await this.d.removal.removeImage(entry.node, entry.image);
      name = imageReferences(entry.node.key, entry.image).join(', ');
    } else {
      if (this.d.inUse(entry.digest)) return;
      if (await this.d.pulledElsewhere?.(entry)) return;
      bytes = await this.d.removal.removeOrphan(entry.digest);
      name = entry.digest;
    }
    report.removed.push({ kind: entry.kind, name, bytes });
    report.bytes += bytes;
    this.evictedBytes += bytes;
    this.d.metrics.evictions.inc({ reason });
    this.d.metrics.evictedBytes.inc(bytes);
    this.d.log.info({ reason, entry: name, bytes }, 'evicted');
  }
}

export type Entry =
  | { kind: 'image'; node: RepositoryNode; image: Image; pulledAt: number }
  | { kind: 'blob'; digest: Digest; bytes: number; pulledAt: number };
