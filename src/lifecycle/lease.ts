/**
 * The lifecycle's lease across hosts: with `cache.store: redis`, replicas that share one storage
 * (an S3 bucket) take turns managing it through one Redis key, `SET NX PX` to take it and a
 * compare-and-renew script to keep it, so that exactly one of them evicts and collects at a time.
 * The owner record in storage (owner.ts) is then only where the commands find the server.
 */
import { randomUUID } from 'node:crypto';
import { hostname } from 'node:os';
import type { Logger } from '../log/logger.js';

export interface Lease {
  /** Takes the lease when free, renews it when held; resolves to whether it is held. */
  acquire(ttlMs: number): Promise<boolean>;
  /** Gives it up when held. */
  release(): Promise<void>;
  close(): Promise<void>;
}

/** How long a first connection may take before the lease counts as not held. */
const CONNECT_TIMEOUT_MS = 3000;

/** Renews the key only while it still holds our token; 1 when renewed. */
export const RENEW = `if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0`;
/** Deletes the key only while it still holds our token. */
export const RELEASE = `if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0`;

export interface MinimalRedis {
  isOpen: boolean;
  connect(): Promise<unknown>;
  set(key: string, value: string, options: { NX?: true; PX: number }): Promise<string | null>;
  get(key: string): Promise<string | null>;
  eval(script: string, options: { keys: string[]; arguments: string[] }): Promise<unknown>;
  close?(): Promise<unknown>;
  quit?(): Promise<unknown>;
  destroy?(): void;
  disconnect?(): unknown;
  on(event: 'error', listener: (err: Error) => void): unknown;
}

/**
 * A Redis client for leases, connected: a command while disconnected fails at once instead of
 * waiting in a queue (the lease is then not held, or not asked), and a Redis that does not
 * answer fails the connection within seconds.
 */
export function connectRedis(url: string, log: Logger, what: string): Promise<MinimalRedis> {
  return import('@keyv/redis').then(async ({ createClient }) => {
    const client = createClient({
      url,
      disableOfflineQueue: true,
      socket: { connectTimeout: 2000, reconnectStrategy: (n: number) => Math.min(n * 200, 5000) },
    }) as unknown as MinimalRedis;
    client.on('error', (err) => log.debug({ err: err.message }, `${what} redis error`));
    // connect() waits through reconnections: bound it.
    let timer: NodeJS.Timeout | undefined;
    try {
      await Promise.race([
        client.connect(),
        new Promise((_, reject) => {
          timer = setTimeout(() => reject(new Error('redis did not answer')), CONNECT_TIMEOUT_MS);
        }),
      ]);
    } catch (err) {
      (client.destroy ?? client.disconnect)?.call(client);
      throw err;
    } finally {
      clearTimeout(timer);
    }
    return client;
  });
}

export class RedisLease implements Lease {
  /** Who we are in the key: host, pid and a random part (a restarted pid is someone else). */
  readonly token = `${hostname()}:${process.pid}:${randomUUID()}`;
  private client: Promise<MinimalRedis> | undefined;

  constructor(
    private readonly url: string,
    /** One key per storage: several caches may share one Redis. */
    readonly key: string,
    private readonly log: Logger,
  ) {}

  private connect(): Promise<MinimalRedis> {
    // The lifecycle's scan asks for the lease first: a Redis that is not there must not hold it.
    this.client ??= connectRedis(this.url, this.log, 'lease');
    this.client.catch(() => {
      this.client = undefined;
    });
    return this.client;
  }

  async acquire(ttlMs: number): Promise<boolean> {
    const client = await this.connect();
    if ((await client.set(this.key, this.token, { NX: true, PX: ttlMs })) === 'OK') return true;
    const renewed = await client.eval(RENEW, {
      keys: [this.key],
      arguments: [this.token, String(ttlMs)],
    });
    return Number(renewed) === 1;
  }

  async release(): Promise<void> {
    if (!this.client) return;
    const client = await this.connect();
    await client.eval(RELEASE, { keys: [this.key], arguments: [this.token] });
  }

  async close(): Promise<void> {
    const client = await this.client?.catch(() => undefined);
    this.client = undefined;
    if (!client?.isOpen) return;
    await (client.close ?? client.quit)?.call(client).catch(() => {});
  }
}
