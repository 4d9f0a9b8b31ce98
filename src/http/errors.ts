/**
 * The one error renderer: a RegistryError becomes its OCI status, headers and JSON envelope;
 * anything else is logged and answered 500 INTERNAL with no stack. Nothing else writes an error
 * response. Express reaches it through `errorMiddleware`, the manifest fast path directly.
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { ErrorRequestHandler } from 'express';
import type { Logger } from '../log/logger.js';
import { RegistryError } from '../oci/errors.js';

/** The message of the error each response was answered with, for the recent events. */
const sentMessages = new WeakMap<ServerResponse, string>();

/** The message `sendError` answered `res` with; undefined when it answered none. */
export function sentErrorMessage(res: ServerResponse): string | undefined {
  return sentMessages.get(res);
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
  } else if (
    (err as { type?: string }).type === 'entity.parse.failed' ||
    (err as { status?: number }).status === 400
  ) {
    error = new RegistryError('BLOB_UPLOAD_INVALID', 'malformed request');
  } else {
    const url = (req as { originalUrl?: string }).originalUrl ?? req.url;
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

export function errorMiddleware(log: Logger): ErrorRequestHandler {
  return (err, req, res, _next) => {
    res.locals.errorCode = sendError(err, req, res, log);
  };
}
