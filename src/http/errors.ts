/**
 * The one error middleware: a RegistryError becomes its OCI status, headers and JSON envelope;
 * anything else is logged and answered 500 INTERNAL with no stack. Nothing else writes an error
 * response.
 */
import type { ErrorRequestHandler } from 'express';
import type { Logger } from '../log/logger.js';
import { RegistryError } from '../oci/errors.js';

export function errorMiddleware(log: Logger): ErrorRequestHandler {
  return (err, req, res, _next) => {
    let error: RegistryError;
    if (err instanceof RegistryError) {
      error = err;
    } else if (
      (err as { type?: string }).type === 'entity.parse.failed' ||
      (err as { status?: number }).status === 400
    ) {
      error = new RegistryError('BLOB_UPLOAD_INVALID', 'malformed request');
    } else {
      log.error({ err, method: req.method, url: req.originalUrl }, 'internal error');
      error = new RegistryError('INTERNAL', 'internal error; the server log has details');
    }
    if (res.headersSent) {
      // Mid-body: the only honest signal left is to cut the connection.
      res.destroy(error);
      return;
    }
    res.locals.errorCode = error.code;
    res.status(error.status);
    for (const [name, value] of Object.entries(error.headers)) res.setHeader(name, value);
    if (req.method === 'HEAD') {
      res.end();
      return;
    }
    res.json(error.toBody());
  };
}
