/**
 * Every keyv key, built in this one module. All live in the `pullcache` namespace:
 *
 * ```
 * pullcache:
 * ├── blob:<digest>                                  Descriptor {digest, size, mediaType?}
 * ├── repo:<upstream>/<repository>:blob:<digest>     Descriptor, the repository holds the blob
 * ├── repo:<upstream>/<repository>:manifest:<digest> ManifestLink {digest, mediaType, size}
 * └── repo:<upstream>/<repository>:tag:<tag>         TagLink {digest, confirmedAt}
 * ```
 * Names and digests are validated before they get here; none contains ':' except the digest,
 * which is always last.
 */
import type { Digest } from '../oci/digest.js';
import type { Tag } from '../oci/reference.js';
import type { RepositoryKey } from '../storage/types.js';

export const NAMESPACE = 'pullcache';

const repo = (r: RepositoryKey) => `repo:${r.upstream}/${r.repository}`;

export const keys = {
  blob: (digest: Digest) => `blob:${digest}`,
  repositoryBlob: (r: RepositoryKey, digest: Digest) => `${repo(r)}:blob:${digest}`,
  manifest: (r: RepositoryKey, digest: Digest) => `${repo(r)}:manifest:${digest}`,
  tag: (r: RepositoryKey, tag: Tag) => `${repo(r)}:tag:${tag}`,
};
