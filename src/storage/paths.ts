/**
 * Every storage path, built in this one module and only from validated names and digests, so
 * no path can leave the storage root. The layout, relative to the driver's root:
 *
 * ```
 * <root>/
 * ├── blobs/                                  content, shared by every upstream and repository
 * │   └── <algorithm>/<hex[0:2]>/<hex>/data
 * ├── .tmp/                                   small files being written (filesystem only),
 * │                                           renamed into place once flushed
 * ├── lifecycle/                              the cache's own records (see src/lifecycle/)
 * │   ├── pins.json                           images pinned with `pullcache pin`
 * │   ├── owner.json                          the process that evicts: {pid, host, url, expiresAt}
 * │   ├── owner.json.takeover-<sha256>-<n>    a claim to take over a stale record (owner.ts)
 * │   └── owner.key                           the commands' admin token secret, mode 0600, on
 * │                                           the local disk even with S3 (access/owner-key.ts)
 * ├── uploads/                                upload sessions; never visible as blobs
 * │   └── <uuid>/
 * │       ├── data
 * │       └── startedat                       ISO time the session was created
 * └── repositories/
 *     └── <upstream>/<repository...>/         e.g. docker.io/library/alpine
 *         ├── _layers/<algorithm>/<hex>/link  the repository holds this blob
 *         ├── _manifests/
 *         │   ├── revisions/<algorithm>/<hex>/link   JSON {digest, mediaType, size}
 *         │   └── tags/<tag>/current/link            JSON {digest, confirmedAt}
 *         └── _referrers/<algorithm>/<hex>/      referrers answers for one subject manifest
 *             └── <filter>                           JSON {index, filtersApplied, confirmedAt}
 * ```
 * A blob data file's and a revision link's modification time is when it was last pulled.
 * A referrers `<filter>` is `all`, or `artifactType-<sha256 hex of the sorted types joined by
 * ",">` (a media type may hold characters no path should).
 * Repository components cannot start with `_` (name grammar), so `_layers`, `_manifests` and
 * `_referrers` never collide with a nested repository.
 */
import { createHash } from 'node:crypto';
import { UPSTREAM_NAME } from '../config/schema.js';
import { parseDigest, type Digest } from '../oci/digest.js';
import { parseRepository, parseTag, type Tag } from '../oci/reference.js';
import type { RepositoryKey } from './types.js';

const UPLOAD_ID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

export function isUploadId(id: string): boolean {
  return UPLOAD_ID.test(id);
}

export const paths = {
  blobsRoot: () => 'blobs',
  pins: () => 'lifecycle/pins.json',
  owner: () => 'lifecycle/owner.json',
  blobData(digest: Digest): string {
    const { algorithm, hex } = parseDigest(digest);
    return `blobs/${algorithm}/${hex.slice(0, 2)}/${hex}/data`;
  },
  uploadsRoot: () => 'uploads',
  uploadDir(id: string): string {
    if (!isUploadId(id)) throw new Error(`invalid upload id ${JSON.stringify(id)}`);
    return `uploads/${id}`;
  },
  uploadData: (id: string) => `${paths.uploadDir(id)}/data`,
  uploadStartedAt: (id: string) => `${paths.uploadDir(id)}/startedat`,
  upstreamRoot(upstream: string): string {
    if (!UPSTREAM_NAME.test(upstream))
      throw new Error(`invalid upstream name ${JSON.stringify(upstream)}`);
    return `repositories/${upstream}`;
  },
  repositoryRoot(repo: RepositoryKey): string {
    return `${paths.upstreamRoot(repo.upstream)}/${parseRepository(repo.repository)}`;
  },
  layerLink(repo: RepositoryKey, digest: Digest): string {
    const { algorithm, hex } = parseDigest(digest);
    return `${paths.repositoryRoot(repo)}/_layers/${algorithm}/${hex}/link`;
  },
  layersRoot: (repo: RepositoryKey) => `${paths.repositoryRoot(repo)}/_layers`,
  revisionsRoot: (repo: RepositoryKey) => `${paths.repositoryRoot(repo)}/_manifests/revisions`,
  manifestRevisionLink(repo: RepositoryKey, digest: Digest): string {
    const { algorithm, hex } = parseDigest(digest);
    return `${paths.repositoryRoot(repo)}/_manifests/revisions/${algorithm}/${hex}/link`;
  },
  tagsRoot: (repo: RepositoryKey) => `${paths.repositoryRoot(repo)}/_manifests/tags`,
  tagLink(repo: RepositoryKey, tag: Tag): string {
    return `${paths.tagsRoot(repo)}/${parseTag(tag)}/current/link`;
  },
  /** Every referrers answer kept for one subject manifest. */
  referrersOf(repo: RepositoryKey, subject: Digest): string {
    const { algorithm, hex } = parseDigest(subject);
    return `${paths.repositoryRoot(repo)}/_referrers/${algorithm}/${hex}`;
  },
  referrers(repo: RepositoryKey, subject: Digest, artifactTypes: readonly string[]): string {
    const types = [...new Set(artifactTypes)].sort();
    const filter =
      types.length === 0
        ? 'all'
        : `artifactType-${createHash('sha256').update(types.join(',')).digest('hex')}`;
    return `${paths.referrersOf(repo, subject)}/${filter}`;
  },
};

/** Directory names that mark a repository's own data, not a nested repository. */
export const REPOSITORY_DATA_DIRS = ['_layers', '_manifests', '_referrers', '_uploads'];

/** A link file of a repository, as `parseRepositoryLink` reads its path. */
export type RepositoryLinkPath =
  | { repository: string; kind: 'blob' | 'manifest'; digest: Digest }
  | { repository: string; kind: 'tag'; tag: Tag };

/**
 * What a file under `upstreamRoot` is, from its path relative to that root (the layout above,
 * read backwards): a layer link, a manifest revision link or a tag's current link of a
 * repository; undefined for any other file, or a name or digest that is not valid.
 */
export function parseRepositoryLink(relative: string): RepositoryLinkPath | undefined {
  const parts = relative.split('/');
  // The repository's name is what comes before its first data directory.
  const at = parts.findIndex((part) => REPOSITORY_DATA_DIRS.includes(part));
  if (at <= 0) return undefined;
  const [dir, a, b, c, d, ...more] = parts.slice(at);
  if (more.length > 0) return undefined;
  try {
    const repository = parseRepository(parts.slice(0, at).join('/'));
    if (dir === '_layers' && c === 'link' && d === undefined)
      return { repository, kind: 'blob', digest: parseDigest(`${a}:${b}`).digest };
    if (dir !== '_manifests' || d !== 'link') return undefined;
    if (a === 'revisions')
      return { repository, kind: 'manifest', digest: parseDigest(`${b}:${c}`).digest };
    if (a === 'tags' && c === 'current') return { repository, kind: 'tag', tag: parseTag(b!) };
  } catch {
    // Not a valid name, digest or tag: no file of ours.
  }
  return undefined;
}
