/**
 * The errors of storage/. StorageUnavailableError and SpoolError are OCI errors (UNAVAILABLE, 503
 * with Retry-After): the one error renderer (http/errors.ts) answers them with that status, their
 * headers and the JSON envelope, and adds their `logFields` (the store's key and request id) to
 * the request's log line. PathNotFoundError is a driver's "nothing at this path", for the stores
 * to turn into `{found:false}`, undefined or a domain error (BLOB_UPLOAD_UNKNOWN...); it is no OCI
 * error, so one that escaped to the renderer would be logged and answered 500 INTERNAL.
 */
import { UnavailableError } from '../oci/errors.js';

/**
 * The storage cannot be reached or refuses (an object store down, slow past its timeouts after
 * retries, or denying access): 503 with Retry-After, never a 500.
 */
export class StorageUnavailableError extends UnavailableError {
  /** The object key (S3) the failed request was about, for the log. */
  readonly key?: string;
  /** The store's id of the failed request (S3's x-amz-request-id), for the log. */
  readonly requestId?: string;

  constructor(
    message: string,
    cause?: unknown,
    about: { key?: string | undefined; requestId?: string | undefined } = {},
  ) {
    super(message, { 'Retry-After': '10' });
    this.cause = cause;
    if (about.key !== undefined) this.key = about.key;
    if (about.requestId !== undefined) this.requestId = about.requestId;
  }

  /** What the log line of a request or a fetch it failed adds (http/errors.ts). */
  get logFields(): { storageKey?: string; storageRequestId?: string } {
    return {
      ...(this.key !== undefined ? { storageKey: this.key } : {}),
      ...(this.requestId !== undefined ? { storageRequestId: this.requestId } : {}),
    };
  }
}

/**
 * The local directory a driver spools writes to (S3: `storage.s3.spoolDir`) cannot take them:
 * full, read-only, missing rights. Unavailable (503), and not the storage being full: evicting
 * from the store frees nothing there.
 */
export class SpoolError extends StorageUnavailableError {
  constructor(
    readonly dir: string,
    cause: unknown,
  ) {
    const code = (cause as NodeJS.ErrnoException)?.code;
    const why =
      code === 'ENOSPC' || code === 'EDQUOT'
        ? 'it is full'
        : code === 'EROFS' || code === 'EACCES' || code === 'EPERM'
          ? 'it cannot be written'
          : 'it failed';
    super(
      // The client is told why, not the server's paths: the log names the directory.
      `storage is unavailable: the spool directory cannot take the blob: ${why} (${code ?? 'error'}); it needs room for the largest blobs fetched at once`,
      cause,
    );
    this.name = 'SpoolError';
  }
}

/** Nothing is at the path a StorageDriver method was given (the methods say which throw it). */
export class PathNotFoundError extends Error {
  constructor(readonly path: string) {
    super(`path not found: ${path}`);
    this.name = 'PathNotFoundError';
  }
}
