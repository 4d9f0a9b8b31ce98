/**
 * Blob GETs on sockets of pullcache's own, read into reused buffers (receive-slabs.ts) instead
 * of a new 64 KiB buffer per socket read. Everything else the client asks (manifests, tags,
 * tokens, HEADs) stays on undici; this is only the path a cold GiB takes.
 *
 * This file is the agent: connections are kept alive per origin (the registry's 401 and 307,
 * the object store's 200s) and a request on a kept connection that the server had closed is
 * sent once more on a new one. One connection's HTTP/1.1 (the request, the response's head and
 * framing, the timeouts) is raw-connection.ts; the body as its consumer reads it, views of the
 * receive buffers, is raw-body.ts. Redirects and auth are the transport's (transport.ts,
 * auth.ts), resuming a broken body the client's (blob-get.ts); the errors carry the codes
 * undici's would (`UND_ERR_*`), so that the transport tells a broken connection from a refusal
 * the same way for both.
 *
 * The body is paused, not cut, when its consumer falls behind (raw-body.ts). (Blob bodies on
 * undici 7 had to flow all the time: it crashes the process with an uncatchable
 * `assert(!this.paused)` when a `Connection: close` response ends while its parser is paused,
 * nodejs/undici#5360.)
 */
import {
  Connection,
  type RawGetOptions,
  type RawResponse,
  type RawTimeouts,
} from './raw-connection.js';

/** Idle connections kept per origin, and for how long. */
const IDLE_PER_ORIGIN = 8;
const IDLE_MS = 30_000;

/** How a kept connection the server has closed fails a request sent on it. */
const CLOSED = new Set(['UND_ERR_SOCKET', 'ECONNRESET', 'EPIPE']);

/** Blob GETs, on connections kept per origin. */
export class RawAgent {
  private readonly idle = new Map<string, Connection[]>();
  private closed = false;

  constructor(private readonly timeouts: RawTimeouts) {}

  /** One GET; resolves with the status and headers, the body to be read from `body`. */
  async get(url: URL, options: RawGetOptions): Promise<RawResponse> {
    for (const value of Object.values(options.headers))
      if (/[\r\n]/.test(value)) throw new Error('header value with a line break');
    options.signal?.throwIfAborted();
    const kept = this.takeIdle(url.origin);
    if (kept) {
      try {
        return await kept.request(url, options);
      } catch (err) {
        // The server had closed the kept connection (or closed it as the request came): ask
        // on a new one. A server that took the request and said nothing is not asked twice.
        const code = (err as { code?: string }).code;
        if (!kept.answered && !options.signal?.aborted && code !== undefined && CLOSED.has(code))
          return this.fresh(url, options);
        throw err;
      }
    }
    return this.fresh(url, options);
  }

  /** Closes the kept connections; requests under way finish on theirs. */
  close(): void {
    this.closed = true;
    for (const list of this.idle.values()) for (const c of list) c.destroy();
    this.idle.clear();
  }

  private async fresh(url: URL, options: RawGetOptions): Promise<RawResponse> {
    const connection = new Connection(url, this.timeouts, (c) => this.park(c));
    await connection.connect(options.signal);
    return connection.request(url, options);
  }

  private takeIdle(origin: string): Connection | undefined {
    const list = this.idle.get(origin);
    const connection = list?.pop();
    if (list?.length === 0) this.idle.delete(origin);
    return connection;
  }

  private park(connection: Connection): void {
    const list = this.idle.get(connection.origin) ?? [];
    if (this.closed || list.length >= IDLE_PER_ORIGIN) {
      connection.destroy();
      return;
    }
    list.push(connection);
    this.idle.set(connection.origin, list);
    connection.idleUntilTaken(IDLE_MS, () => {
      const current = this.idle.get(connection.origin);
      const at = current?.indexOf(connection) ?? -1;
      if (at >= 0) current!.splice(at, 1);
      if (current?.length === 0) this.idle.delete(connection.origin);
    });
  }
}
