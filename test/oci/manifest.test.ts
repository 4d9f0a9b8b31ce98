import { describe, expect, test } from 'vitest';
import { ManifestInvalidError } from '../../src/oci/errors.js';
import { parseManifest, referencedDescriptors } from '../../src/oci/manifest.js';
import { MediaType } from '../../src/oci/media-types.js';

const d = (c: string) => `sha256:${c.repeat(64)}`;
const json = (v: unknown) => Buffer.from(JSON.stringify(v));

describe('manifest parsing', () => {
  test('an OCI image manifest references its config and layers', () => {
    const m = parseManifest(
      json({
        schemaVersion: 2,
        mediaType: MediaType.OciManifest,
        config: { mediaType: MediaType.OciConfig, digest: d('a'), size: 10 },
        layers: [{ mediaType: MediaType.OciLayerGzip, digest: d('b'), size: 20 }],
      }),
    );
    expect(m.mediaType).toBe(MediaType.OciManifest);
    expect(referencedDescriptors(m).map((x) => x.digest)).toEqual([d('a'), d('b')]);
  });

  test('a Docker manifest list references its manifests with platforms', () => {
    const m = parseManifest(
      json({
        schemaVersion: 2,
        mediaType: MediaType.DockerManifestList,
        manifests: [
          {
            mediaType: MediaType.DockerManifest,
            digest: d('c'),
            size: 5,
            platform: { architecture: 'arm64', os: 'linux' },
          },
        ],
      }),
    );
    expect(m.kind).toBe('index');
    expect(m.kind === 'index' && m.manifests[0]!.platform?.architecture).toBe('arm64');
  });

  test('the Content-Type wins; without any media type the shape decides', () => {
    expect(parseManifest(json({ schemaVersion: 2, manifests: [] })).mediaType).toBe(
      MediaType.OciIndex,
    );
    expect(
      parseManifest(json({ schemaVersion: 2, config: { digest: d('a'), size: 1 }, layers: [] }))
        .mediaType,
    ).toBe(MediaType.OciManifest);
    expect(
      parseManifest(
        json({ schemaVersion: 2, config: { digest: d('a'), size: 1 } }),
        `${MediaType.DockerManifest}; charset=utf-8`,
      ).mediaType,
    ).toBe(MediaType.DockerManifest);
  });

  test.each([
    ['not json', Buffer.from('{')],
    ['schema 1', json({ schemaVersion: 1 })],
    ['bad digest', json({ schemaVersion: 2, config: { digest: 'sha256:x', size: 1 } })],
    ['negative size', json({ schemaVersion: 2, config: { digest: d('a'), size: -1 } })],
    ['neither', json({ schemaVersion: 2 })],
  ])('refuses %s', (_name, bytes) => {
    expect(() => parseManifest(bytes)).toThrow(ManifestInvalidError);
  });
});
