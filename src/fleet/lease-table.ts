/**
 * The leases of one host, kept by the primary: which worker fetches each digest, what it has
 * said so far, and which workers follow it. A worker that exits gives up its leases at once (its
 * followers are told it failed), so the next request for the digest fetches afresh: on one host
 * no lease needs to wait out an expiry.
 */
import type { Digest } from '../oci/digest.js';
import type { HolderState, ToPrimary, ToWorker, WireEvent } from './messages.js';

interface Entry {
  token: string;
  digest: Digest;
  holder: number;
  /** The upstream and repository the holder fetches for. */
  scope: string;
  state: HolderState;
  watchers: Set<number>;
}

export class LeaseTable {
  private readonly byDigest = new Map<Digest, Entry>();
  private readonly byToken = new Map<string, Entry>();

  /** `send` delivers a message to a worker by its id (and drops it when the worker is gone). */
  constructor(private readonly send: (worker: number, message: ToWorker) => void) {}

  /** Leases held now. */
  get size(): number {
    return this.byDigest.size;
  }

  receive(worker: number, m: ToPrimary): void {
    switch (m.t) {
      case 'acquire':
      case 'watch': {
        const entry = this.byDigest.get(m.digest);
        if (!entry && m.t === 'watch') {
          this.send(worker, { pullcache: 'lease', t: 'none', token: m.token });
          return;
        }
        if (entry) this.follow(worker, m.token, entry);
        else if (m.t === 'acquire') this.grant(worker, m.digest, m.token, m.scope);
        return;
      }
      case 'takeOver': {
        const current = this.byDigest.get(m.digest);
        if (current && current.token !== m.stalled) {
          // Another follower of the stalled holder took it over first (or a new fetch began):
          // this one follows that, rather than end it and fetch a second time.
          this.follow(worker, m.token, current);
          return;
        }
        if (current) {
          current.watchers.delete(worker);
          this.end(current, { type: 'failed', reason: 'the fetch was taken over: it had stalled' });
        }
        this.grant(worker, m.digest, m.token, m.scope);
        return;
      }
      case 'unwatch':
        this.byToken.get(m.token)?.watchers.delete(worker);
        return;
    }
    // From a holder. A lease ended or taken over meanwhile is no longer this worker's.
    const entry = this.byToken.get(m.token);
    if (!entry || entry.holder !== worker) return;
    switch (m.t) {
      case 'started':
        entry.state.upload = m.upload;
        entry.state.size = m.size;
        this.tell(entry, { type: 'started', upload: m.upload, size: m.size });
        return;
      case 'progress':
        if (m.written <= entry.state.written) return;
        entry.state.written = m.written;
        this.tell(entry, { type: 'progress', written: m.written });
        return;
      case 'committing':
        entry.state.committing = true;
        this.tell(entry, { type: 'committing' });
        return;
      case 'committed':
        this.end(entry, { type: 'committed', size: m.size, kept: m.kept });
        return;
      case 'failed':
        this.end(entry, { type: 'failed', reason: m.reason });
        return;
    }
  }

  /** A worker exited: its leases end as failed, and it follows nothing any more. */
  workerGone(worker: number): void {
    for (const entry of [...this.byDigest.values()]) {
      entry.watchers.delete(worker);
      if (entry.holder === worker)
        this.end(entry, { type: 'failed', reason: 'the worker fetching the blob exited' });
    }
  }

  /** `worker` (its question `token`) follows the holder of `entry`: told what it said so far. */
  private follow(worker: number, token: string, entry: Entry): void {
    entry.watchers.add(worker);
    this.send(worker, {
      pullcache: 'lease',
      t: 'held',
      token,
      holder: entry.token,
      scope: entry.scope,
      state: { ...entry.state },
    });
  }

  /** `worker` holds the digest now, and is told so. */
  private grant(worker: number, digest: Digest, token: string, scope: string): void {
    const entry: Entry = {
      token,
      digest,
      holder: worker,
      scope,
      state: { upload: null, size: null, written: 0 },
      watchers: new Set(),
    };
    this.byDigest.set(digest, entry);
    this.byToken.set(token, entry);
    this.send(worker, { pullcache: 'lease', t: 'granted', token });
  }

  private tell(entry: Entry, event: WireEvent): void {
    for (const watcher of entry.watchers)
      this.send(watcher, { pullcache: 'lease', t: 'event', holder: entry.token, event });
  }

  private end(entry: Entry, event: WireEvent): void {
    this.tell(entry, event);
    this.byToken.delete(entry.token);
    if (this.byDigest.get(entry.digest) === entry) this.byDigest.delete(entry.digest);
  }
}
