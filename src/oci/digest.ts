/**
 * Content digests, `algorithm:encoded`, as the OCI image spec defines them
 * (https://github.com/opencontainers/image-spec/blob/main/descriptor.md#digests).
 * Only the registered algorithms sha256 (64 hex) and sha512 (128 hex) are supported.
 */
import { createHash, type Hash } from 'node:crypto';
import { DigestInvalidError, DigestMismatchError } from './errors.js';

export type DigestAlgorithm = 'sha256' | 'sha512';

/** A validated digest string; only `parseDigest` makes one. */
export type Digest = string & { readonly __digest: unique symbol };

const HEX_LENGTH: Record<DigestAlgorithm, number> = { sha256: 64, sha512: 128 };
// The general grammar from the image spec; an algorithm it admits but we do not know is refused
// with its own message.
const GRAMMAR = /^[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$/;

export interface ParsedDigest {
  readonly digest: Digest;
  readonly algorithm: DigestAlgorithm;
  readonly hex: string;
}

/** Parses and validates a digest; throws DigestInvalidError, also for an algorithm other than sha256/sha512. */
export function parseDigest(value: string): ParsedDigest {
  if (typeof value !== 'string' || value.length > 256 || !GRAMMAR.test(value)) {
    throw new DigestInvalidError(`invalid digest ${JSON.stringify(truncate(value))}`);
  }
  const colon = value.indexOf(':');
  const algorithm = value.slice(0, colon);
  const hex = value.slice(colon + 1);
  if (algorithm !== 'sha256' && algorithm !== 'sha512') {
    throw new DigestInvalidError(
      `unsupported digest algorithm ${JSON.stringify(algorithm)}: sha256 and sha512 are supported`,
    );
  }
  if (hex.length !== HEX_LENGTH[algorithm] || !/^[a-f0-9]+$/.test(hex)) {
    throw new DigestInvalidError(
      `invalid ${algorithm} digest: expected ${HEX_LENGTH[algorithm]} lowercase hex digits`,
    );
  }
  return { digest: value as Digest, algorithm, hex };
}

/** True when `value` is a valid, supported digest. */
export function isDigest(value: string): value is Digest {
  try {
    parseDigest(value);
    return true;
  } catch {
    return false;
  }
}

export function digestOf(data: Uint8Array | string, algorithm: DigestAlgorithm = 'sha256'): Digest {
  return `${algorithm}:${createHash(algorithm).update(data).digest('hex')}` as Digest;
}

/** The digest of zero bytes, which every registry must serve. */
export const EMPTY_BLOB_DIGEST = digestOf(new Uint8Array(0));

/**
 * Feed chunks as they stream, then `verify()` (throws DigestMismatchError) or `matches()`.
 * Chunks are hashed as they come; nothing is buffered.
 */
export class DigestVerifier {
  private readonly hash: Hash;
  private finished: Digest | undefined;
  bytes = 0;

  constructor(readonly expected: ParsedDigest) {
    this.hash = createHash(expected.algorithm);
  }

  update(chunk: Uint8Array): void {
    this.bytes += chunk.length;
    this.hash.update(chunk);
  }

  /** The digest of everything fed so far; finishes the verifier. */
  actual(): Digest {
    this.finished ??= `${this.expected.algorithm}:${this.hash.digest('hex')}` as Digest;
    return this.finished;
  }

  matches(): boolean {
    return this.actual() === this.expected.digest;
  }

  verify(): void {
    if (!this.matches()) {
      throw new DigestMismatchError(this.expected.digest, this.actual());
    }
  }
}

function truncate(value: unknown): string {
  const s = String(value);
  return s.length > 80 ? `${s.slice(0, 80)}...` : s;
}
