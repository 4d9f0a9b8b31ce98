/**
 * The request log: a line per request when its answer ends or is cut, at info (`request`), or
 * at error (`request failed`) for a 5xx or an answer that did not finish, with why. Express's
 * routes get theirs from pino-http (`requestLog`), the manifest fast path from `logRequest`;
 * both write the same fields.
 */
import { randomUUID } from 'node:crypto';
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { Socket } from 'node:net';
import type { RequestHandler, Response } from 'express';
import { pinoHttp } from 'pino-http';
import type { AccessControl } from '../access/types.js';
import type { Logger } from '../log/logger.js';
import { redactedUrl } from '../log/url.js';
import { ADMIN_PREFIX } from './admin.js';
import { sentErrorFields, sentErrorMessage } from './errors.js';
import { UI_PREFIX } from './status-page.js';

/** What the request log says of a request besides its line. */
export interface RequestNotes {
  /** The authenticated user; absent for anonymous callers. */
  user?: string;
  upstream?: string;
  repository?: string;
  cache?: string;
  bytes?: number;
  errorCode?: string;
}

/** Express's request lines, or at a level that writes none, `req.log` for the layers below. */
export function requestLog(httpLog: Logger, access: AccessControl): RequestHandler {
  if (!httpLog.isLevelEnabled('info')) {
    // Request lines are not written at this level: a child logger per request would cost a fifth
    // of the CPU of a manifest request for nothing. Errors are still logged by the layers below.
    return (req, _res, next) => {
      (req as unknown as { log: Logger }).log = httpLog;
      next();
    };
  }
  return pinoHttp({
    logger: httpLog,
    genReqId: requestId,
    autoLogging: {
      ignore: (req) =>
        req.url === '/healthz' ||
        req.url === '/readyz' ||
        req.url === '/metrics' ||
        // The status page's polls and files: a line every few seconds per open page.
        req.url === `${ADMIN_PREFIX}/status` ||
        req.url?.startsWith(`${UI_PREFIX}/`) === true,
    },
    // An answer cut short (the client left, the upstream broke off) failed, whatever its
    // status said when the headers went out.
    customLogLevel: (_req, res, err) => levelOf(res, err),
    customSuccessMessage: (_req, res) => (answerFailed(res) ? 'request failed' : 'request'),
    customErrorMessage: () => 'request failed',
    customSuccessObject: (_req, res, value: Record<string, unknown>) =>
      answerFailed(res) ? { ...value, ...failureFields(res) } : value,
    // A 5xx says why with the error it was answered with; pino-http's synthetic "failed with
    // status code" error (with its stack) says nothing more.
    customErrorObject: (_req, res, err, value: Record<string, unknown>) =>
      err instanceof Error && err.message.startsWith('failed with status code')
        ? { ...value, ...failureFields(res) }
        : value,
    // Called when the request comes (its fields go on every line the request logs) and again
    // for the request line, which has the first call's fields already: each once.
    customProps: (req, res) => {
      if (!res.writableEnded && !res.destroyed)
        return { client: access.clientAddress(req), userAgent: req.headers['user-agent'] };
      const l = (res as unknown as Response).locals ?? {};
      return {
        user: l.user,
        upstream: l.upstream,
        repository: l.repository,
        cache: l.cache,
        bytes: l.bytes,
        errorCode: l.errorCode,
      };
    },
    serializers: {
      req: (req: { method: string; url: string; id: unknown }) => ({
        id: req.id,
        method: req.method,
        url: loggedUrl(req.url),
      }),
      res: (res: { statusCode: number }) => ({ statusCode: res.statusCode }),
    },
  });
}

/**
 * The request's id for its log line, also sent back as X-Request-Id: the client's own when it
 * sent a sane one, else a new UUID. Both paths use it (express through pino-http's genReqId).
 */
export function requestId(req: IncomingMessage, res: ServerResponse): string {
  const incoming = req.headers['x-request-id'];
  const id =
    typeof incoming === 'string' && /^[\w.-]{1,64}$/.test(incoming) ? incoming : randomUUID();
  res.setHeader('X-Request-Id', id);
  return id;
}

/** Most characters of a request's path and query in its log line. */
const LOGGED_URL = 1024;

/**
 * The URL as the request log shows it: credentials in its query redacted (log/url.ts), cut at
 * 1 KiB (a path may be as long as a client likes).
 */
export function loggedUrl(url: string | undefined): string | undefined {
  const shown = redactedUrl(url);
  return shown !== undefined && shown.length > LOGGED_URL
    ? `${shown.slice(0, LOGGED_URL)}...`
    : shown;
}

/** The manifest fast path's request line: the same one `requestLog` writes for express. */
export function logRequest(
  log: Logger,
  req: IncomingMessage,
  res: ServerResponse,
  notes: RequestNotes,
  access: AccessControl,
): void {
  const start = performance.now();
  const id = requestId(req, res);
  res.once('close', () => {
    const line = {
      req: { id, method: req.method, url: loggedUrl(req.url) },
      res: { statusCode: res.statusCode },
      responseTime: Math.round(performance.now() - start),
      ...notes,
      client: access.clientAddress(req),
      userAgent: req.headers['user-agent'],
    };
    if (answerFailed(res)) log[levelOf(res)]({ ...line, ...failureFields(res) }, 'request failed');
    else log.info(line, 'request');
  });
}

/**
 * The level of a request's line: error for a failed answer, but warn for one its client cut
 * (a ^C, a CI job cancelled: nothing for the operator to mend, and no alert on error lines).
 */
function levelOf(res: ServerResponse, err?: unknown): 'info' | 'warn' | 'error' {
  if (!err && !answerFailed(res)) return 'info';
  return failureCause(res) === CLIENT_LEFT ? 'warn' : 'error';
}

/** Whether a request's line says "request failed": a 5xx, or an answer cut before its end. */
function answerFailed(res: ServerResponse): boolean {
  return res.statusCode >= 500 || !res.writableFinished;
}

/** Why a cut answer with no error of its own failed: its client went away. */
export const CLIENT_LEFT = 'the client closed the connection before the answer ended';

/** Why an answer the server cut at its stop failed (server.drainTimeout). */
export const SERVER_STOPPED = 'the server stopped before the answer ended (server.drainTimeout)';

/** The connections the server itself closes as it stops: not cut by their clients. */
const stopping = new WeakSet<Socket>();

/** Before a stopping server closes `socket`: the request lines it cuts say so. */
export function cutAtStop(socket: Socket): void {
  stopping.add(socket);
}

/** What a failed answer's request line adds: why, and the fields its error carries. */
function failureFields(res: ServerResponse): Record<string, unknown> {
  return { err: failureCause(res), ...sentErrorFields(res) };
}

/**
 * Why an answer failed, for its request line: the error it was answered with, or the one that
 * cut it. The cause may be on a line of its own (an upstream's warning): this one ties it to the
 * request. A broken source destroys the answer with its error (blobs.ts); an answer cut without
 * one was cut by its client, or by the server's stop, which the line says rather than nothing.
 */
function failureCause(res: ServerResponse): string | undefined {
  return (
    sentErrorMessage(res) ??
    res.errored?.message ??
    (res.writableFinished ? undefined : stopping.has(res.req.socket) ? SERVER_STOPPED : CLIENT_LEFT)
  );
}
