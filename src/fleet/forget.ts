/**
 * A removal reaching the memory of every other process on the same storage. Storage is the truth
 * and Redis is shared, but each process keeps hot entries in memory in front of them (the metadata
 * cache's LRU, the manifest bytes): when one process removes an entry (an eviction, `rm`, a
 * collection), every other one must drop it too, or it answers from memory for an image that left
 * storage, and a pull of it fails at its first blob once the upstream is down.
 *
 * The process that removes an entry announces the entry's cache key (metadata/keys.ts), and every
 * other process drops that key from memory. Two ways, both used where both apply:
 * - **workers of one host**: over the cluster's IPC channel; the primary passes each message on to
 *   every other worker (primary.ts);
 * - **processes sharing a Redis** (replicas, and the commands run beside them): PUBLISH on a
 *   channel per storage, which every serving process SUBSCRIBEs to. A subscriber that lost its
 *   connection may have missed messages, so each time it is ready again it drops everything it
 *   holds in memory (a Redis that restarted costs each process its hot entries, read again from
 *   Redis or storage). A subscription that does not answer a ping (every 10 s) is made anew,
 *   as one whose connection broke.
 *
 * The same messages carry what a process stored and removed (`+` and `-` keys, `encodeChange`):
 * the others count it in their graphs at once, so the owner's budget holds for what any of them
 * stores, and `ls` or `du` through any of them leaves out what another removed, not from its next
 * sweep on.
 *
 * A process that may have missed some of that (its subscription renewed after a break, or an
 * "everything" message, which stands for keys and events alike) counts storage afresh at once.
 *
 * Keys are batched and leave on the next turn of the event loop; nobody waits for the others to
 * act on them (a removal forgets before and after it removes, so a process that read the entry
 * in between drops it at the second message). A message that could not be sent is sent again
 * every second; past MAX_PENDING keys waiting, the next message says "everything".
 *
 * Here: what the messages say, and the coordinator (`Forgetting`) that batches them for each
 * transport and sends them again; the transports themselves are in forget-transports.ts.
 */
import type { Logger } from '../log/logger.js';
import type { RemovedEvent, StoredEvent } from '../lifecycle/types.js';
import { parseDigest } from '../oci/digest.js';
import { parseRepository, parseTag } from '../oci/reference.js';

/** What one message names: some keys, or everything in memory. */
export type Forgotten = string[] | 'all';

/** Where the keys go in this process: the in-memory entries it drops, and what others stored. */
export interface ForgetTarget {
  forget(keys: readonly string[]): void;
  forgetAll(): void;
  /** What another process stored or removed, in the order said, each checked like any name. */
  changed?(changes: readonly Change[]): void;
  /** Some of what the others stored or removed may have been lost on the way. */
  missed?(): void;
}

/**
 * What another process stored or removed, as one of its messages carries it; or that it found
 * storage full (`bytes` it could not write), for the owner to make room.
 */
export type Change = { stored: StoredEvent } | { removed: RemovedEvent } | { full: number };

/**
 * What another process stored (`+`) or removed (`-`) travels in the same messages, as a "key" of
 * its own that no cache key looks like (those start with a letter, metadata/keys.ts): `+blob
 * <digest> <size>`, `-blob <digest>`, `±link|±manifest <upstream> <repository> <digest>`, `+tag
 * <upstream> <repository> <tag> <digest>`, `-tag <upstream> <repository> <tag>`; `+full <bytes>`.
 */
export function encodeChange(change: Change): string {
  if ('full' in change) return `+full ${change.full}`;
  const [sign, event] = 'stored' in change ? ['+', change.stored] : ['-', change.removed];
  const fields = 'repo' in event ? [event.repo.upstream, event.repo.repository] : [];
  if ('tag' in event) fields.push(event.tag);
  if ('digest' in event) fields.push(event.digest);
  if ('size' in event) fields.push(String(event.size));
  return `${sign}${event.kind} ${fields.join(' ')}`;
}

/** The change a `+` or `-` key names; undefined for anything malformed (it is then passed over). */
export function decodeChange(key: string): Change | undefined {
  const stored = key.startsWith('+');
  if (!stored && !key.startsWith('-')) return undefined;
  const [kind, ...parts] = key.slice(1).split(' ');
  const repoOf = () => ({ upstream: parts[0]!, repository: parseRepository(parts[1]!) });
  const size = (field: string | undefined) =>
    field !== undefined && /^\d{1,15}$/.test(field) ? Number(field) : undefined;
  try {
    switch (kind) {
      case 'full': {
        const bytes = size(parts[0]);
        return stored && parts.length === 1 && bytes !== undefined ? { full: bytes } : undefined;
      }
      case 'blob': {
        if (parts.length !== (stored ? 2 : 1)) return undefined;
        const digest = parseDigest(parts[0]!).digest;
        if (!stored) return { removed: { kind, digest } };
        const bytes = size(parts[1]);
        if (bytes === undefined) return undefined;
        return { stored: { kind, digest, size: bytes } };
      }
      case 'link':
      case 'manifest': {
        if (parts.length !== 3) return undefined;
        const event = { kind, repo: repoOf(), digest: parseDigest(parts[2]!).digest };
        return stored ? { stored: event } : { removed: event };
      }
      case 'tag': {
        if (parts.length !== (stored ? 4 : 3)) return undefined;
        const [repo, tag] = [repoOf(), parseTag(parts[2]!)];
        if (!stored) return { removed: { kind, repo, tag } };
        return { stored: { kind, repo, tag, digest: parseDigest(parts[3]!).digest } };
      }
    }
  } catch {
    // a name or digest that does not parse
  }
  return undefined;
}

/** A way to the other processes. */
export interface ForgetTransport {
  readonly name: string;
  /** Sends one message; rejects when it did not leave (it is then sent again). */
  send(keys: Forgotten): Promise<void>;
  /**
   * Delivers what the others send, from now on. `missed`: what they said of what they stored and
   * removed may not all have arrived (an "everything" message, a subscription renewed after a
   * break); false only for the "everything" of a first subscription.
   */
  listen(receive: (keys: Forgotten, missed?: boolean) => void): void;
  close(): Promise<void>;
}

/** Keys waiting to leave at most: past it, the next message says "everything". */
const MAX_PENDING = 10_000;
/** How soon a message that did not leave is tried again. */
const RETRY_MS = 1000;

/** The keys waiting for one transport. */
class Outbox {
  private readonly keys = new Set<string>();
  private all = false;
  private timer: NodeJS.Timeout | undefined;

  constructor(
    private readonly transport: ForgetTransport,
    private readonly log: Logger,
  ) {}

  add(keys: Forgotten, delay = 0): void {
    if (keys === 'all') this.all = true;
    else if (!this.all) for (const key of keys) this.keys.add(key);
    if (this.keys.size > MAX_PENDING) this.all = true;
    if (this.all) this.keys.clear();
    this.timer ??= setTimeout(() => {
      this.timer = undefined;
      void this.flush();
    }, delay);
  }

  async flush(): Promise<void> {
    if (!this.all && this.keys.size === 0) return;
    const batch: Forgotten = this.all ? 'all' : [...this.keys];
    this.all = false;
    this.keys.clear();
    try {
      await this.transport.send(batch);
    } catch (err) {
      this.log.debug(
        { err: (err as Error).message, via: this.transport.name },
        'not told to the others yet',
      );
      this.add(batch, RETRY_MS);
    }
  }

  stop(): void {
    clearTimeout(this.timer);
    this.timer = undefined;
  }
}

export class Forgetting {
  private readonly outboxes: Outbox[];

  constructor(
    private readonly transports: ForgetTransport[],
    log: Logger,
  ) {
    const flog = log.child({ module: 'forget' });
    this.outboxes = transports.map((t) => new Outbox(t, flog));
  }

  /** Tells the other processes that `key` left storage (or is about to), or what was stored. */
  announce(key: string): void {
    for (const outbox of this.outboxes) outbox.add([key]);
  }

  /**
   * Tells the other processes to drop everything they hold in memory, and to count storage
   * afresh (it changed beneath them: an import beside the server).
   */
  announceAll(): void {
    for (const outbox of this.outboxes) outbox.add('all');
  }

  /** Tells the other processes what this one stored or removed (nothing for a lone process). */
  announceChange(change: Change): void {
    if (this.outboxes.length > 0) this.announce(encodeChange(change));
  }

  /**
   * From now on, what the others announce reaches `target`: keys to drop from memory, what they
   * stored and removed, and that some of it may have been missed.
   */
  listen(target: ForgetTarget): void {
    for (const transport of this.transports)
      transport.listen((keys, missed) => {
        // "Everything" from another process stands for events too; so does a renewed subscription.
        if (missed ?? keys === 'all') target.missed?.();
        if (keys === 'all') return target.forgetAll();
        const changes: Change[] = [];
        const forgotten: string[] = [];
        for (const key of keys) {
          const change = decodeChange(key);
          if (change) changes.push(change);
          else if (!key.startsWith('+') && !key.startsWith('-')) forgotten.push(key);
        }
        if (forgotten.length > 0) target.forget(forgotten);
        if (changes.length > 0) target.changed?.(changes);
      });
  }

  /** Sends what is waiting (once, without retrying), then closes the transports. */
  async close(): Promise<void> {
    for (const outbox of this.outboxes) outbox.stop();
    await Promise.all(this.outboxes.map((outbox) => outbox.flush()));
    for (const outbox of this.outboxes) outbox.stop();
    await Promise.all(this.transports.map((t) => t.close()));
  }
}
