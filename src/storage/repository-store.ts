/** The per-repository view over the blob store: links, manifests and tags, on a StorageDriver. */
import { parseDigest, type Digest } from '../oci/digest.js';
import type { Descriptor } from '../oci/descriptor.js';
import { parseRepository, type Tag } from '../oci/reference.js';
import { isTag } from '../oci/reference.js';
import { parseRepositoryLink, paths, REPOSITORY_DATA_DIRS } from './paths.js';
import { recordPull } from './last-pull.js';
import type {
  ManifestLink,
  RepositoryKey,
  RepositoryStore,
  StorageDriver,
  TagLink,
  UpstreamRepository,
} from './types.js';
import { PathNotFoundError } from './errors.js';

export class DriverRepositoryStore implements RepositoryStore {
  constructor(private readonly driver: StorageDriver) {}

  async linkBlob(repo: RepositoryKey, descriptor: Descriptor): Promise<void> {
    await this.driver.putContent(paths.layerLink(repo, descriptor.digest), descriptor.digest);
  }

  async hasBlob(repo: RepositoryKey, digest: Digest): Promise<boolean> {
    return (await this.driver.stat(paths.layerLink(repo, digest))) !== undefined;
  }

  async linkManifest(repo: RepositoryKey, link: ManifestLink): Promise<void> {
    await this.driver.putContent(
      paths.manifestRevisionLink(repo, link.digest),
      JSON.stringify(link),
    );
  }

  async getManifest(repo: RepositoryKey, digest: Digest): Promise<ManifestLink | undefined> {
    const json = await this.readJson(paths.manifestRevisionLink(repo, digest));
    if (!json || typeof json.mediaType !== 'string' || typeof json.size !== 'number')
      return undefined;
    return { digest, mediaType: json.mediaType, size: json.size };
  }

  async setTag(repo: RepositoryKey, tag: Tag, link: TagLink): Promise<void> {
    await this.driver.putContent(paths.tagLink(repo, tag), JSON.stringify(link));
  }

  async getTag(repo: RepositoryKey, tag: Tag): Promise<TagLink | undefined> {
    const json = await this.readJson(paths.tagLink(repo, tag));
    if (!json || typeof json.digest !== 'string' || typeof json.confirmedAt !== 'number')
      return undefined;
    return { digest: parseDigest(json.digest).digest, confirmedAt: json.confirmedAt };
  }

  async deleteTag(repo: RepositoryKey, tag: Tag): Promise<void> {
    const link = paths.tagLink(repo, tag);
    await this.driver.delete(link.slice(0, link.lastIndexOf('/current/')));
  }

  async listTags(repo: RepositoryKey): Promise<string[]> {
    return (await this.driver.list(paths.tagsRoot(repo))).filter(isTag).sort();
  }

  async listRepositories(upstream: string): Promise<string[]> {
    // Where a directory's listing is a request (S3), a walk of the tree asks one per directory,
    // one after another: thousands of repositories took a minute. One listing of every key asks
    // once per 1,000 keys.
    const listed = await this.listedUpstream(upstream);
    if (listed) return [...listed.keys()].sort();
    const found: string[] = [];
    const walk = async (prefix: string, dir: string): Promise<void> => {
      const children = await this.driver.list(dir);
      if (children.includes('_manifests') || children.includes('_layers')) found.push(prefix);
      for (const child of children) {
        if (REPOSITORY_DATA_DIRS.includes(child)) continue;
        const name = prefix ? `${prefix}/${child}` : child;
        try {
          parseRepository(name);
        } catch {
          continue;
        }
        await walk(name, `${dir}/${child}`);
      }
    };
    await walk('', paths.upstreamRoot(upstream));
    return found.sort();
  }

  async listManifests(repo: RepositoryKey): Promise<{ digest: Digest; pulledAt: number }[]> {
    return this.manifestsPulled(repo, await this.linkedDigests(paths.revisionsRoot(repo)));
  }

  async manifestsPulled(
    repo: RepositoryKey,
    digests: readonly Digest[],
  ): Promise<{ digest: Digest; pulledAt: number }[]> {
    // The link's own time: on S3 its metadata (a listing gives only the object's last write).
    const found = await Promise.all(
      digests.map(async (digest) => {
        const info = await this.driver.stat(paths.manifestRevisionLink(repo, digest));
        return info ? { digest, pulledAt: info.modTime.getTime() } : undefined;
      }),
    );
    return found.filter((m) => m !== undefined);
  }

  listUpstream(upstream: string): Promise<Map<string, UpstreamRepository> | undefined> {
    return this.listedUpstream(upstream);
  }

  /** One listing of every key of an upstream's repositories; undefined where the driver cannot. */
  private async listedUpstream(
    upstream: string,
  ): Promise<Map<string, UpstreamRepository> | undefined> {
    if (!this.driver.walk) return undefined;
    const root = `${paths.upstreamRoot(upstream)}/`;
    const found = new Map<string, UpstreamRepository>();
    for await (const file of this.driver.walk(paths.upstreamRoot(upstream))) {
      if (!file.path.startsWith(root)) continue;
      const link = parseRepositoryLink(file.path.slice(root.length));
      if (!link) continue;
      let repository = found.get(link.repository);
      if (!repository)
        found.set(link.repository, (repository = { blobLinks: [], manifests: [], tags: [] }));
      if (link.kind === 'tag') repository.tags.push(link.tag);
      else (link.kind === 'blob' ? repository.blobLinks : repository.manifests).push(link.digest);
    }
    for (const repository of found.values()) repository.tags.sort();
    return found;
  }

  async listBlobLinks(repo: RepositoryKey): Promise<Digest[]> {
    return this.linkedDigests(paths.layersRoot(repo));
  }

  async markManifestPulled(repo: RepositoryKey, digest: Digest, at: number): Promise<void> {
    await recordPull(this.driver, paths.manifestRevisionLink(repo, digest), at);
  }

  async unlinkManifest(repo: RepositoryKey, digest: Digest): Promise<void> {
    await this.driver.delete(parentDir(paths.manifestRevisionLink(repo, digest)));
    // What was kept about it goes with it: the referrers answers for it as a subject.
    await this.driver.delete(paths.referrersOf(repo, digest));
  }

  async unlinkBlob(repo: RepositoryKey, digest: Digest): Promise<void> {
    await this.driver.delete(parentDir(paths.layerLink(repo, digest)));
  }

  async prune(repo: RepositoryKey): Promise<void> {
    for (const dir of REPOSITORY_DATA_DIRS)
      await this.driver.deleteEmpty(`${paths.repositoryRoot(repo)}/${dir}`);
    // The repository's own directory goes too when nothing (not even a nested repository) is left.
    await this.driver.deleteEmpty(paths.repositoryRoot(repo), { recursive: false });
  }

  /** Digests under `<root>/<algorithm>/<hex>/link`. */
  private async linkedDigests(root: string): Promise<Digest[]> {
    const digests: Digest[] = [];
    for (const algorithm of await this.driver.list(root)) {
      for (const hex of await this.driver.list(`${root}/${algorithm}`)) {
        try {
          digests.push(parseDigest(`${algorithm}:${hex}`).digest);
        } catch {
          // not a digest: not ours
        }
      }
    }
    return digests;
  }

  private async readJson(p: string): Promise<Record<string, unknown> | undefined> {
    try {
      const value: unknown = JSON.parse((await this.driver.getContent(p)).toString('utf8'));
      return typeof value === 'object' && value !== null
        ? (value as Record<string, unknown>)
        : undefined;
    } catch (err) {
      if (err instanceof PathNotFoundError || err instanceof SyntaxError) return undefined;
      throw err;
    }
  }
}

const parentDir = (p: string) => p.slice(0, p.lastIndexOf('/'));
