/**
 * Bundles for air-gapped sites: an OCI image layout in a tar archive
 * (https://github.com/opencontainers/image-spec/blob/main/image-layout.md): `oci-layout`,
 * `index.json`, naming every image with its full reference in `org.opencontainers.image.ref.name`
 * (and pullcache's own annotations for upstream, repository and tag), then `blobs/<alg>/<hex>`.
 * The index comes before the blobs so that an import learns which upstreams a bundle is for before
 * it reads a blob, and can refuse it at once (bundles from other tools may name it last: those are
 * checked when it comes). Other tools read it as an OCI archive
 * (`skopeo copy oci-archive:bundle.tar:REF ...`).
 *
 * This file is the format (the index, written and read); bundle-export.ts and bundle-import.ts
 * are the commands, bundle-io.ts where bundles are written to and read from.
 */
import { formatLocation, type ImageLocation } from '../routing.js';
import { parseDigest, type Digest } from '../oci/digest.js';
import { MediaType } from '../oci/media-types.js';
import { isTag, parseRepository, type Tag } from '../oci/reference.js';
import { UPSTREAM_NAME } from '../config/schema.js';
import type { RepositoryKey } from '../storage/types.js';
import { BundleError } from './bundle-io.js';

export { BundleError, type BundleSource, type BundleTarget } from './bundle-io.js';

export const ANNOTATION_REF_NAME = 'org.opencontainers.image.ref.name';
const ANNOTATION_CONTAINERD_NAME = 'io.containerd.image.name';
const ANNOTATION_UPSTREAM = 'dev.pullcache.upstream';
const ANNOTATION_REPOSITORY = 'dev.pullcache.repository';
const ANNOTATION_TAG = 'dev.pullcache.tag';

/** An image as a bundle's index names it. */
export interface BundleImage {
  location: ImageLocation & { digest: Digest };
  mediaType: string;
  size: number;
}

/** `index.json` naming these images, with their full references and pullcache's annotations. */
export function indexJson(images: BundleImage[]): Buffer {
  const index = {
    schemaVersion: 2,
    mediaType: MediaType.OciIndex,
    manifests: images.map((image) => {
      const annotations: Record<string, string> = {
        [ANNOTATION_UPSTREAM]: image.location.upstream,
        [ANNOTATION_REPOSITORY]: image.location.repository,
      };
      if (image.location.tag) {
        annotations[ANNOTATION_TAG] = image.location.tag;
        annotations[ANNOTATION_REF_NAME] = formatLocation(image.location);
        annotations[ANNOTATION_CONTAINERD_NAME] = formatLocation(image.location);
      }
      return {
        mediaType: image.mediaType,
        digest: image.location.digest,
        size: image.size,
        annotations,
      };
    }),
  };
  return Buffer.from(JSON.stringify(index, null, 2));
}

/** One image of a bundle's index: where it is from, and its tag if it has one. */
export interface IndexEntry {
  digest: Digest;
  mediaType: string;
  size: number;
  upstream: string;
  repository: RepositoryKey['repository'];
  tag?: Tag;
}

/** The images `index.json` names; throws BundleError, naming the entry, for anything invalid. */
export function parseIndex(bytes: Buffer, file: string): IndexEntry[] {
  let index: { manifests?: unknown };
  try {
    index = JSON.parse(bytes.toString('utf8')) as { manifests?: unknown };
  } catch {
    throw new BundleError(`${file}: index.json is not valid JSON`);
  }
  if (!Array.isArray(index.manifests))
    throw new BundleError(`${file}: index.json has no manifests`);
  return index.manifests.map((raw: unknown, i: number) => {
    const d = raw as {
      digest?: string;
      mediaType?: string;
      size?: number;
      annotations?: Record<string, string>;
    };
    const where = `${file}: index.json manifests[${i}]`;
    const annotations = d.annotations ?? {};
    let digest: Digest;
    try {
      digest = parseDigest(String(d.digest)).digest;
    } catch {
      throw new BundleError(`${where} has an invalid digest`);
    }
    let upstream = annotations[ANNOTATION_UPSTREAM];
    let repository = annotations[ANNOTATION_REPOSITORY];
    let tag = annotations[ANNOTATION_TAG];
    // Bundles from other tools: take the upstream, repository and tag from the full reference.
    const full = annotations[ANNOTATION_REF_NAME] ?? annotations[ANNOTATION_CONTAINERD_NAME];
    if ((!upstream || !repository) && full) {
      const m = /^([^/]+)\/(.+?)(?::([^:/@]+))?$/.exec(full);
      if (m) {
        upstream = m[1];
        repository = m[2];
        tag ??= m[3];
      }
    }
    if (!upstream || !UPSTREAM_NAME.test(upstream) || !repository)
      throw new BundleError(`${where} does not say which upstream and repository it is from`);
    let parsedRepository;
    try {
      parsedRepository = parseRepository(repository);
    } catch {
      throw new BundleError(`${where} names an invalid repository ${JSON.stringify(repository)}`);
    }
    if (tag !== undefined && !isTag(tag))
      throw new BundleError(`${where} names an invalid tag ${JSON.stringify(tag)}`);
    const entry: IndexEntry = {
      digest,
      mediaType: String(d.mediaType ?? ''),
      size: Number(d.size ?? 0),
      upstream,
      repository: parsedRepository,
    };
    if (tag !== undefined) entry.tag = tag;
    return entry;
  });
}

/**
 * A whole (small) entry or stream; throws BundleError past `limit` bytes, naming it as `name`
 * (`bundle.tar: index.json`).
 */
export async function readAll(
  stream: AsyncIterable<unknown>,
  limit: number,
  name = 'an entry',
): Promise<Buffer> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of stream) {
    size += (chunk as Buffer).length;
    if (size > limit) throw new BundleError(`${name} is larger than the ${limit} bytes allowed`);
    chunks.push(chunk as Buffer);
  }
  return Buffer.concat(chunks);
}
