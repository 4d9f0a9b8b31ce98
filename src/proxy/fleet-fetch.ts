/**
 * A blob fetch where several processes serve one storage: the lease on the digest decides
 * whether this process fetches it from the upstream (a BlobFetch that tells the lease how far it
 * got) or follows the process that does (a RemoteBlobFetch).
 *
 * Failover: a holder that fails or dies before it has said anything is asked about again (the
 * lease is free then, so this process fetches). A holder that says nothing for the idle timeout
 * is taken over: its followers here are cut (the bytes they sent came from it and cannot be
 * vouched for by another fetch's digest check), and this process fetches afresh, from byte 0,
 * for every request from then on. A holder that fails once followed cuts its followers; the next
 * request fetches afresh.
 */
import type { Descriptor } from '../oci/descriptor.js';
import { fetchScope, type DigestLeases, type HeldFetch, type LeaseResult } from '../fleet/types.js';
import { BlobFetch, type BlobFetchOptions } from './blob-fetch.js';
import { HolderFailedError, HolderStalledError, RemoteBlobFetch } from './remote-fetch.js';
import type { FetchState, FollowerStream, UpstreamFetch } from './types.js';
import { deferred } from './deferred.js';
import { UpstreamNotFoundError } from '../upstream/errors.js';

/** Times a holder that failed before saying anything is asked about again. */
const REASKS = 3;

export interface FleetFetchOptions extends BlobFetchOptions {
  leases: DigestLeases;
  /** How long a holder may say nothing before this process fetches for itself (ms). */
  idleTimeout: number;
  /**
   * Asks the upstream whether this fetch's repository has the blob; rejects when it does not
   * (UpstreamNotFoundError). Called before following a holder that fetches it for another
   * repository: its bytes are not this repository's to serve on the holder's word.
   */
  confirm(): Promise<void>;
}

export class FleetFetch implements UpstreamFetch {
  readonly digest: UpstreamFetch['digest'];
  readonly repo: UpstreamFetch['repo'];
  readonly ready: Promise<void>;
  readonly done: Promise<Descriptor>;
  private current: BlobFetch | RemoteBlobFetch | undefined;

  constructor(private readonly o: FleetFetchOptions) {
    this.digest = o.digest;
    this.repo = o.repo;
    const ready = deferred<void>();
    this.ready = ready.promise;
    this.done = this.run(ready.resolve, ready.reject);
    this.done.catch(() => {});
  }

  get size(): number | undefined {
    return this.current?.size;
  }

  get state(): FetchState {
    return this.current?.state ?? 'starting';
  }

  get error(): unknown {
    return this.current?.error;
  }

  /**
   * Whether this process is the one fetching from the upstream: not while it follows another
   * worker's fetch, or another replica's through its BlobFetch.
   */
  get local(): boolean {
    return this.current instanceof BlobFetch && this.current.local;
  }

  // What the status page shows of a fetch (proxy/inflight.ts): one followed from another
  // process shows the bytes that process has written.
  /** When this process asked for the blob, ms since epoch. */
  readonly startedAt = Date.now();

  /** Bytes received so far: from the upstream here, or written by the process followed. */
  get received(): number {
    const current = this.current;
    if (!current) return 0;
    return current instanceof BlobFetch ? current.received : current.written;
  }

  /** Clients of this process following the fetch now. */
  get clients(): number {
    return (this.current as Partial<{ clients: number }> | undefined)?.clients ?? 0;
  }

  follow(start: number, end: number): FollowerStream {
    if (!this.current) throw new Error('follow before the fetch is ready');
    return this.current.follow(start, end);
  }

  private async run(ready: () => void, notReady: (err: unknown) => void): Promise<Descriptor> {
    const log = this.o.log;
    let result: LeaseResult | undefined;
    /** A holder followed here that sent nothing for the idle timeout: taken over next. */
    let stalled: HeldFetch | undefined;
    const scope = fetchScope(this.repo);
    let confirmed = false;
    for (let ask = 0; ; ask++) {
      try {
        result = stalled
          ? await this.o.leases.takeOver(this.digest, stalled, scope)
          : await this.o.leases.acquire(this.digest, scope);
      } catch (err) {
        // The leases cannot be asked (the primary is gone): fetch alone rather than not at all.
        log.warn({ digest: this.digest, err: (err as Error).message }, 'no lease: fetching alone');
        result = undefined;
      }
      stalled = undefined;
      if (!result || result.held) break;
      const holder = result.holder;
      if (holder.scope !== scope && !confirmed) {
        try {
          await this.o.confirm();
        } catch (err) {
          holder.close();
          if (!(err instanceof UpstreamNotFoundError)) {
            // The upstream could not be asked (a 5xx, a timeout): its GET answers instead, from
            // here, without the lease (as a replica does whose peer cannot be confirmed).
            log.warn(
              { digest: this.digest, err: (err as Error).message },
              'the repository could not be confirmed for the fetch of another: fetching alone',
            );
            result = undefined;
            break;
          }
          notReady(err);
          throw err;
        }
        confirmed = true;
      }
      const remote = new RemoteBlobFetch({
        digest: this.digest,
        repo: this.repo,
        holder,
        blobs: this.o.blobs,
        idleTimeout: this.o.idleTimeout,
      });
      this.current = remote;
      try {
        await remote.ready;
      } catch (err) {
        if (err instanceof HolderStalledError) {
          log.warn({ digest: this.digest }, 'fetch holder stalled before starting: taking over');
          stalled = holder;
          continue;
        }
        if (err instanceof HolderFailedError && ask < REASKS) continue;
        notReady(err);
        throw err;
      }
      ready();
      log.debug({ digest: this.digest }, 'following the fetch of another worker');
      try {
        return await remote.done;
      } catch (err) {
        if (!(err instanceof HolderStalledError)) throw err;
        // Its clients here were cut with it; the next ones get the blob from whoever fetches it
        // now (this process, or a follower that took it over first).
        log.warn({ digest: this.digest }, 'fetch holder stalled: taking over');
        stalled = holder;
      }
    }
    return this.fetchHere(result?.held ? result.lease : undefined, ready, notReady);
  }

  private async fetchHere(
    lease: BlobFetchOptions['lease'],
    ready: () => void,
    notReady: (err: unknown) => void,
  ): Promise<Descriptor> {
    const { leases: _leases, idleTimeout: _idle, confirm: _confirm, ...options } = this.o;
    const fetch = new BlobFetch({ ...options, ...(lease ? { lease } : {}) });
    this.current = fetch;
    fetch.ready.then(ready, notReady);
    return fetch.done;
  }
}
