import { createHash } from 'node:crypto';
import { describe, expect, test } from 'vitest';
import {
  DigestVerifier,
  EMPTY_BLOB_DIGEST,
  digestOf,
  isDigest,
  parseDigest,
} from '../../src/oci/digest.js';
import { DigestInvalidError, DigestMismatchError } from '../../src/oci/errors.js';

const hex64 = 'a'.repeat(64);

describe('digests', () => {
  test.each([`sha256:${hex64}`, `sha512:${'b'.repeat(128)}`])('accepts %s', (d) => {
    expect(parseDigest(d).digest).toBe(d);
  });

  test.each([
    ['sha256:' + 'A'.repeat(64), 'uppercase hex'],
    ['sha256:' + 'a'.repeat(63), 'short'],
    ['sha512:' + 'a'.repeat(64), 'wrong length for sha512'],
    ['sha256' + hex64, 'no colon'],
    ['md5:d41d8cd98f00b204e9800998ecf8427e', 'unsupported algorithm'],
    ['sha256:../../etc/passwd', 'path'],
    ['', 'empty'],
  ])('refuses %s (%s) with DIGEST_INVALID', (d) => {
    expect(() => parseDigest(d)).toThrow(DigestInvalidError);
    expect(isDigest(d)).toBe(false);
  });

  test('the empty blob digest is the sha256 of nothing', () => {
    expect(EMPTY_BLOB_DIGEST).toBe(`sha256:${createHash('sha256').digest('hex')}`);
  });

  test('the streaming verifier checks chunks fed one by one', () => {
    const data = Buffer.from('hello, registry');
    const ok = new DigestVerifier(parseDigest(digestOf(data)));
    ok.update(data.subarray(0, 5));
    ok.update(data.subarray(5));
    expect(() => ok.verify()).not.toThrow();
    expect(ok.bytes).toBe(data.length);
    const bad = new DigestVerifier(parseDigest(digestOf(data)));
    bad.update(Buffer.from('hello, registrY'));
    expect(() => bad.verify()).toThrow(DigestMismatchError);
  });
});
