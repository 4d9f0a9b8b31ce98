import { describe, expect, test } from 'vitest';
import { NameInvalidError, TagInvalidError } from '../../src/oci/errors.js';
import {
  parseImageReference,
  parseManifestReference,
  parseRepository,
  parseTag,
} from '../../src/oci/reference.js';

describe('repository names', () => {
  test.each([
    'alpine',
    'library/alpine',
    'a/b/c/d',
    'my-org/my_app',
    'a__b/c.d',
    'x--y',
    'ghcr.io/org/image',
    '0/1',
  ])('accepts %s', (n) => {
    expect(parseRepository(n)).toBe(n);
  });
  test.each([
    '',
    'Alpine',
    'a//b',
    '/a',
    'a/',
    'a/../b',
    '..',
    'a/./b',
    '_a',
    'a_',
    'a___b',
    'a b',
    'a%2fb',
    'a:b',
    'a'.repeat(256),
  ])('refuses %j', (n) => {
    expect(() => parseRepository(n)).toThrow(NameInvalidError);
  });
});

describe('tags', () => {
  test.each(['latest', '3.20', 'v1.0.0-rc_1', '_x', 'A'.repeat(128)])('accepts %s', (t) =>
    expect(parseTag(t)).toBe(t),
  );
  test.each(['', '.x', '-x', 'a/b', 'a:b', 'A'.repeat(129)])('refuses %j', (t) =>
    expect(() => parseTag(t)).toThrow(TagInvalidError),
  );
});

describe('references', () => {
  const digest = `sha256:${'c'.repeat(64)}`;
  test('name[:tag][@digest]', () => {
    expect(parseImageReference('alpine')).toEqual({ repository: 'alpine' });
    expect(parseImageReference('library/alpine:3.20')).toEqual({
      repository: 'library/alpine',
      tag: '3.20',
    });
    expect(parseImageReference(`org/app@${digest}`)).toEqual({ repository: 'org/app', digest });
    expect(parseImageReference(`org/app:v1@${digest}`)).toEqual({
      repository: 'org/app',
      tag: 'v1',
      digest,
    });
  });
  test('a manifest reference with a colon must be a digest', () => {
    expect(parseManifestReference('latest')).toEqual({ kind: 'tag', tag: 'latest' });
    expect(parseManifestReference(digest)).toEqual({ kind: 'digest', digest });
    expect(() => parseManifestReference('sha256:nothex')).toThrow();
  });
});
