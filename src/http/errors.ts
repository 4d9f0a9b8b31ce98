/**
 * The one error renderer: a RegistryError becomes its OCI status, headers and JSON envelope; a
 * request express or body-parser could not take (a body over the limit, in an unknown charset or
 * encoding, malformed JSON, a path that does not decode) becomes 4xx INVALID_REQUEST; anything
 * else is logged and answered 500 INTERNAL with no stack. Nothing else writes an error response.
 * Express reaches it through `errorMiddleware`, the manifest fast path directly.
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { ErrorRequestHandler, RequestHandler } from 'express';
import type { Logger } from '../log/logger.js';
import { redactedUrl } from '../log/url.js';
import {
  InvalidRequestError,
  MethodNotAllowedError,
  RegistryError,
  UnavailableError,
} from '../oci/errors.js';

/** The message of the error each response was answered with, for the recent events. */
const sentMessages = new WeakMap<ServerResponse, string>();

/** The message `sendError` answered `res` with; undefined when it answered none. */
export function sentErrorMessage(res: ServerResponse): string | undefined {
  return sentMessages.get(res);
}

/** Fields an error answered on `res` gives the request's log line (a store's key and request id). */
const sentFields = new WeakMap<ServerResponse, Record<string, unknown>>();

export function sentErrorFields(res: ServerResponse): Record<string, unknown> {
  return sentFields.get(res) ?? {};
}

/** The fields an error carries for the log (StorageUnavailableError's `logFields`). */
function logFieldsOf(err: unknown): Record<string, unknown> {
  const fields = (err as { logFields?: unknown } | undefined)?.logFields;
  return typeof fields === 'object' && fields !== null ? (fields as Record<string, unknown>) : {};
}

/** Answers `err`; returns the OCI error code sent (undefined when the connection was cut). */
export function sendError(
  err: unknown,
  req: IncomingMessage,
  res: ServerResponse,
  log: Logger,
): string | undefined {
  let error: RegistryError;
  if (err instanceof RegistryError) {
    error = err;
    const fields = logFieldsOf(err);
    if (Object.keys(fields).length > 0) sentFields.set(res, fields);
  } else if (isRequestError(err)) {
    // The client's mistake, found by express or body-parser: its own status, nothing logged.
    error = new InvalidRequestError(describeRequestError(err), err.status);
  } else if (isFull(err)) {
    // Storage is full (a link or a small file met it: a fetch's own write is cut and told to
    // the budget where it happens). The readiness probe starts an eviction on it.
    log.warn(
      { err: (err as Error).message, method: req.method, url: redactedUrl(req.url) },
      'storage is full',
    );
    error = new UnavailableError('storage is full; try again shortly', { 'Retry-After': '10' });
  } else {
    const url = redactedUrl((req as { originalUrl?: string }).originalUrl ?? req.url);
    log.error({ err, method: req.method, url }, 'internal error');
    error = new RegistryError('INTERNAL', 'internal error; the server log has details');
  }
  if (res.headersSent) {
    // Mid-body: the only honest signal left is to cut the connection.
    res.destroy(error);
    return undefined;
  }
  res.statusCode = error.status;
  sentMessages.set(res, error.message);
  for (const [name, value] of Object.entries(error.headers)) res.setHeader(name, value);
  if (req.method === 'HEAD') {
    res.end();
    return error.code;
  }
  const body = JSON.stringify(error.toBody());
  res.setHeader('Content-Type', 'application/json; charset=utf-8');
  res.setHeader('Content-Length', Buffer.byteLength(body));
  res.end(body);
  return error.code;
}

/** A write that found no room: the disk or the quota is full. */
function isFull(err: unknown): boolean {
  const code = (err as NodeJS.ErrnoException | undefined)?.code;
  return code === 'ENOSPC' || code === 'EDQUOT';
}

export function errorMiddleware(log: Logger): ErrorRequestHandler {
  return (err, req, res, _next) => {
    res.locals.errorCode = sendError(err, req, res, log);
  };
}

/** For a known path asked with another method than it serves: 405 with `Allow`. */
export function methodNotAllowed(allowed: readonly string[]): RequestHandler {
  return (_req, _res, next) => next(new MethodNotAllowedError(allowed));
}

/**
 * What body-parser (http-errors with `expose`) and express's router (a URIError with a status:
 * a path parameter that does not decode) raise for a request they cannot take.
 */
interface RequestError {
  status: number;
  message: string;
  type?: string;
  limit?: number;
}

function isRequestError(err: unknown): err is RequestError {
  if (typeof err !== 'object' || err === null) return false;
  const { status, expose } = err as { status?: unknown; expose?: unknown };
  return (
    typeof status === 'number' &&
    Number.isInteger(status) &&
    status >= 400 &&
    status < 500 &&
    (expose === true || err instanceof URIError)
  );
}

function describeRequestError(err: RequestError): string {
  switch (err.type) {
    case 'entity.too.large':
      return `the request body is larger than the limit of ${err.limit ?? '?'} bytes`;
    case 'entity.parse.failed':
      return `the request body is not valid JSON: ${err.message.slice(0, 200)}`;
    case 'charset.unsupported':
      return `${err.message.slice(0, 200)}: a JSON body is UTF-8`;
    case 'encoding.unsupported':
      return `${err.message.slice(0, 200)}: send the body as is, or gzip, deflate or br`;
    default:
      return err instanceof URIError
        ? 'malformed percent-encoding in the path'
        : err.message.slice(0, 200);
  }
}
