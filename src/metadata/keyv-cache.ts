/**
 * The MetadataCache: in-process memory (default), an LRU of `memoryEntries`, or Redis through
 * keyv and @keyv/redis with that LRU in front of it.
 */
import { once, type EventEmitter } from 'node:events';
import { TimedOutError, within } from '../abort.js';
import type { RedisConnectionClientType } from '@keyv/redis';
import type KeyvRedis from '@keyv/redis';
import { Keyv } from 'keyv';
import { LRUCache } from 'lru-cache';
import { redisSocket } from '../lifecycle/lease.js';
import type { Logger } from '../log/logger.js';
import type { Digest } from '../oci/digest.js';
import type { Descriptor } from '../oci/descriptor.js';
import type { Tag } from '../oci/reference.js';
import type { ManifestLink, RepositoryKey, TagLink } from '../storage/types.js';
import { keys, NAMESPACE } from './keys.js';
import type { MetadataCache } from './types.js';

const SKIP_AFTER_ERROR_MS = 5000;
/** How often a Redis that stays away is said again. */
const AWAY_REMINDER_MS = 5 * 60_000;
/**
 * How long one command may go unanswered. A Redis that stops answering without closing its
 * connections (a paused VM, a lost host, a partition) emits no error: its commands would wait
 * in the client's queue for as long as it is away, and every request with them.
 */
const COMMAND_TIMEOUT_MS = 1000;
/**
 * Deletes that could not reach Redis, kept to be made once it answers again. Past this many,
 * the whole namespace is cleared then instead (it is a cache: storage answers what it lacks).
 */
const MAX_PENDING_DELETES = 10_000;
/** How long clearing the cache's keys may take (a scan of the whole Redis database). */
const CLEAR_TIMEOUT_MS = 60_000;

/** Whether the cache's store answers: see `KeyvMetadataCache.reachable`. */
export type Reachability = { ok: true } | { ok: false; reason: string };

export interface KeyvCacheOptions {
  store: 'memory' | 'redis';
  redisUrl?: string;
  log: Logger;
  /**
   * Entries of the in-process LRU: with `memory`, the whole cache (0: no cache); with `redis`,
   * the hot entries in front of it (0: every read asks Redis).
   */
  memoryEntries?: number;
  /** Told each key deleted, for the other processes' memory (fleet/forget.ts). */
  onDelete?: (key: string) => void;
  /** Told the whole cache was cleared, for the other processes' memory (fleet/forget.ts). */
  onClear?: () => void;
}

export class KeyvMetadataCache implements MetadataCache {
  /**
   * Keyv on Redis, once @keyv/redis is loaded (only when Redis is configured); undefined with
   * `memory`, where the LRU is the whole cache (keyv's own Map behind it had no bound).
   */
  private readonly keyv: Promise<Keyv | undefined>;
  /** The Redis store, when there is one: `reachable` asks its client directly. */
  private readonly redis: Promise<KeyvRedis<unknown> | undefined>;
  private readonly log: Logger;
  /**
   * Hot entries without a keyv round trip (no serialisation, no Redis). Descriptors and manifests
   * are immutable by digest; a tag read from here may be older than one another process wrote to
   * Redis, which costs at most one revalidation the other process already made.
   */
  private readonly memory: LRUCache<string, object> | undefined;
  /** Redis failed the last request that asked it (said when it does, and when it answers again). */
  private away = false;
  private awaySaidAt = 0;
  /** After a failure the backend is skipped for a while: a dead Redis costs one timeout, not one per request. */
  private skipUntil = 0;
  /** Probes under way: their failures are the caller's to report, not `warn`'s. */
  private probing = 0;
  private lastError: unknown;
  /** Failures so far, thrown or only emitted (the store reports some without throwing). */
  private errors = 0;
  private readonly onDelete: ((key: string) => void) | undefined;
  private readonly onClear: (() => void) | undefined;
  /** Whether Redis is behind the LRU (its commands have COMMAND_TIMEOUT_MS to answer). */
  private readonly onRedis: boolean;
  /**
   * Keys deleted while Redis could not be told: read as absent here, and deleted there once it
   * answers (else an entry removed meanwhile, say a manifest `rm`, would come back from Redis,
   * with no expiry).
   */
  private readonly pendingDeletes = new Set<string>();
  /** Too many deletes missed to keep (MAX_PENDING_DELETES): the namespace is cleared instead. */
  private clearPending = false;
  private flushing: Promise<void> | undefined;
  /** The wait for a connecting client to be ready (`connected`). */
  private connecting: Promise<boolean> | undefined;

  constructor(options: KeyvCacheOptions) {
    this.onDelete = options.onDelete;
    this.onClear = options.onClear;
    this.onRedis = options.store === 'redis';
    this.log = options.log.child({ module: 'metadata', store: options.store });
    const entries = options.memoryEntries ?? 10_000;
    this.memory = entries > 0 ? new LRUCache({ max: entries }) : undefined;
    this.redis =
      options.store === 'redis'
        ? import('@keyv/redis').then(({ default: KeyvRedis, createClient }) => {
            // The client is made here and connected once, for good: it reconnects by itself
            // (backing off up to 5 s), so KeyvRedis never connects it. KeyvRedis's own attempt,
            // bounded by a timer, gave up on a closed client and added its four listeners again
            // each time: one set every few seconds for as long as Redis was away. A command is
            // sent only once it is connected (`guard` waits for that within its timeout): none
            // waits in the client's queue while it is not (that queue grew for as long as Redis
            // was away).
            const client = createClient({
              url: options.redisUrl ?? 'redis://127.0.0.1:6379',
              disableOfflineQueue: true,
              socket: redisSocket(),
            });
            const store = new KeyvRedis(client, {
              // A cache must not hold a request hostage to a dead Redis: fail fast and fall
              // back to storage.
              throwOnConnectError: false,
              throwOnErrors: false,
            });
            // Its failures reach keyv's 'error' listener (below) through the store.
            client.connect().catch(() => {});
            return store;
          })
        : Promise.resolve(undefined);
    this.keyv = this.redis.then((redis) => {
      if (!redis) return undefined;
      const keyv = new Keyv({ store: redis, namespace: NAMESPACE, useKeyPrefix: false });
      // The client's own failures (each attempt to reconnect too, requests or none): noted, and
      // said by the request that meets them (`guard`), not for every attempt.
      keyv.on('error', (err: unknown) => {
        this.errors++;
        this.skipUntil = Date.now() + SKIP_AFTER_ERROR_MS;
        this.lastError = err;
      });
      return keyv;
    });
  }

  /**
   * Whether the store answers now: Redis is sent a PING (after connecting, if it must); memory
   * always answers. Resolves within `timeoutMs` (at once within a few seconds of a failure) and
   * never throws: `{ ok: false, reason }` says why not. Logs nothing: what a failure means (a
   * warning at start-up, a degraded /readyz) is the caller's to say. A Redis that answers again
   * is used at once, not after the pause that follows a failed request.
   */
  async reachable(timeoutMs = COMMAND_TIMEOUT_MS + 500): Promise<Reachability> {
    const redis = await this.redis;
    if (!redis) return { ok: true };
    // Failed a moment ago: say so at once instead of waiting for another connection attempt
    // (/readyz answers within a probe's timeout).
    if (Date.now() < this.skipUntil && !(redis.client as RedisConnectionClientType).isReady)
      return { ok: false, reason: this.errorReason() ?? 'not connected' };
    this.probing++;
    this.lastError = undefined;
    try {
      const answer = await within(this.ping(redis), timeoutMs, 'no answer').catch(
        (err: unknown): Reachability => {
          if (err instanceof TimedOutError)
            return { ok: false, reason: `no answer within ${timeoutMs} ms` };
          throw err;
        },
      );
      if (answer.ok) {
        this.skipUntil = 0;
        void this.flushDeletes();
      }
      return answer;
    } finally {
      this.probing--;
    }
  }

  private async ping(redis: KeyvRedis<unknown>): Promise<Reachability> {
    try {
      // Made from a URL, so a single client (not a cluster or sentinel).
      const client = redis.client as RedisConnectionClientType;
      if (!(await this.connected(client))) return { ok: false, reason: this.notConnected() };
      await client.ping();
      return { ok: true };
    } catch (err) {
      return { ok: false, reason: (err as Error).message };
    }
  }

  /**
   * Whether the client is connected: at once, or once it is while it connects (just started, or
   * reconnecting), within COMMAND_TIMEOUT_MS; its attempt's failure is a no. One wait for all
   * callers (a probe bounds its own by its timeout).
   */
  private connected(client: RedisConnectionClientType): Promise<boolean> {
    if (client.isReady) return Promise.resolve(true);
    this.connecting ??= once(client as unknown as EventEmitter, 'ready', {
      signal: AbortSignal.timeout(COMMAND_TIMEOUT_MS),
    })
      .then(
        () => true,
        () => false,
      )
      .finally(() => (this.connecting = undefined));
    return this.connecting;
  }

  /** Why the client is not connected: its last failure, else that it did not connect in time. */
  private notConnected(): string {
    return this.errorReason() ?? `not connected within ${COMMAND_TIMEOUT_MS} ms`;
  }

  private errorReason(): string | undefined {
    const err = this.lastError;
    if (err === undefined) return undefined;
    return err instanceof Error ? err.message || (err as NodeJS.ErrnoException).code : String(err);
  }

  getDescriptor(digest: Digest) {
    return this.get<Descriptor>(keys.blob(digest));
  }
  setDescriptor(descriptor: Descriptor) {
    return this.set(keys.blob(descriptor.digest), descriptor);
  }
  getRepositoryDescriptor(repo: RepositoryKey, digest: Digest) {
    return this.get<Descriptor>(keys.repositoryBlob(repo, digest));
  }
  setRepositoryDescriptor(repo: RepositoryKey, descriptor: Descriptor) {
    return this.set(keys.repositoryBlob(repo, descriptor.digest), descriptor);
  }
  getManifest(repo: RepositoryKey, digest: Digest) {
    return this.get<ManifestLink>(keys.manifest(repo, digest));
  }
  setManifest(repo: RepositoryKey, link: ManifestLink) {
    return this.set(keys.manifest(repo, link.digest), link);
  }
  getTag(repo: RepositoryKey, tag: Tag) {
    return this.get<TagLink>(keys.tag(repo, tag));
  }
  setTag(repo: RepositoryKey, tag: Tag, link: TagLink) {
    return this.set(keys.tag(repo, tag), link);
  }
  async deleteTag(repo: RepositoryKey, tag: Tag) {
    await this.delete(keys.tag(repo, tag));
  }
  async deleteDescriptor(digest: Digest) {
    await this.delete(keys.blob(digest));
  }
  async deleteRepositoryDescriptor(repo: RepositoryKey, digest: Digest) {
    await this.delete(keys.repositoryBlob(repo, digest));
  }
  async deleteManifest(repo: RepositoryKey, digest: Digest) {
    await this.delete(keys.manifest(repo, digest));
  }

  /** Drops keys from this process's memory only: another process deleted them. */
  forgetInMemory(keys: readonly string[]): void {
    for (const key of keys) this.memory?.delete(key);
  }

  /** Drops everything this process holds in memory (what was deleted meanwhile is unknown). */
  forgetAllInMemory(): void {
    this.memory?.clear();
  }

  async clear(): Promise<void> {
    this.memory?.clear();
    if (!this.onRedis) {
      this.onClear?.();
      return;
    }
    const done = await this.guard((keyv) => keyv.clear().then(() => true), CLEAR_TIMEOUT_MS);
    // Cleared, or to be cleared once Redis answers (nothing is read from it until then).
    this.pendingDeletes.clear();
    this.clearPending = !done;
    // What a read under way put back meanwhile.
    this.memory?.clear();
    this.onClear?.();
  }

  /** Closes the connection, or gives up connecting (the client would try again for ever). */
  async close(): Promise<void> {
    const client = (await this.redis)?.client as RedisConnectionClientType | undefined;
    if (!client?.isOpen) return;
    try {
      if (client.isReady) await within(client.close(), COMMAND_TIMEOUT_MS, 'no answer');
      else client.destroy();
    } catch {
      if (client.isOpen) client.destroy();
    }
  }

  private async get<T>(key: string): Promise<T | undefined> {
    const hot = this.memory?.get(key);
    if (hot !== undefined) return hot as T;
    if (!this.onRedis) return undefined;
    if (this.clearPending) {
      // Redis may hold anything deleted meanwhile: not asked until its keys are cleared (in the
      // background: a clear scans the whole database).
      void this.flushDeletes();
      return undefined;
    }
    if (this.pendingDeletes.has(key)) {
      // Not known whether Redis still holds it: asked only once the deletes went through.
      await this.flushDeletes();
      if (this.clearPending || this.pendingDeletes.has(key)) return undefined;
    }
    const value = (await this.guard((keyv) => keyv.get<T>(key))) ?? undefined;
    if (value !== undefined) this.memory?.set(key, value as object);
    return value;
  }

  private async delete(key: string): Promise<void> {
    this.memory?.delete(key);
    this.onDelete?.(key);
    if (!this.onRedis) return;
    const done = await this.guard((keyv) => keyv.delete(key).then(() => true));
    if (done) {
      this.pendingDeletes.delete(key);
      return;
    }
    if (this.clearPending) return;
    this.pendingDeletes.add(key);
    if (this.pendingDeletes.size > MAX_PENDING_DELETES) {
      this.clearPending = true;
      this.pendingDeletes.clear();
    }
  }

  private async set(key: string, value: object): Promise<void> {
    this.memory?.set(key, value);
    if (!this.onRedis) return;
    const done = await this.guard((keyv) => keyv.set(key, value).then(() => true));
    if (done) this.pendingDeletes.delete(key);
  }

  /** Whether deletes Redis missed wait to be sent. */
  private get deletesPending(): boolean {
    return this.clearPending || this.pendingDeletes.size > 0;
  }

  /** Makes the deletes Redis missed, once it answers (one attempt at a time). */
  private flushDeletes(): Promise<void> {
    if (!this.deletesPending) return Promise.resolve();
    this.flushing ??= (async () => {
      const sent = this.clearPending ? 'all' : [...this.pendingDeletes];
      const done =
        sent === 'all'
          ? await this.guard((keyv) => keyv.clear().then(() => true), CLEAR_TIMEOUT_MS)
          : await this.guard((keyv) => keyv.deleteMany(sent).then(() => true));
      if (!done) return;
      // Only what was sent: a delete that failed since is pending anew.
      if (sent === 'all') this.clearPending = false;
      else for (const key of sent) this.pendingDeletes.delete(key);
      this.log.info(
        { keys: sent === 'all' ? 'all' : sent.length },
        'metadata cache: the deletes made while Redis was away are sent',
      );
    })().finally(() => (this.flushing = undefined));
    return this.flushing;
  }

  private async guard<T>(
    op: (keyv: Keyv) => Promise<T>,
    timeoutMs = COMMAND_TIMEOUT_MS,
  ): Promise<T | undefined> {
    if (Date.now() < this.skipUntil) {
      this.warn(this.lastError);
      return undefined;
    }
    const errors = this.errors;
    try {
      const keyv = await this.keyv;
      if (!keyv) return undefined;
      const client = (await this.redis)!.client as RedisConnectionClientType;
      if (!(await this.connected(client))) throw new Error(this.notConnected());
      const result = await within(op(keyv), timeoutMs, `no answer within ${timeoutMs} ms`);
      // A failure the store only emitted (it resolved anyway): no answer to rely on.
      if (this.errors !== errors) {
        this.warn(this.lastError);
        return undefined;
      }
      if (this.away) {
        this.away = false;
        this.log.info('metadata cache answers again');
      }
      // Redis answers again: the deletes it missed go first thing.
      if (this.deletesPending) void this.flushDeletes();
      return result;
    } catch (err) {
      this.errors++;
      this.skipUntil = Date.now() + SKIP_AFTER_ERROR_MS;
      this.lastError = err;
      this.warn(err);
      return undefined;
    }
  }

  private warn(err: unknown): void {
    if (this.probing > 0) return;
    // Said when Redis goes away, then every few minutes while it stays away (requests meet it
    // every few seconds: a line each time told nothing new).
    const now = Date.now();
    if (this.away && now - this.awaySaidAt < AWAY_REMINDER_MS) return;
    this.awaySaidAt = now;
    this.log.warn(
      { err: err ?? this.notConnected() },
      this.away
        ? 'metadata cache still unavailable, serving from storage'
        : 'metadata cache unavailable, serving from storage',
    );
    this.away = true;
  }
}
