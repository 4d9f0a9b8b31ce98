/**
 * The answer of the referrers API: an OCI image index whose descriptors are the manifests that
 * name a subject in their `subject` field
 * (https://github.com/opencontainers/distribution-spec/blob/main/spec.md#listing-referrers).
 */
import type { Descriptor } from './descriptor.js';
import { parseDigest, type Digest } from './digest.js';
import { ManifestInvalidError } from './errors.js';
import { MediaType, isMediaType } from './media-types.js';
import { parseTag, type Tag } from './reference.js';

/**
 * A referring manifest, with every field the upstream sent kept as it was (`artifactType`,
 * `annotations`, and whatever a later spec adds).
 */
export interface ReferrerDescriptor extends Descriptor {
  mediaType: string;
  artifactType?: string;
  annotations?: Record<string, string>;
  readonly [field: string]: unknown;
}

/** The filter name the spec defines, for `OCI-Filters-Applied`. */
export const ARTIFACT_TYPE_FILTER = 'artifactType';

/**
 * The descriptors of a referrers answer. Throws ManifestInvalidError when the bytes are not an
 * image index of well-formed descriptors.
 */
export function parseReferrersIndex(bytes: Uint8Array): ReferrerDescriptor[] {
  return indexEntries(bytes, 'referrers answer', true).map((value, i) => {
    const problem = descriptorProblem(value);
    if (problem) throw new ManifestInvalidError(`referrers answer: manifests[${i}] ${problem}`);
    return value as ReferrerDescriptor;
  });
}

/**
 * The tag of the referrers tag schema for `subject`, `<alg>-<ref>` with `<ref>` cut to 64
 * characters (https://github.com/opencontainers/distribution-spec/blob/main/spec.md#referrers-tag-schema):
 * where clients keep an index of the referrers of `subject` in a registry without the API.
 */
export function referrersTag(subject: Digest): Tag {
  const { algorithm, hex } = parseDigest(subject);
  return parseTag(`${algorithm}-${hex.slice(0, 64)}`);
}

/**
 * The referrers listed by an image index kept under the referrers tag schema's tag, which
 * clients maintain by hand: a descriptor that is not well formed is left out, not an error.
 * Each keeps `mediaType`, `digest`, `size`, and `artifactType` and `annotations` when present,
 * as the referrers API lists them; nothing else the index carries (`platform`...). Throws
 * ManifestInvalidError when the bytes are not an image index.
 */
export function referrersFromIndex(bytes: Uint8Array): ReferrerDescriptor[] {
  const listed: ReferrerDescriptor[] = [];
  for (const value of indexEntries(bytes, 'referrers tag', false)) {
    if (
      !isObject(value) ||
      descriptorProblem(value) !== undefined ||
      !isMediaType(value.mediaType as string) ||
      (value.annotations !== undefined && !isStringMap(value.annotations))
    )
      continue;
    const { mediaType, digest, size, artifactType, annotations } = value as ReferrerDescriptor;
    const descriptor: ReferrerDescriptor = { mediaType, digest, size };
    if (artifactType !== undefined) descriptor.artifactType = artifactType;
    if (annotations !== undefined) descriptor.annotations = annotations;
    listed.push(descriptor);
  }
  return listed;
}

/**
 * The `manifests` of the image index in `bytes` (`what` names it in errors; `schemaVersion`: it
 * must say 2). Throws ManifestInvalidError when the bytes are not one.
 */
function indexEntries(bytes: Uint8Array, what: string, schemaVersion: boolean): unknown[] {
  let json: unknown;
  try {
    json = JSON.parse(Buffer.from(bytes).toString('utf8'));
  } catch {
    throw new ManifestInvalidError(`${what} is not valid JSON`);
  }
  if (
    !isObject(json) ||
    (schemaVersion && json.schemaVersion !== 2) ||
    !Array.isArray(json.manifests)
  )
    throw new ManifestInvalidError(`${what} is not an image index`);
  return json.manifests as unknown[];
}

/** What makes `value` no descriptor of a referrer (mediaType, digest, size, artifactType). */
function descriptorProblem(value: unknown): string | undefined {
  if (
    !isObject(value) ||
    typeof value.mediaType !== 'string' ||
    typeof value.size !== 'number' ||
    !Number.isSafeInteger(value.size) ||
    value.size < 0 ||
    (value.artifactType !== undefined && typeof value.artifactType !== 'string')
  )
    return 'is not a descriptor';
  try {
    parseDigest(String(value.digest));
  } catch {
    return 'has an invalid digest';
  }
  return undefined;
}

/** The index to serve for these referrers; no referrers is an empty index, never a 404. */
export function referrersIndex(manifests: readonly ReferrerDescriptor[]): Buffer {
  return Buffer.from(
    JSON.stringify({ schemaVersion: 2, mediaType: MediaType.OciIndex, manifests }),
  );
}

/** The referrers whose `artifactType` is one of `artifactTypes`. */
export function withArtifactType(
  manifests: readonly ReferrerDescriptor[],
  artifactTypes: readonly string[],
): ReferrerDescriptor[] {
  return manifests.filter(
    (d) => d.artifactType !== undefined && artifactTypes.includes(d.artifactType),
  );
}

function isStringMap(value: unknown): value is Record<string, string> {
  return isObject(value) && Object.values(value).every((v) => typeof v === 'string');
}

function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}
