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
 */
import type { IncomingMessage } from 'node:http';
import type { Socket } from 'node:net';
import type { Logger } from '../log/logger.js';

interface Watched {
  bytes: number;
  since: number;
  path: string | undefined;
}

export class BodyIdleWatch {
  private readonly watched = new Map<Socket, Watched>();
  private timer: NodeJS.Timeout | undefined;

  /** `idleMs` 0: no limit. */
  constructor(
    private readonly idleMs: number,
    private readonly log: Logger,
  ) {}

  /** Watches the body of `req`, if it has one, until it has come whole or the request is gone. */
  watch(req: IncomingMessage): void {
    if (this.idleMs <= 0 || !hasBody(req)) return;
    const socket = req.socket;
    this.watched.set(socket, { bytes: socket.bytesRead, since: Date.now(), path: req.url });
    const done = () => this.watched.delete(socket);
    req.once('end', done);
    req.once('close', done);
    this.timer ??= setInterval(() => this.check(), Math.max(50, this.idleMs / 4)).unref();
  }

  private check(): void {
    const now = Date.now();
    for (const [socket, body] of this.watched) {
      if (socket.bytesRead !== body.bytes) {
        body.bytes = socket.bytesRead;
        body.since = now;
      } else if (now - body.since >= this.idleMs) {
        this.watched.delete(socket);
        this.log.info(
          { client: socket.remoteAddress, path: body.path, idleMs: now - body.since },
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

function hasBody(req: IncomingMessage): boolean {
  return (
    req.headers['transfer-encoding'] !== undefined || Number(req.headers['content-length']) > 0
  );
}
