/**
 * Request bodies that stop coming. Node bounds a whole request, body included, by its
 * `requestTimeout` (300 s by default): a push through a passthrough upstream of a layer that takes
 * longer to send was cut with a 408 while its bytes were still flowing. server.ts turns that off,
 * and this cuts instead a body that brings no byte for `server.bodyIdleTimeout`: a client that
 * sends less than its Content-Length, or stops half-way, holds its connection no longer than
 * that. The request line and headers keep Node's own limit (`headersTimeout`, 60 s).
 *
 * The bytes are counted on the socket (`bytesRead`), every quarter of the timeout, so that
 * nothing reads the body but its route, and Node's own socket timers (keep-alive) are left alone.
 * A body whose reader pushes back is not idle while its answer is under way, nor one that has
 * come whole. Over HTTPS the count moves a TLS record (up to 16 KiB) at a time: a body slower
 * than that per timeout looks idle.
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { Logger } from '../log/logger.js';

interface Watched {
  bytes: number;
  since: number;
  res: ServerResponse;
}

export class BodyIdleWatch {
  /** By request: on a socket with requests pipelined, each its own. */
  private readonly watched = new Map<IncomingMessage, Watched>();
  private timer: NodeJS.Timeout | undefined;

  /** `idleMs` 0: no limit. */
  constructor(
    private readonly idleMs: number,
    private readonly log: Logger,
  ) {}

  /** Watches the body of `req`, if it has one, until it has come whole or the request is gone. */
  watch(req: IncomingMessage, res: ServerResponse): void {
    if (this.idleMs <= 0 || !hasBody(req)) return;
    this.watched.set(req, { bytes: req.socket.bytesRead, since: performance.now(), res });
    const done = () => this.watched.delete(req);
    req.once('end', done);
    req.once('close', done);
    this.timer ??= setInterval(() => this.check(), Math.max(50, this.idleMs / 4)).unref();
  }

  private check(): void {
    const now = performance.now();
    for (const [req, body] of this.watched) {
      const socket = req.socket;
      if (req.complete) {
        // Every byte came; whether its route reads them is no matter of the client's.
        this.watched.delete(req);
      } else if (socket.bytesRead !== body.bytes || pushedBack(req, body.res)) {
        body.bytes = socket.bytesRead;
        body.since = now;
      } else if (now - body.since >= this.idleMs) {
        this.watched.delete(req);
        this.log.info(
          { client: socket.remoteAddress, path: req.url, idleMs: Math.round(now - body.since) },
          'request body stalled: connection closed (server.bodyIdleTimeout)',
        );
        socket.destroy();
      }
    }
    if (this.watched.size === 0) {
      clearInterval(this.timer);
      this.timer = undefined;
    }
  }

  stop(): void {
    clearInterval(this.timer);
    this.timer = undefined;
    this.watched.clear();
  }
}

/**
 * Its reader is not taking the bytes (a passthrough upstream slower than the client, a route that
 * has not read them yet): the socket is not read then, and the silence is not the client's. Only
 * until the answer has ended: after it nothing reads the body but Node's drain, and a reader that
 * stopped for good (an upstream cut by its own idle timeout, passthrough.ts: `timeouts.headers`)
 * may have left it paused.
 */
function pushedBack(req: IncomingMessage, res: ServerResponse): boolean {
  return !res.writableEnded && (req.readableFlowing === false || req.readableLength > 0);
}

function hasBody(req: IncomingMessage): boolean {
  return (
    req.headers['transfer-encoding'] !== undefined || Number(req.headers['content-length']) > 0
  );
}
