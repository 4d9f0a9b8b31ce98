/**
 * The catalogue of OCI distribution error codes and the domain errors that map onto them
 * (https://github.com/opencontainers/distribution-spec/blob/main/spec.md#error-codes).
 * Domain errors carry a code; the HTTP layer's one error middleware turns them into the
 * `{"errors":[{code,message,detail}]}` envelope with the catalogue's status.
 */

export const ERROR_CODES = {
  BLOB_UNKNOWN: { status: 404, message: 'blob unknown to registry' },
  BLOB_UPLOAD_INVALID: { status: 400, message: 'blob upload invalid' },
  BLOB_UPLOAD_UNKNOWN: { status: 404, message: 'blob upload unknown to registry' },
  DIGEST_INVALID: { status: 400, message: 'provided digest did not match uploaded content' },
  MANIFEST_BLOB_UNKNOWN: {
    status: 404,
    message: 'manifest references a manifest or blob unknown to registry',
  },
  MANIFEST_INVALID: { status: 400, message: 'manifest invalid' },
  MANIFEST_UNKNOWN: { status: 404, message: 'manifest unknown to registry' },
  NAME_INVALID: { status: 400, message: 'invalid repository name' },
  NAME_UNKNOWN: { status: 404, message: 'repository name not known to registry' },
  SIZE_INVALID: { status: 400, message: 'provided length did not match content length' },
  TAG_INVALID: { status: 400, message: 'manifest tag did not match URI' },
  UNAUTHORIZED: { status: 401, message: 'authentication required' },
  DENIED: { status: 403, message: 'requested access to the resource is denied' },
  UNSUPPORTED: { status: 405, message: 'the operation is unsupported' },
  TOOMANYREQUESTS: { status: 429, message: 'too many requests' },
  UNAVAILABLE: { status: 503, message: 'service unavailable' },
  RANGE_INVALID: { status: 416, message: 'requested range not satisfiable' },
  PAGINATION_NUMBER_INVALID: { status: 400, message: 'invalid number of results requested' },
  // pullcache's own codes, beside the spec's (which it allows to be extended).
  NOT_FOUND: { status: 404, message: 'no such endpoint' },
  INVALID_REQUEST: { status: 400, message: 'the request is not valid' },
  UPSTREAM_UNKNOWN: { status: 400, message: 'no such upstream is configured' },
  UPSTREAM_INVALID: { status: 502, message: 'the upstream registry sent an invalid response' },
  INTERNAL: { status: 500, message: 'internal error' },
} as const satisfies Record<string, { status: number; message: string }>;

export type ErrorCode = keyof typeof ERROR_CODES;

export interface OciErrorBody {
  errors: { code: ErrorCode; message: string; detail?: unknown }[];
}

/** Base of every domain error that has an OCI meaning. */
export class RegistryError extends Error {
  constructor(
    readonly code: ErrorCode,
    message?: string,
    readonly detail?: unknown,
    /** Extra response headers (Retry-After...). */
    readonly headers: Record<string, string> = {},
  ) {
    super(message ?? ERROR_CODES[code].message);
    this.name = new.target.name;
  }

  get status(): number {
    return ERROR_CODES[this.code].status;
  }

  toBody(): OciErrorBody {
    const entry: OciErrorBody['errors'][number] = { code: this.code, message: this.message };
    if (this.detail !== undefined) entry.detail = this.detail;
    return { errors: [entry] };
  }
}

export class BlobUnknownError extends RegistryError {
  constructor(digest: string) {
    super('BLOB_UNKNOWN', `blob unknown: ${digest}`, { digest });
  }
}
export class BlobUploadUnknownError extends RegistryError {
  constructor(id: string) {
    super('BLOB_UPLOAD_UNKNOWN', `upload unknown: ${id}`);
  }
}
export class BlobUploadInvalidError extends RegistryError {
  constructor(message: string) {
    super('BLOB_UPLOAD_INVALID', message);
  }
}
export class DigestInvalidError extends RegistryError {
  constructor(message: string) {
    super('DIGEST_INVALID', message);
  }
}
export class DigestMismatchError extends RegistryError {
  constructor(
    readonly expected: string,
    readonly actual: string,
  ) {
    super('DIGEST_INVALID', `content digest ${actual} does not match ${expected}`, {
      expected,
      actual,
    });
  }
}
export class SizeInvalidError extends RegistryError {
  constructor(expected: number, actual: number) {
    super('SIZE_INVALID', `content is ${actual} bytes, expected ${expected}`, { expected, actual });
  }
}
export class ManifestUnknownError extends RegistryError {
  constructor(reference: string) {
    super('MANIFEST_UNKNOWN', `manifest unknown: ${reference}`);
  }
}
export class ManifestInvalidError extends RegistryError {
  constructor(message: string) {
    super('MANIFEST_INVALID', message);
  }
}
/**
 * A manifest of a type the request's Accept header does not take, where the reference registry
 * refuses it (an OCI manifest or index...): 404 MANIFEST_UNKNOWN with a message that says why,
 * and `Vary: Accept`, since another header would have been answered.
 */
export class ManifestNotAcceptedError extends RegistryError {
  constructor(message: string) {
    super('MANIFEST_UNKNOWN', message, undefined, { Vary: 'Accept' });
  }
}
export class NameInvalidError extends RegistryError {
  constructor(message: string) {
    super('NAME_INVALID', message);
  }
}
export class NameUnknownError extends RegistryError {
  constructor(name: string) {
    super('NAME_UNKNOWN', `repository name not known: ${name}`);
  }
}
export class TagInvalidError extends RegistryError {
  constructor(message: string) {
    super('TAG_INVALID', message);
  }
}
export class UnsupportedError extends RegistryError {
  constructor(message?: string) {
    super('UNSUPPORTED', message);
  }
}
/**
 * A known endpoint asked with a method it does not serve (a push to this pull-only cache...):
 * 405 with the `Allow` header RFC 9110 requires, empty when the endpoint serves no method here.
 */
export class MethodNotAllowedError extends RegistryError {
  constructor(allowed: readonly string[], message?: string) {
    super('UNSUPPORTED', message, undefined, { Allow: allowed.join(', ') });
  }
}
/**
 * A request the HTTP layer cannot take as sent: a body over the limit (413), in a content type,
 * charset or encoding it does not read (415), malformed JSON or a path that does not decode
 * (400). INVALID_REQUEST, with the 4xx status that says which.
 */
export class InvalidRequestError extends RegistryError {
  constructor(
    message: string,
    private readonly httpStatus = 400,
  ) {
    super('INVALID_REQUEST', message);
  }

  override get status(): number {
    return this.httpStatus;
  }
}
/** No endpoint at this path (with any method). */
export class NotFoundError extends RegistryError {
  constructor(method: string, path: string) {
    super('NOT_FOUND', `no such endpoint: ${method} ${path.slice(0, 200)}`);
  }
}
export class RangeInvalidError extends RegistryError {
  constructor(size: number) {
    super('RANGE_INVALID', 'requested range not satisfiable', undefined, {
      'Content-Range': `bytes */${size}`,
    });
  }
}
export class UnavailableError extends RegistryError {
  constructor(message: string, headers: Record<string, string> = {}) {
    super('UNAVAILABLE', message, undefined, headers);
  }
}
export class TooManyRequestsError extends RegistryError {
  constructor(message: string, headers: Record<string, string> = {}) {
    super('TOOMANYREQUESTS', message, undefined, headers);
  }
}
export class UnauthorizedError extends RegistryError {
  constructor(message?: string) {
    super('UNAUTHORIZED', message);
  }
}
export class DeniedError extends RegistryError {
  constructor(message?: string) {
    super('DENIED', message);
  }
}
export class UpstreamUnknownError extends RegistryError {
  constructor(name: string) {
    super('UPSTREAM_UNKNOWN', `no upstream named ${JSON.stringify(name)} is configured`);
  }
}
