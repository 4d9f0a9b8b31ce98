/**
 * One connection of the blob path's agent (raw-get.ts): HTTP/1.1 over a `net` or `tls` socket
 * created with `onread`, one GET at a time. Each socket read goes into the request's receive
 * slabs (receive-slabs.ts), and the response is parsed by http-parser-js (status, headers,
 * Content-Length, chunked or read-until-close bodies), whose body callbacks hand out views of
 * the buffer they were given: no copy. The views go to the response's body (raw-body.ts); the
 * socket stops reading while the body's consumer is behind. The timeouts (connect, headers, a
 * body's silence, its last byte's) are kept here, and the failures made here carry the codes
 * undici's would (`UND_ERR_*`).
 */
import { once } from 'node:events';
import net from 'node:net';
import tls from 'node:tls';
import { HTTPParser } from 'http-parser-js';
import { codedError } from './errors.js';
import { RawBody } from './raw-body.js';
import { ReceiveSlabs } from './receive-slabs.js';

export interface RawTimeouts {
  /** Until the connection is made (and TLS set up), ms. */
  connect: number;
  /** From the request written to the response's headers, ms. */
  headers: number;
  /** Longest silence while the body is expected, ms. */
  bodyIdle: number;
  /**
   * Longest silence before the last byte of a body of known length, once every other byte came,
   * ms (bodyIdle when unset): a peer holds that byte back until its blob is stored (fleet/).
   */
  lastByteIdle?: number;
}

export interface RawGetOptions {
  headers: Record<string, string>;
  signal?: AbortSignal | null | undefined;
  /** Where the body is read into; a pool of its own otherwise (never reused then). */
  slabs?: ReceiveSlabs | undefined;
}

export interface RawResponse {
  statusCode: number;
  /** Lower-case names; a repeated header is an array. */
  headers: Record<string, string | string[] | undefined>;
  body: RawBody;
}

/** Reads with no request to take them (a connection between requests) land here. */
const SCRATCH = Buffer.allocUnsafeSlow(64 * 1024);

/** One request on a connection: its parser's callbacks, its body, its timers. */
export interface Exchange {
  slabs: ReceiveSlabs;
  resolve: (res: RawResponse) => void;
  reject: (err: unknown) => void;
  body: RawBody | undefined;
  headersTimer: NodeJS.Timeout | undefined;
  onAbort: () => void;
  signal: AbortSignal | null | undefined;
  /** Body bytes still to come, when the response gave its length. */
  remaining?: number;
}

/** One socket to an origin, one request on it at a time; parked with the agent between them. */
export class Connection {
  readonly origin: string;
  /** True once a byte of a response came: a request that failed after it is not sent again. */
  answered = false;
  private readonly socket: net.Socket;
  private readonly parser = new HTTPParser(HTTPParser.RESPONSE);
  private exchange: Exchange | undefined;
  /** The exchange whose slab the pending read goes into; any other read is copied out. */
  private readingFor: Exchange | undefined;
  private onIdleGone: (() => void) | undefined;
  private dead = false;

  constructor(
    url: URL,
    private readonly timeouts: RawTimeouts,
    private readonly park: (c: Connection) => void,
  ) {
    this.origin = url.origin;
    const host = url.hostname.replace(/^\[(.*)\]$/, '$1');
    const port = Number(url.port || (url.protocol === 'https:' ? 443 : 80));
    const onread = {
      buffer: () => this.space(),
      callback: (n: number, buf: Buffer) => this.onRead(n, buf),
    };
    this.socket =
      url.protocol === 'https:'
        ? // `onread` is documented for tls.connect too; @types/node lacks it.
          tls.connect({
            host,
            port,
            onread,
            ALPNProtocols: ['http/1.1'],
            ...(net.isIP(host) ? {} : { servername: host }),
          } as tls.ConnectionOptions)
        : net.connect({ host, port, onread });
    this.socket.setNoDelay(true);
    this.socket.on('error', (err) => this.fail(err));
    this.socket.on('close', () => this.onClose());
    this.socket.on('timeout', () => this.onTimeout());
    this.parser[HTTPParser.kOnHeadersComplete] = (info) => this.onHeaders(info);
    this.parser[HTTPParser.kOnBody] = (chunk) => this.onBody(chunk);
    this.parser[HTTPParser.kOnMessageComplete] = () => this.onComplete();
  }

  async connect(signal: AbortSignal | null | undefined): Promise<void> {
    const ready = this.socket instanceof tls.TLSSocket ? 'secureConnect' : 'connect';
    // A timeout of 0 is none, as undici takes it for the other requests.
    const timeout =
      this.timeouts.connect > 0 ? AbortSignal.timeout(this.timeouts.connect) : undefined;
    const signals = [signal, timeout].filter((s): s is AbortSignal => !!s);
    try {
      await once(
        this.socket,
        ready,
        signals.length > 0 ? { signal: AbortSignal.any(signals) } : {},
      );
    } catch (err) {
      this.destroy();
      if (signal?.aborted) throw signal.reason;
      if (timeout?.aborted)
        throw codedError('UND_ERR_CONNECT_TIMEOUT', `connect timed out: ${this.origin}`);
      throw err; // the socket's error
    }
  }

  request(url: URL, options: RawGetOptions): Promise<RawResponse> {
    this.onIdleGone?.();
    this.onIdleGone = undefined;
    this.socket.setTimeout(0);
    this.socket.ref();
    this.answered = false;
    this.informational = false;
    if (this.dead) return Promise.reject(codedError('UND_ERR_SOCKET', 'connection closed'));
    if (options.signal?.aborted) {
      // Aborted between the connect and now: nothing was sent.
      this.destroy();
      return Promise.reject(options.signal.reason as Error);
    }
    this.parser.initialize(HTTPParser.RESPONSE);
    return new Promise<RawResponse>((resolve, reject) => {
      const exchange: Exchange = {
        slabs: options.slabs ?? new ReceiveSlabs(),
        resolve,
        reject,
        body: undefined,
        headersTimer:
          this.timeouts.headers > 0
            ? setTimeout(
                () =>
                  this.fail(
                    codedError('UND_ERR_HEADERS_TIMEOUT', `no headers from ${this.origin}`),
                  ),
                this.timeouts.headers,
              )
            : undefined,
        onAbort: () => this.fail(options.signal!.reason),
        signal: options.signal,
      };
      this.exchange = exchange;
      options.signal?.addEventListener('abort', exchange.onAbort, { once: true });
      let head = `GET ${url.pathname}${url.search} HTTP/1.1\r\nhost: ${url.host}\r\n`;
      for (const [name, value] of Object.entries(options.headers)) head += `${name}: ${value}\r\n`;
      this.socket.write(`${head}\r\n`, 'latin1');
    });
  }

  destroy(err?: Error): void {
    this.dead = true;
    this.socket.destroy(err);
  }

  /** Parked: closes after `ms` with no request, or when the server closes it. */
  idleUntilTaken(ms: number, gone: () => void): void {
    this.onIdleGone = gone;
    this.socket.setTimeout(ms);
    this.socket.unref(); // a kept connection does not keep the process alive
  }

  /** Where the next read goes: the exchange's slabs, or the scratch buffer between requests. */
  private space(): Buffer {
    const exchange = this.exchange;
    this.readingFor = exchange;
    return exchange ? exchange.slabs.space() : SCRATCH;
  }

  private onRead(n: number, buf: Buffer): boolean {
    const exchange = this.exchange;
    const own = exchange !== undefined && this.readingFor === exchange;
    if (own) exchange.slabs.filled(n);
    if (!exchange) {
      // Bytes nobody asked for, on a connection between requests.
      this.destroy();
      return false;
    }
    this.answered = true;
    this.copyBody = !own;
    const result = this.parser.execute(buf, 0, n);
    // Once a response ends inside a read, http-parser-js counts the whole read toward the next
    // response's headers ('max header size exceeded' after a large last read): the error of a
    // response that has ended is not this one's. The next request starts the parser afresh.
    if (result instanceof Error && this.exchange === exchange) {
      this.fail(
        codedError('HPE_INVALID', `malformed response from ${this.origin}: ${result.message}`),
      );
      return false;
    }
    return this.exchange?.body?.paused !== true;
  }

  /** Body views of a read that is not the exchange's own slab are copied (it is reused). */
  private copyBody = false;
  /** The message being parsed is a 1xx, to be skipped. */
  private informational = false;

  private onHeaders(info: {
    statusCode: number;
    headers: string[];
    versionMajor: number;
    versionMinor: number;
    shouldKeepAlive: boolean;
  }): void {
    const exchange = this.exchange;
    if (!exchange) return;
    if (info.statusCode >= 100 && info.statusCode < 200) {
      // 100 Continue, 103 Early Hints: not the answer, which follows on the same connection.
      this.informational = true;
      return;
    }
    clearTimeout(exchange.headersTimer);
    const headers: Record<string, string | string[] | undefined> = {};
    for (let i = 0; i + 1 < info.headers.length; i += 2) {
      const name = info.headers[i]!.toLowerCase();
      const value = info.headers[i + 1]!;
      const had = headers[name];
      headers[name] =
        had === undefined ? value : Array.isArray(had) ? [...had, value] : [had, value];
    }
    const body = new RawBody(this, exchange, info.shouldKeepAlive);
    exchange.body = body;
    const length = Number(headers['content-length']);
    if (typeof headers['content-length'] === 'string' && Number.isSafeInteger(length))
      exchange.remaining = length;
    this.socket.setTimeout(this.bodyIdle(exchange));
    exchange.resolve({ statusCode: info.statusCode, headers, body });
  }

  private onBody(chunk: Buffer): void {
    const exchange = this.exchange;
    if (!exchange?.body) return;
    exchange.body.push(this.copyBody ? Buffer.from(chunk) : exchange.slabs.lend(chunk));
    if (exchange.remaining !== undefined) {
      exchange.remaining -= chunk.length;
      if (exchange.remaining === 1 && this.timeouts.lastByteIdle !== undefined)
        this.socket.setTimeout(this.bodyIdle(exchange));
    }
  }

  /** The silence allowed now while `exchange`'s body is expected. */
  private bodyIdle(exchange: Exchange): number {
    return exchange.remaining === 1
      ? (this.timeouts.lastByteIdle ?? this.timeouts.bodyIdle)
      : this.timeouts.bodyIdle;
  }

  private onComplete(): void {
    const exchange = this.exchange;
    if (!exchange) return;
    if (this.informational) {
      this.informational = false; // the parser starts on the real response
      return;
    }
    this.endExchange(exchange);
    // Its slab goes back to the spare buffers once the fetch is done with it: this connection's
    // next read is asked for after this callback, with no exchange, so it goes to SCRATCH.
    exchange.slabs.done();
    const reusable = exchange.body?.keepAlive === true && !this.dead;
    exchange.body?.finish({ kind: 'end' });
    if (!reusable) {
      this.destroy();
      return;
    }
    // Reading may have been stopped for this body's consumer (over TLS, one encrypted read can
    // end the body after a piece that asked for a pause): a kept connection reads again.
    this.socket.resume();
    this.park(this);
  }

  private endExchange(exchange: Exchange): void {
    clearTimeout(exchange.headersTimer);
    exchange.signal?.removeEventListener('abort', exchange.onAbort);
    this.socket.setTimeout(0);
    if (this.exchange === exchange) this.exchange = undefined;
  }

  /**
   * The exchange fails with `err` (before its headers: its request rejects), and the
   * connection goes.
   */
  fail(err: unknown): void {
    const exchange = this.exchange;
    this.destroy();
    if (!exchange) return;
    this.endExchange(exchange);
    if (exchange.body) exchange.body.finish({ kind: 'error', error: err });
    else exchange.reject(err);
  }

  private onClose(): void {
    this.dead = true;
    this.onIdleGone?.();
    this.onIdleGone = undefined;
    const exchange = this.exchange;
    if (!exchange) return;
    // A body that runs until the connection closes ends here; any other is cut short.
    if (exchange.body) this.parser.finish();
    if (this.exchange === exchange)
      this.fail(codedError('UND_ERR_SOCKET', `${this.origin} closed the connection`));
  }

  private onTimeout(): void {
    const body = this.exchange?.body;
    if (!this.exchange) {
      this.destroy(); // idle past its time
      return;
    }
    if (body?.paused) return; // our consumer is behind, not the server
    this.fail(codedError('UND_ERR_BODY_TIMEOUT', `${this.origin} sent nothing for too long`));
  }

  /** Reads again for `exchange`'s consumer, if the connection is still on it. */
  resumeFor(exchange: Exchange): void {
    if (this.dead || this.exchange !== exchange) return;
    this.socket.setTimeout(this.bodyIdle(exchange));
    this.socket.resume();
  }
}
