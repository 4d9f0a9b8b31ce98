/**
 * Manifest parsing: from a manifest's bytes, its media type and the descriptors it references
 * (an index references manifests; a manifest references its config and layers).
 * The bytes themselves are never re-serialised: a registry serves manifests byte for byte.
 */
import { parseDigest, type Digest } from './digest.js';
import type { Descriptor, IndexDescriptor } from './descriptor.js';
import { ManifestInvalidError } from './errors.js';
import { MediaType, baseMediaType, isIndexMediaType, isManifestMediaType } from './media-types.js';

export type ParsedManifest =
  | { kind: 'index'; mediaType: string; manifests: IndexDescriptor[] }
  | { kind: 'manifest'; mediaType: string; config: Descriptor; layers: Descriptor[] };

/**
 * Parses manifest bytes. `contentType` (from the upstream's header) wins when it names a
 * manifest type; otherwise the `mediaType` field decides; an OCI manifest or index may omit
 * both, and is then told apart by its `manifests` or `config` field. Throws ManifestInvalidError.
 */
export function parseManifest(bytes: Uint8Array, contentType?: string): ParsedManifest {
  let json: unknown;
  try {
    json = JSON.parse(Buffer.from(bytes).toString('utf8'));
  } catch {
    throw new ManifestInvalidError('manifest is not valid JSON');
  }
  if (!isObject(json)) throw new ManifestInvalidError('manifest is not a JSON object');
  if (json.schemaVersion !== 2) {
    throw new ManifestInvalidError(
      `unsupported manifest schemaVersion ${String(json.schemaVersion)}`,
    );
  }
  const header = baseMediaType(contentType);
  const field = typeof json.mediaType === 'string' ? json.mediaType : undefined;
  let mediaType: string;
  if (isManifestMediaType(header)) mediaType = header;
  else if (field && isManifestMediaType(field)) mediaType = field;
  else if (Array.isArray(json.manifests)) mediaType = MediaType.OciIndex;
  else if (isObject(json.config)) mediaType = MediaType.OciManifest;
  else throw new ManifestInvalidError('cannot tell the manifest media type');

  if (isIndexMediaType(mediaType)) {
    if (!Array.isArray(json.manifests))
      throw new ManifestInvalidError('index has no manifests array');
    return {
      kind: 'index',
      mediaType,
      manifests: json.manifests.map((d, i) => descriptor(d, `manifests[${i}]`)),
    };
  }
  if (!isObject(json.config)) throw new ManifestInvalidError('manifest has no config');
  const layers = Array.isArray(json.layers) ? json.layers : [];
  return {
    kind: 'manifest',
    mediaType,
    config: descriptor(json.config, 'config'),
    layers: layers.map((d, i) => descriptor(d, `layers[${i}]`)),
  };
}

/** Every descriptor a manifest references, in order. */
export function referencedDescriptors(manifest: ParsedManifest): Descriptor[] {
  return manifest.kind === 'index' ? manifest.manifests : [manifest.config, ...manifest.layers];
}

function descriptor(value: unknown, where: string): IndexDescriptor {
  if (!isObject(value)) throw new ManifestInvalidError(`${where} is not a descriptor`);
  let digest: Digest;
  try {
    digest = parseDigest(String(value.digest)).digest;
  } catch {
    throw new ManifestInvalidError(`${where} has an invalid digest`);
  }
  if (typeof value.size !== 'number' || !Number.isSafeInteger(value.size) || value.size < 0) {
    throw new ManifestInvalidError(`${where} has an invalid size`);
  }
  const result: IndexDescriptor = { digest, size: value.size };
  if (typeof value.mediaType === 'string') result.mediaType = value.mediaType;
  if (isObject(value.platform))
    result.platform = value.platform as unknown as IndexDescriptor['platform'];
  if (isObject(value.annotations)) result.annotations = value.annotations as Record<string, string>;
  return result;
}

function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}
