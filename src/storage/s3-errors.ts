/**
 * How the S3 driver's modules (s3-driver.ts, s3-reads.ts, s3-uploads.ts) read a failure of the
 * store: the HTTP status and the error name the SDK gives, a missing key as the contract's own
 * PathNotFoundError, and every other failure (refused, down, 5xx after the retries, 403) as a
 * StorageUnavailableError (503).
 */
import { PathNotFoundError, StorageUnavailableError } from './types.js';

/** What S3 says by status alone, where a HEAD leaves it no body to say it with. */
export const HEAD_ERRORS: Record<number, string> = {
  400: 'BadRequest',
  403: 'AccessDenied',
  500: 'InternalError',
  503: 'ServiceUnavailable',
};

export function statusOf(err: unknown): number | undefined {
  return (err as { $metadata?: { httpStatusCode?: number } })?.$metadata?.httpStatusCode;
}

export function isNotFound(err: unknown): boolean {
  if (err instanceof PathNotFoundError) return true;
  const cause = err instanceof StorageUnavailableError ? err.cause : err;
  const name = (cause as { name?: string })?.name;
  return statusOf(cause) === 404 && (name === 'NoSuchKey' || name === 'NotFound' || !name);
}

export function isTooLarge(err: unknown): boolean {
  const cause = err instanceof StorageUnavailableError ? err.cause : err;
  const name = (cause as { name?: string; Code?: string })?.name;
  return name === 'EntityTooLarge' || name === 'InvalidRequest';
}

export function notFound(err: unknown, p: string): unknown {
  return isNotFound(err) ? new PathNotFoundError(p) : err;
}

/** A store failure as the domain error; a 404 or a 412/409 keeps its own meaning for the caller. */
export function unavailable(err: unknown, what: string): unknown {
  const status = statusOf(err);
  if (status === 404 || status === 412 || status === 409 || status === 416) return err;
  let name = (err as { name?: string })?.name ?? 'error';
  // A HEAD's error has no body, so no code: the SDK calls it Unknown.
  if (name === 'Unknown' && status !== undefined) name = HEAD_ERRORS[status] ?? name;
  const reason =
    name === 'TimeoutError'
      ? 'no answer from the store in time'
      : status !== undefined
        ? `${name} (HTTP ${status})`
        : ((err as NodeJS.ErrnoException)?.code ?? (err as Error)?.message ?? name);
  return new StorageUnavailableError(`storage is unavailable: cannot ${what}: ${reason}`, err);
}
