import { describe, expect, test } from 'vitest';
import { parseDigest } from '../../src/oci/digest.js';
import { ManifestInvalidError } from '../../src/oci/errors.js';
import { MediaType } from '../../src/oci/media-types.js';
import { referrersFromIndex, referrersTag } from '../../src/oci/referrers.js';

const d = (c: string) => `sha256:${c.repeat(64)}`;
const json = (v: unknown) => Buffer.from(JSON.stringify(v));

describe('the referrers tag schema', () => {
  test('the tag is <alg>-<ref>, the digest cut to 64 characters', () => {
    expect(referrersTag(parseDigest(d('a')).digest)).toBe(`sha256-${'a'.repeat(64)}`);
    const long = parseDigest(`sha512:${'0123456789abcdef'.repeat(8)}`).digest;
    expect(referrersTag(long)).toBe(`sha512-${'0123456789abcdef'.repeat(4)}`);
  });

  test('the index under the tag lists its well-formed descriptors, with the fields the API lists', () => {
    const signature = {
      mediaType: MediaType.OciManifest,
      digest: d('a'),
      size: 10,
      artifactType: 'application/vnd.example.signature.v1+json',
      annotations: { 'org.example': 'x' },
    };
    const plain = { mediaType: MediaType.OciManifest, digest: d('b'), size: 0 };
    const listed = referrersFromIndex(
      json({
        schemaVersion: 2,
        mediaType: MediaType.OciIndex,
        manifests: [
          { ...signature, platform: { architecture: 'amd64', os: 'linux' } },
          plain,
          'not a descriptor',
          { ...plain, mediaType: undefined },
          { ...plain, mediaType: 'not a media type' },
          { ...plain, digest: 'sha256:short' },
          { ...plain, size: -1 },
          { ...plain, size: '10' },
          { ...plain, artifactType: 7 },
          { ...plain, annotations: { n: 1 } },
          { ...plain, annotations: ['x'] },
        ],
      }),
    );
    expect(listed).toEqual([signature, plain]);
  });

  test('bytes that are no image index are refused', () => {
    for (const bytes of [Buffer.from('{'), json({ schemaVersion: 2, config: {} }), json([])])
      expect(() => referrersFromIndex(bytes)).toThrow(ManifestInvalidError);
  });
});
