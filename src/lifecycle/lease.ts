/**
 * The lifecycle's lease across hosts: with `cache.store: redis`, replicas that share one storage
 * (an S3 bucket) take turns managing it through one Redis key, `SET NX PX` to take it and a
 * compare-and-renew script to keep it, so that exactly one of them evicts and collects at a time.
 * The owner record in storage (owner.ts) is then only where the commands find the server.
 */
import { randomUUID } from 'node:crypto';
import { hostname } from 'node:os';
import { TimedOutError, within } from '../abort.js';
import type { Logger } from '../log/logger.js';

export interface Lease {
  /** Takes the lease when free, renews it when held; resolves to whether it is held. */
  acquire(ttlMs: number): Promise<boolean>;
  /** Gives it up when held. */
  release(): Promise<void>;
}

/** How long a first connection may take before the lease counts as not held. */
const CONNECT_TIMEOUT_MS = 3000;
/**
 * How long the commands of one use of the connection (`LeaseRedis.run`) may wait for their
 * answers. A Redis that stops answering without closing the connection (a host lost, a failover,
 * a stopped process) would otherwise hold every claim, and the cold blob waiting on it, until TCP
 * gives up, minutes later. (node-redis's own command timeout stops counting once a command is
 * written.)
 */
export const COMMAND_TIMEOUT_MS = 2000;

/** Renews the key only while it still holds our token; 1 when renewed. */
export const RENEW = `if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0`;
/** Sets the key to ARGV[2] for ARGV[3] ms only while it still holds ARGV[1]; 'OK' when set. */
export const REPLACE = `if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('set', KEYS[1], ARGV[2], 'PX', ARGV[3])
end
return false`;
/** Deletes the key only while it still holds our token. */
export const RELEASE = `if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0`;

export interface MinimalRedis {
  isOpen: boolean;
  connect(): Promise<unknown>;
  set(key: string, value: string, options: { NX: true; PX: number }): Promise<string | null>;
  get(key: string): Promise<string | null>;
  eval(script: string, options: { keys: string[]; arguments: string[] }): Promise<unknown>;
  publish(channel: string, message: string): Promise<number>;
  close?(): Promise<unknown>;
  quit?(): Promise<unknown>;
  destroy?(): void;
  disconnect?(): unknown;
  on(event: 'error', listener: (err: Error) => void): unknown;
}

/**
 * The socket of every connection to Redis (this one, the forget channel's subscriber and the
 * metadata cache's): a connection attempt bounded, and reconnections backing off up to 5 s. A
 * new object each time: node-redis writes the URL's host, port and TLS into the one it is given.
 */
export const redisSocket = () => ({
  connectTimeout: 2000,
  reconnectStrategy: (n: number) => Math.min(n * 200, 5000),
});

/** Drops a connection at once, whatever it was waiting for. */
function drop(client: MinimalRedis): void {
  (client.destroy ?? client.disconnect)?.call(client);
}

/** How long a Redis that did not answer is taken for unreachable before it is tried again. */
const RETRY_MS = 10_000;

/**
 * The Redis client of a process's leases (the lifecycle's and the replicas' fetch leases), one
 * connection for both, made at first use. A command while disconnected fails at once instead of
 * waiting in a queue (the lease is then not held, or not asked). A Redis that does not answer
 * fails the connection within seconds, and is not asked again for RETRY_MS: a fetch lease is
 * asked for each cold blob, which would otherwise wait out a connection timeout each. Commands
 * that get no answer fail after COMMAND_TIMEOUT_MS, and the connection is then dropped and taken
 * for unreachable the same way.
 */
export class LeaseRedis {
  private client: Promise<MinimalRedis> | undefined;
  /** Until when Redis is taken for unreachable (its last connection attempt failed). */
  private downUntil = 0;

  private readonly commandTimeoutMs: number;
  private readonly retryMs: number;

  constructor(
    private readonly url: string,
    private readonly log: Logger,
    /** The waits, for tests: COMMAND_TIMEOUT_MS and RETRY_MS otherwise. */
    timing: { commandTimeoutMs?: number; retryMs?: number } = {},
  ) {
    this.commandTimeoutMs = timing.commandTimeoutMs ?? COMMAND_TIMEOUT_MS;
    this.retryMs = timing.retryMs ?? RETRY_MS;
  }

  connect(): Promise<MinimalRedis> {
    if (Date.now() < this.downUntil)
      return Promise.reject(new Error('redis did not answer; asked again shortly'));
    if (!this.client) {
      this.client = connectRedis(this.url, this.log);
      this.client.catch(() => {
        this.client = undefined;
        this.downUntil = Date.now() + this.retryMs;
      });
    }
    return this.client;
  }

  /**
   * Runs `work`'s commands on the connection; rejects when they get no answer within
   * COMMAND_TIMEOUT_MS, and the connection is then dropped (a new one is made after RETRY_MS).
   */
  async run<T>(work: (client: MinimalRedis) => Promise<T>): Promise<T> {
    const connecting = this.connect();
    const client = await connecting;
    try {
      return await within(work(client), this.commandTimeoutMs, 'redis did not answer');
    } catch (err) {
      if (err instanceof TimedOutError) {
        // Timed out: this connection gets no answers. Later uses fail at once until RETRY_MS.
        if (this.client === connecting) {
          this.client = undefined;
          this.downUntil = Date.now() + this.retryMs;
          this.log.warn(
            { timeoutMs: this.commandTimeoutMs },
            'redis stopped answering: reconnecting',
          );
        }
        drop(client);
      }
      throw err;
    }
  }

  /** Whether a connection was ever asked for (and not given up since). */
  get started(): boolean {
    return this.client !== undefined;
  }

  async close(): Promise<void> {
    const client = await this.client?.catch(() => undefined);
    this.client = undefined;
    if (client?.isOpen) await (client.close ?? client.quit)?.call(client).catch(() => {});
  }
}

function connectRedis(url: string, log: Logger): Promise<MinimalRedis> {
  return import('@keyv/redis').then(async ({ createClient }) => {
    const client = createClient({
      url,
      disableOfflineQueue: true,
      socket: redisSocket(),
    }) as unknown as MinimalRedis;
    client.on('error', (err) => log.debug({ err: err.message }, 'lease redis error'));
    // connect() waits through reconnections: bound it.
    try {
      await within(client.connect(), CONNECT_TIMEOUT_MS, 'redis did not answer');
    } catch (err) {
      drop(client);
      throw err;
    }
    return client;
  });
}

export class RedisLease implements Lease {
  /** Who we are in the key: host, pid and a random part (a restarted pid is someone else). */
  readonly token = `${hostname()}:${process.pid}:${randomUUID()}`;

  constructor(
    /** Its connection, closed by whoever made it (the runtime). */
    private readonly redis: LeaseRedis,
    /** One key per storage: several caches may share one Redis. */
    readonly key: string,
  ) {}

  async acquire(ttlMs: number): Promise<boolean> {
    // The lifecycle's scan asks for the lease first: a Redis that is not there fails it within
    // seconds (LeaseRedis), and the lease is then not held.
    return this.redis.run(async (client) => {
      if ((await client.set(this.key, this.token, { NX: true, PX: ttlMs })) === 'OK') return true;
      const renewed = await client.eval(RENEW, {
        keys: [this.key],
        arguments: [this.token, String(ttlMs)],
      });
      return Number(renewed) === 1;
    });
  }

  async release(): Promise<void> {
    if (!this.redis.started) return;
    await this.redis.run((client) =>
      client.eval(RELEASE, { keys: [this.key], arguments: [this.token] }),
    );
  }
}
