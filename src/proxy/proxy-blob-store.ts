/**
 * ProxyBlobStore: a blob the repository holds is served from storage; a miss is fetched from the
 * upstream once per digest however many clients ask (see blob-fetch.ts), verified, kept, and
 * linked to the repository. A blob stored (or being fetched) for another repository is served
 * for this one only after its upstream confirms, with this repository's scope, that it has it.
 */
import { LRUCache } from 'lru-cache';
import type { Logger } from '../log/logger.js';
import type { Digest } from '../oci/digest.js';
import type { MetadataCache } from '../metadata/types.js';
import type { Metrics } from '../metrics.js';
import type { LocalBlobService } from '../storage/local-services.js';
import type {
  BlobStore,
  ByteRange,
  OpenResult,
  RepositoryKey,
  StatResult,
} from '../storage/types.js';
import type { BlobService } from '../storage/services.js';
import { resolveRange } from '../storage/byte-range.js';
import {
  UpstreamInvalidError,
  UpstreamNotFoundError,
  UpstreamUnavailableError,
} from '../upstream/errors.js';
import type { UpstreamClient } from '../upstream/types.js';
import { BlobFetch, type BlobFetchOptions } from './blob-fetch.js';
import { FleetFetch } from './fleet-fetch.js';
import type { DigestLeases } from '../fleet/types.js';
import type { UpstreamFetch } from './types.js';
import { SingleFlight } from './single-flight.js';
import type { StorageBudget } from '../lifecycle/types.js';

/** How long a size the upstream gave stands for the requests after it (ms). */
const TOLD_TTL_MS = 10_000;

/** A repository's blob, as a key. */
const blobKey = (repo: RepositoryKey, digest: Digest) =>
  `${repo.upstream}/${repo.repository}@${digest}`;

export interface ProxyBlobStoreOptions {
  /** Blobs as each repository holds them (its links), from storage and memory. */
  local: LocalBlobService;
  blobs: BlobStore;
  cache: MetadataCache;
  client: UpstreamClient;
  log: Logger;
  metrics: Metrics;
  orphanTimeout: number;
  /** Fetches in flight, by digest; shared by every upstream's store so a digest is fetched once. */
  inflight: Map<Digest, UpstreamFetch>;
  /**
   * Leases on digests among the processes sharing the storage (`server.workers`): one of them
   * fetches, the others follow it. Without: every fetch is this process's.
   */
  leases?: DigestLeases;
  /** How long a followed process may send nothing before this one fetches for itself (ms). */
  idleTimeout?: number;
  /** The storage budget (the lifecycle); without one every blob is kept. */
  budget?: StorageBudget;
  /**
   * Whether a manifest this repository holds names the blob (the lifecycle's count of storage):
   * while the upstream cannot be asked, that is the repository's word that it has it (a process
   * killed between a blob's commit and its link left it unlinked).
   */
  manifestHolds?: (repo: RepositoryKey, digest: Digest) => boolean;
  /**
   * Where a fetch takes the blob's bytes from, when not straight from `client`: with replicas,
   * the replica holding the digest's lease (fleet/peers.ts).
   */
  source?: BlobFetchOptions['client'];
}

export class ProxyBlobStore implements BlobService {
  private readonly log: Logger;
  /** Upstream confirmations under way, one per repository and digest. */
  private readonly confirmations = new SingleFlight<StatResult>();
  /**
   * Sizes the upstream just gave (HEAD, with the repository's scope) of blobs not stored, by
   * repository and digest: the ranged GET that often follows (a suffix range asks the size
   * first; clients that HEAD and then GET a range) is not one more HEAD.
   */
  private readonly told = new LRUCache<string, number>({ max: 1000, ttl: TOLD_TTL_MS });

  constructor(private readonly o: ProxyBlobStoreOptions) {
    this.log = o.log.child({ module: 'proxy-blob', upstream: o.client.name });
  }

  async stat(repo: RepositoryKey, digest: Digest): Promise<StatResult> {
    const local = await this.o.local.stat(repo, digest);
    if (local.found) return local;
    const fetching = this.active(digest);
    if (fetching && isFor(fetching, repo) && fetching.size !== undefined)
      return { found: true, descriptor: { digest, size: fetching.size } };
    // HEAD on a miss asks the upstream with HEAD and never downloads the blob; one stored (or
    // being fetched) for another repository is linked to this one once the upstream says so.
    return this.confirm(repo, digest);
  }

  async open(repo: RepositoryKey, digest: Digest, range?: ByteRange): Promise<OpenResult> {
    const local = await this.o.local.open(repo, digest, range);
    if (local.found) {
      this.o.metrics.requests.inc({ upstream: repo.upstream, kind: 'blob', cache: 'hit' });
      return local;
    }
    if (!this.active(digest) && (await this.o.local.stored(digest)).found) {
      // Stored for another repository: served for this one only once the upstream confirms.
      if (!(await this.confirm(repo, digest)).found) return { found: false };
      const linked = await this.o.local.open(repo, digest, range);
      if (linked.found) {
        this.o.metrics.requests.inc({ upstream: repo.upstream, kind: 'blob', cache: 'hit' });
        return linked;
      }
      // Removed meanwhile (an eviction): a miss like any other, below.
    }
    // A range of a blob nobody fetches yet: its size first (HEAD), so that a range past its
    // end is refused without downloading the blob.
    let confirmed = false;
    if (range && !this.active(digest)) {
      const size = await this.upstreamSize(repo, digest);
      if (size === null) return { found: false };
      if (size !== undefined) resolveRange(size, range); // throws RangeInvalidError
      confirmed = true;
      // Fetched and kept for this repository meanwhile, by another client.
      const kept = await this.o.local.open(repo, digest, range);
      if (kept.found) {
        this.o.metrics.requests.inc({ upstream: repo.upstream, kind: 'blob', cache: 'hit' });
        return kept;
      }
    }
    // Looked up again after the awaits above, and started without one in between: concurrent
    // clients of a digest find each other's fetch.
    let fetch = this.active(digest);
    let joined = false;
    if (fetch && !isFor(fetch, repo)) {
      // Being fetched for another repository: followed only once the upstream confirms this one
      // has it too (and linked to it when the fetch is kept).
      if (!confirmed && !(await this.confirm(repo, digest)).found) return { found: false };
      joined = true;
    }
    this.o.metrics.requests.inc({ upstream: repo.upstream, kind: 'blob', cache: 'miss' });
    fetch ??= this.start(repo, digest);
    let linking = joined ? this.linkWhenKept(repo, fetch) : undefined;
    for (;;) {
      try {
        await fetch.ready;
        break;
      } catch (err) {
        if (!(err instanceof UpstreamNotFoundError)) throw err;
        if (!joined || this.active(digest)) return { found: false };
        // Another repository's fetch, refused for that one (another process's fetch it was to
        // follow is not that repository's): not this one's answer, which fetches for itself.
        fetch = this.start(repo, digest);
        joined = false;
        linking = undefined;
      }
    }
    if (fetch.state === 'failed') throw fetch.error;
    if (fetch.size === undefined) {
      // No Content-Length from the upstream: wait for the whole blob, then serve it from storage.
      await fetch.done;
      await linking;
      return this.o.local.open(repo, digest, range);
    }
    const size = fetch.size;
    const { start, end } = resolveRange(size, range);
    const stream = fetch.follow(start, end + 1);
    const descriptor = { digest, size };
    return range
      ? { found: true, descriptor, stream, range: { start, end }, fromUpstream: true }
      : { found: true, descriptor, stream, fromUpstream: true };
  }

  /**
   * Asks the upstream (HEAD, with this repository's scope) whether the repository has the blob.
   * When its bytes are stored already, for another repository, a yes links it to this one, so
   * that it is remembered like any blob fetched for it. `{found:false}` when the upstream says
   * no. When it cannot be asked (offline, down), stored bytes are this repository's only when a
   * manifest it holds names them (then linked); otherwise its UpstreamUnavailableError is thrown,
   * as for a digest stored nowhere: answering those 404 would tell anyone which digests (a
   * private image's layers) are stored for other repositories. Other failures are thrown, as
   * for any miss.
   */
  private confirm(repo: RepositoryKey, digest: Digest): Promise<StatResult> {
    return this.confirmations.run(blobKey(repo, digest), async () => {
      let size: number | undefined;
      try {
        ({ size } = await this.o.client.headBlob(repo.repository, digest));
      } catch (err) {
        if (err instanceof UpstreamNotFoundError) return this.refused(repo, digest, 'not found');
        if (err instanceof UpstreamUnavailableError) {
          const stored = await this.o.local.stored(digest);
          if (stored.found && this.o.manifestHolds?.(repo, digest)) {
            await this.o.local.link(repo, stored.descriptor);
            this.log.info(
              { repository: repo.repository, digest },
              'stored blob linked: a manifest of the repository names it (the upstream cannot be asked)',
            );
            return stored;
          }
          if (stored.found) await this.refused(repo, digest, 'upstream unavailable');
        }
        throw err;
      }
      const stored = await this.o.local.stored(digest);
      if (!stored.found) {
        // A yes without a size (no Content-Length): the fetch under way may know it; a blob
        // stored already has its own (above). Told as 0 it would read as an empty blob.
        size ??= this.active(digest)?.size;
        if (size === undefined)
          throw new UpstreamInvalidError(
            this.o.client.name,
            `blob ${digest}: HEAD without a Content-Length`,
          );
        this.told.set(blobKey(repo, digest), size);
        return { found: true, descriptor: { digest, size } };
      }
      await this.o.local.link(repo, stored.descriptor);
      this.log.info(
        { repository: repo.repository, digest },
        'stored blob linked: the upstream confirmed the repository has it',
      );
      return stored;
    });
  }

  /**
   * The blob's size as the upstream tells it (HEAD, with this repository's scope): null when it
   * does not have it, undefined when it says so without a Content-Length.
   */
  private async upstreamSize(
    repo: RepositoryKey,
    digest: Digest,
  ): Promise<number | null | undefined> {
    const told = this.told.get(blobKey(repo, digest));
    if (told !== undefined) return told;
    try {
      return (await this.o.client.headBlob(repo.repository, digest)).size;
    } catch (err) {
      if (err instanceof UpstreamNotFoundError) return null;
      throw err;
    }
  }

  /**
   * Before this process follows another's fetch of the digest made for another repository: the
   * upstream's word that this one has it (HEAD, with this repository's scope), as in `open` for
   * a fetch of this process. Throws UpstreamNotFoundError when it says no.
   */
  private async confirmFollowing(repo: RepositoryKey, digest: Digest): Promise<void> {
    try {
      await this.o.client.headBlob(repo.repository, digest);
    } catch (err) {
      if (err instanceof UpstreamNotFoundError) await this.refused(repo, digest, 'not found');
      throw err;
    }
  }

  private async refused(repo: RepositoryKey, digest: Digest, reason: string): Promise<StatResult> {
    if ((await this.o.local.stored(digest)).found || this.active(digest))
      this.log.info(
        { repository: repo.repository, digest, reason },
        'blob of another repository not served: the upstream did not confirm this one has it',
      );
    return { found: false };
  }

  /** Links a fetch made for another repository to this one too, once it is kept. */
  private async linkWhenKept(repo: RepositoryKey, fetch: UpstreamFetch): Promise<void> {
    try {
      const descriptor = await fetch.done;
      if (fetch.state === 'committed') await this.o.local.link(repo, descriptor);
    } catch (err) {
      // A failed fetch is reported by its own followers; a failed link only costs a confirmation.
      if (fetch.state === 'committed')
        this.log.warn(
          { repository: repo.repository, digest: fetch.digest, err: (err as Error).message },
          'blob link failed',
        );
    }
  }

  /** The fetch of a digest under way (for whichever repository), if any. */
  private active(digest: Digest): UpstreamFetch | undefined {
    const fetch = this.o.inflight.get(digest);
    return fetch && fetch.state !== 'failed' ? fetch : undefined;
  }

  private start(repo: RepositoryKey, digest: Digest): UpstreamFetch {
    const options: BlobFetchOptions = {
      blobs: this.o.blobs,
      client: this.o.source ?? this.o.client,
      repo,
      digest,
      log: this.log,
      orphanTimeout: this.o.orphanTimeout,
      ...(this.o.budget ? { budget: this.o.budget } : {}),
      onCommitted: (descriptor) => this.o.local.link(repo, descriptor),
    };
    const { leases, idleTimeout } = this.o;
    const fetch = leases
      ? new FleetFetch({
          ...options,
          leases,
          idleTimeout: idleTimeout ?? 30_000,
          confirm: () => this.confirmFollowing(repo, digest),
        })
      : new BlobFetch(options);
    this.o.inflight.set(digest, fetch);
    const forget = () => {
      if (this.o.inflight.get(digest) === fetch) this.o.inflight.delete(digest);
    };
    fetch.done.then(forget, forget);
    return fetch;
  }
}

/** Whether a fetch is for this repository of this upstream (the one it links on commit). */
const isFor = (fetch: UpstreamFetch, repo: RepositoryKey) =>
  fetch.repo.upstream === repo.upstream && fetch.repo.repository === repo.repository;
