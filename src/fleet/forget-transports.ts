/**
 * The two ways a process's forget messages (forget.ts) reach the other processes on its storage:
 * - `IpcForgetTransport`, the workers of one host, over the cluster's IPC channel through the
 *   primary (primary.ts passes each `ForgetMessage` on to every other worker);
 * - `RedisForgetTransport`, the processes sharing a Redis: PUBLISH on a channel per storage, and a
 *   SUBSCRIBE on a connection of its own, renewed when it breaks or stops answering a ping.
 * A message received is checked before it is delivered: anything that is not ours is ignored.
 */
import { randomUUID } from 'node:crypto';
import type { Logger } from '../log/logger.js';
import { within } from '../abort.js';
import { COMMAND_TIMEOUT_MS, redisSocket, type LeaseRedis } from '../lifecycle/lease.js';
import type { ForgetTransport, Forgotten } from './forget.js';

/** The IPC message, worker -> primary -> every other worker. */
export interface ForgetMessage {
  pullcache: 'forget';
  keys: Forgotten;
}

export function isForgetMessage(message: unknown): message is ForgetMessage {
  return (
    typeof message === 'object' &&
    message !== null &&
    (message as { pullcache?: unknown }).pullcache === 'forget' &&
    isForgotten((message as { keys?: unknown }).keys)
  );
}

/** Keys in memory are short strings; anything else in a message is not ours, and is ignored. */
function isForgotten(keys: unknown): keys is Forgotten {
  return (
    keys === 'all' ||
    (Array.isArray(keys) && keys.every((k) => typeof k === 'string' && k.length <= 2048))
  );
}

/** How often the subscription is pinged, to find a connection that no longer answers. */
const SUBSCRIBER_PING_MS = 10_000;

/** The IPC channel of a cluster worker, as this module needs it. */
export interface WorkerChannel {
  readonly connected: boolean;
  send(message: ForgetMessage): void;
  onMessage(listener: (message: unknown) => void): void;
}

/** Workers of one host: through the primary, which passes each message on to the others. */
export class IpcForgetTransport implements ForgetTransport {
  readonly name = 'ipc';

  constructor(private readonly channel: WorkerChannel) {}

  send(keys: Forgotten): Promise<void> {
    // A worker whose primary is gone is stopping: nobody is left to tell.
    if (this.channel.connected) this.channel.send({ pullcache: 'forget', keys });
    return Promise.resolve();
  }

  listen(receive: (keys: Forgotten, missed?: boolean) => void): void {
    this.channel.onMessage((message) => {
      if (isForgetMessage(message)) receive(message.keys);
    });
  }

  close(): Promise<void> {
    return Promise.resolve();
  }
}

/** The subscriber's side of a node-redis client, as this module needs it. */
interface Subscriber {
  connect(): Promise<unknown>;
  sendCommand(args: string[]): Promise<unknown>;
  subscribe(channel: string, listener: (message: string) => void): Promise<unknown>;
  destroy(): void;
  on(event: 'error', listener: (err: Error) => void): unknown;
  on(event: 'ready', listener: () => void): unknown;
}

/** Processes sharing a Redis: one channel per storage. */
export class RedisForgetTransport implements ForgetTransport {
  readonly name = 'redis';
  /** Who we are on the channel: our own messages come back to us, and are passed over. */
  private readonly from = randomUUID();
  private subscriber: Subscriber | undefined;
  private closed = false;
  private watchdog: NodeJS.Timeout | undefined;

  constructor(
    /** The process's lease connection publishes (it fails at once while Redis is down). */
    private readonly redis: LeaseRedis,
    private readonly url: string,
    private readonly channel: string,
    private readonly log: Logger,
    /** How often the subscription is pinged, and how long an answer may take (ms). */
    private readonly ping = { everyMs: SUBSCRIBER_PING_MS, timeoutMs: COMMAND_TIMEOUT_MS },
  ) {}

  async send(keys: Forgotten): Promise<void> {
    await this.redis.run((client) =>
      client.publish(this.channel, JSON.stringify({ from: this.from, keys })),
    );
  }

  listen(receive: (keys: Forgotten, missed?: boolean) => void): void {
    const log = this.log.child({ module: 'forget' });
    void import('@keyv/redis').then(({ createClient }) => {
      /**
       * A connection of its own: a subscribed connection takes no other command. It keeps trying
       * to connect (and resubscribes) for as long as the process runs. `missed`: events were
       * lost before it (a connection given up on), not only if one fails later.
       */
      const subscribe = (missedBefore: boolean) => {
        if (this.closed) return;
        const subscriber = createClient({
          url: this.url,
          socket: redisSocket(),
        }) as unknown as Subscriber;
        this.subscriber = subscriber;
        // Connected again after a break (or for the first time): whatever was said meanwhile is
        // lost, so everything held in memory goes. Events were missed too, unless this is the
        // first connection and nothing failed before it (Redis down at start loses them as well).
        let missed = missedBefore;
        subscriber.on('error', (err) => {
          missed = true;
          log.debug({ err: err.message }, 'forget channel error');
        });
        subscriber.on('ready', () => {
          receive('all', missed);
          missed = true;
        });
        void (async () => {
          try {
            await subscriber.connect();
            await subscriber.subscribe(this.channel, (text) => {
              const keys = this.parse(text);
              if (keys) receive(keys);
            });
          } catch (err) {
            if (!this.closed && this.subscriber === subscriber)
              log.warn({ err: (err as Error).message }, 'forget channel not subscribed');
          }
        })();
      };
      subscribe(false);
      // A Redis that stops answering on an open connection (a lost host, a failover) would leave
      // the subscription silent for good: one that does not answer a ping is made anew.
      this.watchdog = setInterval(() => {
        const subscriber = this.subscriber;
        if (!subscriber || this.closed) return;
        // A ping that fails (not connected) is answered too: its own reconnection goes on.
        const answer = subscriber.sendCommand(['PING']).catch(() => {});
        void within(answer, this.ping.timeoutMs, 'no answer').catch(() => {
          if (this.closed || this.subscriber !== subscriber) return;
          log.warn(
            { timeoutMs: this.ping.timeoutMs },
            'forget channel stopped answering: reconnecting',
          );
          subscriber.destroy();
          subscribe(true);
        });
      }, this.ping.everyMs);
      this.watchdog.unref();
    });
  }

  private parse(text: string): Forgotten | undefined {
    try {
      const message = JSON.parse(text) as { from?: unknown; keys?: unknown };
      if (message.from === this.from || !isForgotten(message.keys)) return undefined;
      return message.keys;
    } catch {
      return undefined;
    }
  }

  close(): Promise<void> {
    this.closed = true;
    clearInterval(this.watchdog);
    this.subscriber?.destroy();
    return Promise.resolve();
  }
}
