/**
 * Repository names, tags and references, after the distribution spec's grammar
 * (https://github.com/opencontainers/distribution-spec/blob/main/spec.md#pulling-manifests)
 * and distribution's reference package.
 */
import { parseDigest, type Digest } from './digest.js';
import { NameInvalidError, TagInvalidError } from './errors.js';

const PATH_COMPONENT = /^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*$/;
const TAG = /^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$/;
export const MAX_NAME_LENGTH = 255;

/** A validated repository name; only `parseRepository` makes one. */
export type Repository = string & { readonly __repository: unique symbol };
export type Tag = string & { readonly __tag: unique symbol };

/** Validates a repository name (`library/alpine`); throws NameInvalidError. */
export function parseRepository(name: string): Repository {
  if (typeof name !== 'string' || name.length === 0) {
    throw new NameInvalidError('repository name is empty');
  }
  if (name.length > MAX_NAME_LENGTH) {
    throw new NameInvalidError(`repository name is longer than ${MAX_NAME_LENGTH} characters`);
  }
  for (const component of name.split('/')) {
    if (!PATH_COMPONENT.test(component)) {
      throw new NameInvalidError(
        `invalid repository name ${JSON.stringify(name)}: components are lowercase letters and digits separated by ".", "_", "__" or "-"`,
      );
    }
  }
  return name as Repository;
}

export function isTag(value: string): value is Tag {
  return TAG.test(value);
}

/** Validates a tag; throws TagInvalidError. */
export function parseTag(value: string): Tag {
  if (!isTag(value)) {
    throw new TagInvalidError(`invalid tag ${JSON.stringify(value.slice(0, 140))}`);
  }
  return value;
}

/** What `/manifests/<reference>` names: a tag or a digest. */
export type ManifestReference = { kind: 'tag'; tag: Tag } | { kind: 'digest'; digest: Digest };

/** Parses the `<reference>` of a manifest URL; a value with a colon must be a digest. */
export function parseManifestReference(value: string): ManifestReference {
  if (value.includes(':')) return { kind: 'digest', digest: parseDigest(value).digest };
  return { kind: 'tag', tag: parseTag(value) };
}

export interface ImageReference {
  repository: Repository;
  tag?: Tag;
  digest?: Digest;
}

/**
 * Parses `name[:tag][@digest]`. A name's first component may carry a host with a port
 * (`localhost:5000/foo`), so the tag colon is the last one after the last slash.
 */
export function parseImageReference(value: string): ImageReference {
  let rest = value;
  let digest: Digest | undefined;
  const at = rest.indexOf('@');
  if (at >= 0) {
    digest = parseDigest(rest.slice(at + 1)).digest;
    rest = rest.slice(0, at);
  }
  let tag: Tag | undefined;
  const colon = rest.lastIndexOf(':');
  if (colon > rest.lastIndexOf('/')) {
    tag = parseTag(rest.slice(colon + 1));
    rest = rest.slice(0, colon);
  }
  const result: ImageReference = { repository: parseRepository(rest) };
  if (tag !== undefined) result.tag = tag;
  if (digest !== undefined) result.digest = digest;
  return result;
}

export function formatImageReference(ref: ImageReference): string {
  return `${ref.repository}${ref.tag ? `:${ref.tag}` : ''}${ref.digest ? `@${ref.digest}` : ''}`;
}
