/**
 * Typed failures of the upstream client, each with the OCI code a client of pullcache sees when
 * nothing cached can stand in. The proxy layer acts on the type (stale-if-error, 404 pass-on).
 */
import { RegistryError } from '../oci/errors.js';

/** The upstream answered 404 (or 401/403 only for a name it does not know). */
export class UpstreamNotFoundError extends RegistryError {
  constructor(
    readonly upstream: string,
    readonly what: string,
  ) {
    super('NAME_UNKNOWN', `${what} not found on upstream ${upstream}`);
  }
}

/** The upstream refused us even after auth: no or wrong credentials for a private repository. */
export class UpstreamDeniedError extends RegistryError {
  constructor(
    readonly upstream: string,
    what: string,
  ) {
    super('DENIED', `upstream ${upstream} denied access to ${what}`);
  }
}

export interface RateLimitInfo {
  limit?: number;
  remaining?: number;
  /** Window in seconds, from `;w=` */
  window?: number;
  retryAfterSeconds?: number;
  source?: string;
  at: number;
}

export class UpstreamRateLimitedError extends RegistryError {
  constructor(
    readonly upstream: string,
    readonly rateLimit: RateLimitInfo,
  ) {
    super(
      'TOOMANYREQUESTS',
      `upstream ${upstream} is rate limiting pulls${rateLimit.retryAfterSeconds !== undefined ? `; retry after ${rateLimit.retryAfterSeconds}s` : ''}`,
      undefined,
      rateLimit.retryAfterSeconds !== undefined
        ? { 'Retry-After': String(rateLimit.retryAfterSeconds) }
        : {},
    );
  }
}

/** Connection refused or reset, a timeout, a 5xx, an open circuit, or `offline: true`. */
export class UpstreamUnavailableError extends RegistryError {
  constructor(
    readonly upstream: string,
    readonly reason: string,
  ) {
    super('UNAVAILABLE', `upstream ${upstream} is unavailable: ${reason}`);
  }
}

/** The upstream sent something we cannot accept: a wrong digest, a manifest too large... */
export class UpstreamInvalidError extends RegistryError {
  constructor(
    readonly upstream: string,
    reason: string,
  ) {
    super('UPSTREAM_INVALID', `upstream ${upstream} sent an invalid response: ${reason}`);
  }
}

/** A failure as a log line or an event reads it: its code (undici's, Node's) and message. */
export function errMessage(err: unknown): string {
  const e = err as { code?: string; message?: string };
  return e?.code ? `${e.code}${e.message ? `: ${e.message}` : ''}` : String(e?.message ?? err);
}

/**
 * A failure of the blob path's own sockets (raw-connection.ts) with the code undici's would
 * carry (`UND_ERR_*`), so that the transport tells a broken connection from a refusal the same
 * way for both.
 */
export function codedError(code: string, message: string): Error {
  return Object.assign(new Error(message), { code });
}
