/**
 * How the S3 driver's modules (s3-connection.ts, s3-driver.ts, s3-reads.ts, s3-uploads.ts) read a
 * failure of the store: the HTTP status and the error name the SDK gives, a missing key as the
 * contract's own PathNotFoundError, and every other failure (refused, down, 5xx after the retries,
 * 403, a 404 that is not about the key: NoSuchBucket, NoSuchUpload) as a StorageUnavailableError
 * (503) that names the key and S3's request id where there are some.
 */
import { PathNotFoundError, StorageUnavailableError } from './errors.js';

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

/** A 404 about the key itself (not a missing bucket or upload). */
export function isNotFound(err: unknown): boolean {
  if (err instanceof PathNotFoundError) return true;
  const cause = err instanceof StorageUnavailableError ? err.cause : err;
  return statusOf(cause) === 404 && isKeyNotFound((cause as { name?: string })?.name);
}

/**
 * The codes of a 404 that says the key is not there: NoSuchKey, or NotFound (the SDK's name for a
 * HEAD's 404, which has no body, hence no code). Any other (NoSuchBucket, NoSuchUpload) is a
 * store that cannot be used as configured, or an upload gone from under a write.
 */
export function isKeyNotFound(code: string | undefined): boolean {
  return code === 'NoSuchKey' || code === 'NotFound' || !code;
}

/** A multipart upload that is not there (completed or aborted already). */
export function isNoSuchUpload(err: unknown): boolean {
  const cause = err instanceof StorageUnavailableError ? err.cause : err;
  return statusOf(cause) === 404 && (cause as { name?: string })?.name === 'NoSuchUpload';
}

/** S3's request id of a failed request, where it gave one. */
export function requestIdOf(err: unknown): string | undefined {
  return (err as { $metadata?: { requestId?: string } })?.$metadata?.requestId;
}

export function isTooLarge(err: unknown): boolean {
  const cause = err instanceof StorageUnavailableError ? err.cause : err;
  const name = (cause as { name?: string; Code?: string })?.name;
  return name === 'EntityTooLarge' || name === 'InvalidRequest';
}

export function notFound(err: unknown, p: string): unknown {
  return isNotFound(err) ? new PathNotFoundError(p) : err;
}

/**
 * A store failure as the domain error, naming the key (when given) and S3's request id; a 404
 * about the key, a 412/409 or a 416 keeps its own meaning for the caller.
 */
export function unavailable(err: unknown, what: string, key?: string): unknown {
  if (err instanceof StorageUnavailableError || err instanceof PathNotFoundError) return err;
  const status = statusOf(err);
  if (status === 404 && isKeyNotFound((err as { name?: string })?.name)) return err;
  if (status === 412 || status === 409 || status === 416) return err;
  let name = (err as { name?: string })?.name ?? 'error';
  // A HEAD's error has no body, so no code: the SDK calls it Unknown.
  if (name === 'Unknown' && status !== undefined) name = HEAD_ERRORS[status] ?? name;
  const reason =
    name === 'TimeoutError'
      ? 'no answer from the store in time'
      : status !== undefined
        ? `${name} (HTTP ${status})`
        : ((err as NodeJS.ErrnoException)?.code ?? (err as Error)?.message ?? name);
  return new StorageUnavailableError(`storage is unavailable: cannot ${what}: ${reason}`, err, {
    key,
    requestId: requestIdOf(err),
  });
}
