/**
 * What every client request adds to the metrics when its answer ends (or is cut): its kind,
 * method, status and duration; for a GET of a manifest or blob answered with its content, the
 * bytes served from the cache or the upstream (and distribution's proxy counters); for a request
 * pullcache refused (a 4xx other than 404, and other than a 401 challenge to a request that sent
 * no credentials), an entry in the recent events with its reason.
 * Both paths use it: express through `middleware`, the manifest fast path through `record`.
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { RequestHandler } from 'express';
import {
  countServed,
  type ContentKind,
  type HttpCells,
  type HttpKind,
  type Metrics,
  type ServedCells,
} from '../metrics.js';
import { redactedUrl } from '../log/url.js';
import type { RecentEvents } from '../status/events.js';
import { sentErrorMessage } from './errors.js';

/** What a request's answer says of itself (res.locals in express, the fast path's notes). */
export interface AnswerNotes {
  upstream?: string;
  cache?: string;
  bytes?: number;
  errorCode?: string;
}

const API = /^\/v2\/.+\/(manifests|blobs|tags)\/(?!uploads)/;

/** The kind of a request, by its path (the query left out). */
export function requestKind(path: string): HttpKind {
  const m = API.exec(path);
  if (m) return m[1] === 'manifests' ? 'manifest' : m[1] === 'blobs' ? 'blob' : 'tags';
  if (path === '/v2/_catalog') return 'catalog';
  return 'other';
}

export class RequestMetrics {
  private readonly served = new Map<string, Record<ContentKind, ServedCells>>();

  constructor(
    private readonly metrics: Metrics,
    private readonly events: RecentEvents | undefined,
    private readonly clientAddress: (req: IncomingMessage) => string | undefined,
  ) {}

  /** The cells of one kind and method, to bind once where the kind is known (the fast path). */
  cells(kind: HttpKind, method: string): HttpCells {
    return this.metrics.httpCells(kind, method);
  }

  /** Counts every express request when its answer ends or is cut. */
  middleware(): RequestHandler {
    return (req, res, next) => {
      const started = performance.now();
      const socket = req.socket;
      const sentBefore = socket.bytesWritten;
      // As it came: a passthrough upstream is not sent pullcache's own credentials.
      const credentialed = req.headers.authorization !== undefined;
      res.once('close', () => {
        const url = req.originalUrl;
        const query = url.indexOf('?');
        const kind = requestKind(query < 0 ? url : url.slice(0, query));
        const notes = res.locals as AnswerNotes;
        // Cut short (the client left, the source broke off): the body that went out, at most the
        // whole body. The request line (pino-http's listener comes after this one) logs it too.
        if (notes.bytes !== undefined && !res.writableFinished)
          notes.bytes = bodyBytesSent(res, socket.bytesWritten - sentBefore, notes.bytes);
        this.record(req, res, this.cells(kind, req.method), kind, started, notes, credentialed);
      });
      next();
    };
  }

  /**
   * Adds one ended request; `started` is its performance.now() at arrival, `credentialed` whether
   * it came with an Authorization header.
   */
  record(
    req: IncomingMessage,
    res: ServerResponse,
    cells: HttpCells,
    kind: HttpKind,
    started: number,
    notes: AnswerNotes,
    credentialed = req.headers.authorization !== undefined,
  ): void {
    const status = res.statusCode;
    cells.status(status).value++;
    cells.duration.observe((performance.now() - started) / 1000);
    if (
      notes.cache !== undefined &&
      notes.upstream !== undefined &&
      (kind === 'manifest' || kind === 'blob') &&
      req.method === 'GET' &&
      // With its content: a 304 sends none, and is neither served nor a hit.
      (status === 200 || status === 206)
    ) {
      countServed(this.servedCells(notes.upstream, kind), notes.cache === 'hit', notes.bytes ?? 0);
    }
    if (
      this.events &&
      status >= 400 &&
      status < 500 &&
      status !== 404 &&
      // A 401 to a request without credentials is the authentication handshake (every client's
      // first ping gets one), not a refusal: it would push the real ones out of the few kept.
      (status !== 401 || credentialed)
    ) {
      this.events.refused({
        client: this.clientAddress(req) ?? 'unknown',
        method: req.method ?? '',
        // Shown to admins on the status page: credentials in the query are not theirs to read.
        path: redactedUrl((req as { originalUrl?: string }).originalUrl ?? req.url ?? ''),
        status,
        code: notes.errorCode ?? String(status),
        reason: sentErrorMessage(res) ?? '',
      });
    }
  }

  private servedCells(upstream: string, kind: ContentKind): ServedCells {
    let cells = this.served.get(upstream);
    if (!cells) {
      cells = {
        manifest: this.metrics.servedCells(upstream, 'manifest'),
        blob: this.metrics.servedCells(upstream, 'blob'),
      };
      this.served.set(upstream, cells);
    }
    return cells[kind];
  }
}

/**
 * The body bytes of a cut answer that went out: what its socket took since the request came,
 * less the status line and headers (Node keeps them, as sent, in `_header`: they were counted
 * as served blob bytes, a few hundred a cut), at most the body announced.
 */
export function bodyBytesSent(res: ServerResponse, socketBytes: number, body: number): number {
  const head = (res as unknown as { _header?: string | null })._header;
  // Latin-1 on the wire: one byte a character.
  const sent = socketBytes - (typeof head === 'string' ? head.length : 0);
  return Number.isFinite(sent) ? Math.max(0, Math.min(body, sent)) : body;
}
