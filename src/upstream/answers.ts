/**
 * What an upstream's answer, or its failure, says; pure functions for the transport
 * (transport.ts) and the blob GET (blob-get.ts), no state and no I/O: a header's value, the
 * Content-Length, the rate-limit figures (RateLimit-* and Retry-After, Docker Hub's
 * docker-ratelimit-source), the typed failure of errors.ts for an HTTP status, and whether a
 * thrown error is the connection failing (which the circuit breaker counts and Range resumes).
 */
import { errors as undiciErrors } from 'undici';
import {
  errMessage,
  UpstreamDeniedError,
  UpstreamInvalidError,
  UpstreamNotFoundError,
  UpstreamRateLimitedError,
  UpstreamUnavailableError,
  type RateLimitInfo,
} from './errors.js';

type Headers = Record<string, string | string[] | undefined>;

/** A header's value (the first, when it came more than once). */
export function header(headers: Headers, name: string): string | undefined {
  const v = headers[name];
  return Array.isArray(v) ? v[0] : v;
}

/** The Content-Length of an answer; undefined when it sent none, or none that is a length. */
export function contentLength(headers: Headers): number | undefined {
  const value = header(headers, 'content-length');
  return value !== undefined && /^\d+$/.test(value) ? Number(value) : undefined;
}

/** The rate-limit figures of an answer, as of now; undefined when it sent none. */
export function rateLimitOf(headers: Headers): RateLimitInfo | undefined {
  const limit = header(headers, 'ratelimit-limit');
  const remaining = header(headers, 'ratelimit-remaining');
  const retryAfter = header(headers, 'retry-after');
  if (limit === undefined && remaining === undefined && retryAfter === undefined) return undefined;
  const info: RateLimitInfo = { at: Date.now() };
  const [l, w] = parseRateLimit(limit);
  const [r] = parseRateLimit(remaining);
  if (l !== undefined) info.limit = l;
  if (w !== undefined) info.window = w;
  if (r !== undefined) info.remaining = r;
  if (retryAfter !== undefined) {
    const seconds = /^\d+$/.test(retryAfter)
      ? Number(retryAfter)
      : Math.max(0, Math.ceil((Date.parse(retryAfter) - Date.now()) / 1000));
    if (Number.isFinite(seconds)) info.retryAfterSeconds = seconds;
  }
  const source = header(headers, 'docker-ratelimit-source');
  if (source) info.source = source;
  return info;
}

/** `100;w=21600` -> [100, 21600] */
function parseRateLimit(value: string | undefined): [number | undefined, number | undefined] {
  if (value === undefined) return [undefined, undefined];
  const m = /^\s*(\d+)(?:\s*;\s*w=(\d+))?/.exec(value);
  return m ? [Number(m[1]), m[2] !== undefined ? Number(m[2]) : undefined] : [undefined, undefined];
}

/**
 * The typed failure of an answer that is not 2xx (after auth and redirects): 401 and 403
 * denied, 404 not found, 416 invalid, 429 rate limited (with the figures last seen), 5xx
 * unavailable, anything else invalid. `what` names the request in the message.
 */
export function statusError(
  upstream: string,
  what: string,
  status: number,
  rateLimit: RateLimitInfo | undefined,
): Error {
  switch (status) {
    case 401:
    case 403:
      return new UpstreamDeniedError(upstream, what);
    case 404:
      return new UpstreamNotFoundError(upstream, what);
    case 416:
      return new UpstreamInvalidError(upstream, `${what}: range not satisfiable`);
    case 429:
      return new UpstreamRateLimitedError(upstream, rateLimit ?? { at: Date.now() });
    default:
      if (status >= 500) return new UpstreamUnavailableError(upstream, `HTTP ${status}`);
      return new UpstreamInvalidError(upstream, `${what}: unexpected HTTP ${status}`);
  }
}

/** A body's failure as the typed error: a broken connection is UpstreamUnavailableError. */
export function bodyFailure(upstream: string, err: unknown, what: string): unknown {
  if (err instanceof UpstreamInvalidError || err instanceof UpstreamUnavailableError) return err;
  if (isConnectionError(err))
    return new UpstreamUnavailableError(upstream, `${what}: ${errMessage(err)}`);
  return err;
}

const CONNECTION_CODES = new Set([
  'ECONNREFUSED',
  'ECONNRESET',
  'EPIPE',
  'ETIMEDOUT',
  'EHOSTUNREACH',
  'ENETUNREACH',
  'ENOTFOUND',
  'EAI_AGAIN',
  'UND_ERR_CONNECT_TIMEOUT',
  'UND_ERR_HEADERS_TIMEOUT',
  'UND_ERR_BODY_TIMEOUT',
  'UND_ERR_SOCKET',
  'UND_ERR_CLOSED',
]);

/** Whether `err`, or its cause (4 levels in all), is the connection failing, not an answer. */
export function isConnectionError(err: unknown): boolean {
  if (err instanceof UpstreamUnavailableError) return true;
  for (
    let e: unknown = err, depth = 0;
    e && depth < 4;
    e = (e as { cause?: unknown }).cause, depth++
  ) {
    const code = (e as { code?: string }).code;
    if (code && CONNECTION_CODES.has(code)) return true;
    if (e instanceof undiciErrors.SocketError || e instanceof undiciErrors.ConnectTimeoutError)
      return true;
  }
  return false;
}
