/**
 * ProxyBlobStore: a stored blob is served from storage; a miss is fetched from the upstream
 * once per digest however many clients ask (see blob-fetch.ts), verified, and kept.
 */
import type { Logger } from '../log/logger.js';
import type { Digest } from '../oci/digest.js';
import type { MetadataCache } from '../metadata/types.js';
import type { Metrics } from '../metrics.js';
import {
  resolveRange,
  type BlobService,
  type BlobStore,
  type ByteRange,
  type OpenResult,
  type RepositoryKey,
  type RepositoryStore,
  type StatResult,
} from '../storage/types.js';
import { UpstreamNotFoundError } from '../upstream/errors.js';
import type { UpstreamClient } from '../upstream/types.js';
import { BlobFetch, type BlobFetchOptions } from './blob-fetch.js';
import { FleetFetch } from './fleet-fetch.js';
import type { DigestLeases } from '../fleet/types.js';
import type { UpstreamFetch } from './types.js';
import type { StorageBudget } from '../lifecycle/types.js';

export interface ProxyBlobStoreOptions {
  local: BlobService;
  blobs: BlobStore;
  repositories: RepositoryStore;
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
}

export class ProxyBlobStore implements BlobService {
  private readonly log: Logger;

  constructor(private readonly o: ProxyBlobStoreOptions) {
    this.log = o.log.child({ module: 'proxy-blob', upstream: o.client.name });
  }

  async stat(repo: RepositoryKey, digest: Digest): Promise<StatResult> {
    const local = await this.o.local.stat(repo, digest);
    if (local.found) return local;
    const fetching = this.o.inflight.get(digest);
    if (fetching?.size !== undefined && fetching.state !== 'failed')
      return { found: true, descriptor: { digest, size: fetching.size } };
    try {
      // HEAD on a miss asks the upstream with HEAD and never downloads the blob.
      const { size } = await this.o.client.headBlob(repo.repository, digest);
      return { found: true, descriptor: { digest, size } };
    } catch (err) {
      if (err instanceof UpstreamNotFoundError) return { found: false };
      throw err;
    }
  }

  async open(repo: RepositoryKey, digest: Digest, range?: ByteRange): Promise<OpenResult> {
    const local = await this.o.local.open(repo, digest, range);
    if (local.found) {
      this.o.metrics.requests.inc({ upstream: repo.upstream, kind: 'blob', cache: 'hit' });
      return local;
    }
    this.o.metrics.requests.inc({ upstream: repo.upstream, kind: 'blob', cache: 'miss' });
    let fetch = this.o.inflight.get(digest);
    if (!fetch || fetch.state === 'failed') {
      fetch = this.start(repo, digest);
    }
    try {
      await fetch.ready;
    } catch (err) {
      if (err instanceof UpstreamNotFoundError) return { found: false };
      throw err;
    }
    if (fetch.state === 'failed') throw fetch.error;
    if (fetch.size === undefined) {
      // No Content-Length from the upstream: wait for the whole blob, then serve it from storage.
      await fetch.done;
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

  private start(repo: RepositoryKey, digest: Digest): UpstreamFetch {
    const options: BlobFetchOptions = {
      blobs: this.o.blobs,
      client: this.o.client,
      repo,
      digest,
      log: this.log,
      orphanTimeout: this.o.orphanTimeout,
      onUpstreamBytes: (n) => this.o.metrics.upstreamBytes.inc({ upstream: repo.upstream }, n),
      ...(this.o.budget ? { budget: this.o.budget } : {}),
      onCommitted: async (descriptor) => {
        await this.o.repositories.linkBlob(repo, descriptor);
        await this.o.cache.setDescriptor(descriptor);
      },
    };
    const { leases, idleTimeout } = this.o;
    const fetch = leases
      ? new FleetFetch({ ...options, leases, idleTimeout: idleTimeout ?? 30_000 })
      : new BlobFetch(options);
    this.o.inflight.set(digest, fetch);
    const forget = () => {
      if (this.o.inflight.get(digest) === fetch) this.o.inflight.delete(digest);
    };
    fetch.done.then(forget, forget);
    return fetch;
  }
}
