/**
 * Which manifest a request's Accept header takes, by the reference registry's rule (distribution's
 * `GetManifest` in registry/handlers/manifests.go, 2.8 and main alike):
 * - an OCI image manifest or an OCI index the header does not take is refused, by tag or by
 *   digest: 404 MANIFEST_UNKNOWN "OCI index found, but accept header does not support OCI indexes";
 * - a Docker manifest list asked by tag is answered with its linux/amd64 image manifest (the
 *   first such entry: distribution's `defaultOS`/`defaultArch`), by digest with the list itself
 *   ("we can't return something not matching the digest"); a list without that image is 404;
 * - a Docker image manifest is served whatever the header says (as distribution 3 does; 2.8
 *   rewrites it as a signed schema 1 manifest for a tag, which nothing pulls any more).
 * Where pullcache differs:
 * - with no Accept header, or one that names no manifest type (`application/json`, any type), or
 *   a range that covers the manifest's type (`application/*`, any type) beside manifest types,
 *   any manifest is served as stored (distribution takes only exact types, and refuses an OCI
 *   manifest or index even to a request without an Accept header);
 * - media types are compared case-insensitively (RFC 9110 section 8.3.1), parameters ignored;
 * - a list's child is served only when the header takes the child's type, else 404 as above
 *   (distribution 2.8 rewrites a Docker child as schema 1, 3 answers 400 MANIFEST_INVALID).
 */
import type { Digest } from '../oci/digest.js';
import { ManifestNotAcceptedError } from '../oci/errors.js';
import { parseManifest } from '../oci/manifest.js';
import { MediaType, isManifestMediaType } from '../oci/media-types.js';

/**
 * Whether a request whose Accept header is `header` (Node's join of every Accept line) takes a
 * manifest of `mediaType` (a lowercase manifest media type). Media ranges are compared without
 * their parameters (`;q=0.5` is ignored, as distribution ignores it), case-insensitively.
 */
export function acceptsManifest(header: string | undefined, mediaType: string): boolean {
  // The common case, every client that pulls images: the type is named as is. No parsing.
  if (header === undefined || namesExactly(header, mediaType)) return true;
  let namesManifestType = false;
  for (const element of header.split(',')) {
    const semicolon = element.indexOf(';');
    const range = (semicolon < 0 ? element : element.slice(0, semicolon)).trim().toLowerCase();
    if (range === mediaType || range === '*/*') return true;
    if (range.endsWith('/*') && mediaType.startsWith(range.slice(0, -1))) return true;
    if (isManifestMediaType(range)) namesManifestType = true;
  }
  return !namesManifestType;
}

/** `mediaType` is in `header` as one whole element's type (between `,`, `;` and spaces). */
function namesExactly(header: string, mediaType: string): boolean {
  const at = header.indexOf(mediaType);
  if (at < 0) return false;
  const before = at === 0 ? ',' : header[at - 1]!;
  const after = header[at + mediaType.length] ?? ',';
  return DELIMITERS_BEFORE.includes(before) && DELIMITERS_AFTER.includes(after);
}

const DELIMITERS_BEFORE = ', \t';
const DELIMITERS_AFTER = ',; \t';

/**
 * Whether the answer for a manifest of `mediaType` can depend on the Accept header (so that a
 * cache in front keys it by Accept: `Vary: Accept`). Not for a Docker image manifest, always
 * served, nor a Docker list by digest: their answers are the same for every client, and a cache
 * keeps one copy of them, not one per Accept header that clients send.
 */
export function variesWithAccept(mediaType: string, byTag: boolean): boolean {
  return (
    mediaType === MediaType.OciIndex ||
    mediaType === MediaType.OciManifest ||
    (byTag && mediaType === MediaType.DockerManifestList)
  );
}

/**
 * What to serve for a manifest of `mediaType` that the request does not take (`acceptsManifest`
 * said false): the digest of the Docker list's linux/amd64 image when the list was asked by tag
 * and the header takes that image's type as its descriptor names it (checked again once it is
 * loaded); `undefined` to serve the manifest as it is. Throws ManifestNotAcceptedError where
 * distribution refuses it. `bytes`: the manifest, read only for a list asked by tag.
 */
export async function substituteForAccept(
  header: string | undefined,
  mediaType: string,
  byTag: boolean,
  bytes: () => Promise<Uint8Array>,
): Promise<Digest | undefined> {
  switch (mediaType) {
    case MediaType.OciManifest:
      throw new ManifestNotAcceptedError(
        'OCI manifest found, but the Accept header does not support OCI manifests',
      );
    case MediaType.OciIndex:
      throw new ManifestNotAcceptedError(
        'OCI index found, but the Accept header does not support OCI indexes',
      );
    case MediaType.DockerManifestList: {
      if (!byTag) return undefined;
      const parsed = parseManifest(await bytes(), mediaType);
      const child =
        parsed.kind === 'index'
          ? parsed.manifests.find(
              (d) => d.platform?.os === DEFAULT_OS && d.platform.architecture === DEFAULT_ARCH,
            )
          : undefined;
      if (child === undefined)
        throw new ManifestNotAcceptedError(
          `manifest list found, but the Accept header does not support manifest lists and it has no ${DEFAULT_OS}/${DEFAULT_ARCH} image`,
        );
      if (child.mediaType !== undefined && isManifestMediaType(child.mediaType))
        assertChildAccepted(header, child.mediaType);
      return child.digest;
    }
    default:
      return undefined;
  }
}

/** Throws unless the header takes `mediaType`, the type of a Docker list's default image. */
export function assertChildAccepted(header: string | undefined, mediaType: string): void {
  if (!acceptsManifest(header, mediaType))
    throw new ManifestNotAcceptedError(
      `manifest list found, but the Accept header supports neither manifest lists nor the type of its ${DEFAULT_OS}/${DEFAULT_ARCH} image (${mediaType})`,
    );
}

/** distribution's default platform (`defaultOS`, `defaultArch`), the one Docker Hub picks too. */
const DEFAULT_OS = 'linux';
const DEFAULT_ARCH = 'amd64';
