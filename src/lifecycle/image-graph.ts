/**
 * The cache's content as a graph in memory: blobs with their sizes and last-pulled times, and per
 * repository the manifests it links (an index -> its platform manifests -> their config and
 * layers), its layer links and its tags. Eviction and `ls`/`du` read it instead of walking
 * storage; graph-keeper.ts keeps it in step with storage as content comes and goes.
 *
 * An image is a root manifest of a repository (one no other manifest of that repository
 * references) with everything it reaches. A blob's `refs` counts the manifests, in any
 * repository, that hold it (as config, layer, or their own bytes): a blob with no refs is an
 * entry of its own ("orphan": a pull interrupted after some layers, a blob fetched by digest).
 */
import type { Digest } from '../oci/digest.js';
import type { Tag } from '../oci/reference.js';
import type { RepositoryKey } from '../storage/types.js';
import type { RemovedEvent } from './types.js';

export interface BlobNode {
  digest: Digest;
  size: number;
  pulledAt: number;
  /** Repositories with a layer link to it, by repository id. */
  links: Set<string>;
}

export interface ManifestNode {
  digest: Digest;
  pulledAt: number;
  /** Manifests this one references (an index's platform manifests). */
  children: Digest[];
  /** Blobs this one holds: config and layers, and its own bytes. */
  blobs: Digest[];
  /** Manifests of the same repository that reference this one. */
  parents: Set<Digest>;
  /** Its bytes could not be read when it was added: it references nothing that is known. */
  unread?: true;
}

export interface RepositoryNode {
  key: RepositoryKey;
  manifests: Map<Digest, ManifestNode>;
  /** Per blob, the manifests of this repository holding it. */
  blobHolders: Map<Digest, Set<Digest>>;
  /** Blobs this repository has a layer link to. */
  links: Set<Digest>;
  tags: Map<Tag, Digest>;
}

/** An image as eviction and `ls` see it. */
export interface Image {
  repo: RepositoryKey;
  digest: Digest;
  /** Every manifest of the image, the root first. */
  manifests: Digest[];
  /** Every blob of the image, manifests' own bytes included. */
  blobs: Digest[];
  tags: Tag[];
  pulledAt: number;
  /** Bytes that leave with the image (no other manifest holds them). */
  ownBytes: number;
  /** Bytes of blobs that other images hold too. */
  sharedBytes: number;
}

export const repositoryId = (repo: RepositoryKey) => `${repo.upstream}/${repo.repository}`;

export class ImageGraph {
  readonly blobs = new Map<Digest, BlobNode>();
  readonly repositories = new Map<string, RepositoryNode>();
  /** Bytes of every blob in storage. */
  bytes = 0;
  /**
   * Per digest, the manifests (in any repository) that hold it: kept apart from the blobs, since
   * a manifest is often linked before its layers arrive.
   */
  private readonly refCount = new Map<Digest, number>();

  /** How many manifests, in any repository, hold the blob. */
  refs(digest: Digest): number {
    return this.refCount.get(digest) ?? 0;
  }

  addBlob(digest: Digest, size: number, pulledAt: number): void {
    const existing = this.blobs.get(digest);
    if (existing) {
      existing.pulledAt = Math.max(existing.pulledAt, pulledAt);
      return;
    }
    const links = new Set<string>();
    for (const [id, node] of this.repositories) if (node.links.has(digest)) links.add(id);
    this.blobs.set(digest, { digest, size, pulledAt, links });
    this.bytes += size;
  }

  removeBlob(digest: Digest): void {
    const blob = this.blobs.get(digest);
    if (!blob) return;
    this.blobs.delete(digest);
    this.bytes -= blob.size;
  }

  repository(repo: RepositoryKey): RepositoryNode {
    const id = repositoryId(repo);
    let node = this.repositories.get(id);
    if (!node) {
      node = {
        key: { upstream: repo.upstream, repository: repo.repository },
        manifests: new Map(),
        blobHolders: new Map(),
        links: new Set(),
        tags: new Map(),
      };
      this.repositories.set(id, node);
    }
    return node;
  }

  /** Whether a manifest of the repository holds the blob (its config, a layer, its own bytes). */
  manifestHolds(repo: RepositoryKey, digest: Digest): boolean {
    return (this.repositories.get(repositoryId(repo))?.blobHolders.get(digest)?.size ?? 0) > 0;
  }

  /** Records a layer link; a link to a blob not (yet) in the graph is kept on the repository. */
  linkBlob(repo: RepositoryKey, digest: Digest): void {
    this.repository(repo).links.add(digest);
    this.blobs.get(digest)?.links.add(repositoryId(repo));
  }

  unlinkBlob(repo: RepositoryKey, digest: Digest): void {
    this.repositories.get(repositoryId(repo))?.links.delete(digest);
    this.blobs.get(digest)?.links.delete(repositoryId(repo));
  }

  /** Adds (or refreshes) a manifest of a repository with what it references. */
  addManifest(
    repo: RepositoryKey,
    digest: Digest,
    references: { children: Digest[]; blobs: Digest[]; unread?: boolean },
    pulledAt: number,
  ): void {
    const node = this.repository(repo);
    const existing = node.manifests.get(digest);
    if (existing) {
      existing.pulledAt = Math.max(existing.pulledAt, pulledAt);
      return;
    }
    const blobs = [...new Set([digest, ...references.blobs])];
    const manifest: ManifestNode = {
      digest,
      pulledAt,
      children: [...new Set(references.children)],
      blobs,
      parents: new Set(),
      ...(references.unread ? { unread: true as const } : {}),
    };
    node.manifests.set(digest, manifest);
    for (const blob of blobs) {
      let holders = node.blobHolders.get(blob);
      if (!holders) node.blobHolders.set(blob, (holders = new Set()));
      holders.add(digest);
      this.refCount.set(blob, this.refs(blob) + 1);
    }
    for (const child of manifest.children) node.manifests.get(child)?.parents.add(digest);
    for (const other of node.manifests.values())
      if (other.children.includes(digest)) manifest.parents.add(other.digest);
  }

  removeManifest(repo: RepositoryKey, digest: Digest): void {
    const node = this.repositories.get(repositoryId(repo));
    const manifest = node?.manifests.get(digest);
    if (!node || !manifest) return;
    node.manifests.delete(digest);
    for (const blob of manifest.blobs) {
      const holders = node.blobHolders.get(blob);
      holders?.delete(digest);
      if (holders?.size === 0) node.blobHolders.delete(blob);
      const refs = this.refs(blob) - 1;
      if (refs > 0) this.refCount.set(blob, refs);
      else this.refCount.delete(blob);
    }
    for (const child of manifest.children) node.manifests.get(child)?.parents.delete(digest);
    for (const [tag, target] of node.tags) if (target === digest) node.tags.delete(tag);
  }

  setTag(repo: RepositoryKey, tag: Tag, digest: Digest): void {
    this.repository(repo).tags.set(tag, digest);
  }

  removeTag(repo: RepositoryKey, tag: Tag): void {
    this.repositories.get(repositoryId(repo))?.tags.delete(tag);
  }

  /**
   * Records a pull of a manifest or blob of a repository, and resolves to what must be
   * persisted: the manifests whose time changed, and the blob when it is an entry of its own.
   */
  markPulled(
    repo: RepositoryKey,
    digest: Digest,
    at: number,
  ): { manifests: Digest[]; blob: boolean } {
    const node = this.repositories.get(repositoryId(repo));
    const manifests: Digest[] = [];
    const manifest = node?.manifests.get(digest);
    if (manifest) {
      manifest.pulledAt = at;
      manifests.push(digest);
    } else {
      for (const holder of node?.blobHolders.get(digest) ?? []) {
        const m = node!.manifests.get(holder);
        if (m && m.digest !== digest) {
          m.pulledAt = at;
          manifests.push(holder);
        }
      }
    }
    const blob = this.blobs.get(digest);
    if (blob) blob.pulledAt = at;
    return { manifests, blob: blob !== undefined && this.refs(digest) === 0 };
  }

  /** The manifests of a repository that no other of its manifests references. */
  roots(node: RepositoryNode): ManifestNode[] {
    return [...node.manifests.values()].filter((m) => m.parents.size === 0);
  }

  /** The image rooted at a manifest: everything it reaches in its repository. */
  image(node: RepositoryNode, root: ManifestNode): Image {
    const manifests: Digest[] = [];
    const seen = new Set<Digest>();
    const stack = [root];
    let pulledAt = 0;
    while (stack.length > 0) {
      const m = stack.pop()!;
      if (seen.has(m.digest)) continue;
      seen.add(m.digest);
      manifests.push(m.digest);
      pulledAt = Math.max(pulledAt, m.pulledAt);
      for (const child of m.children) {
        const c = node.manifests.get(child);
        if (c) stack.push(c);
      }
    }
    // Blobs with how many of this image's manifests hold them, to tell own bytes from shared.
    const held = new Map<Digest, number>();
    for (const digest of manifests)
      for (const blob of node.manifests.get(digest)!.blobs)
        held.set(blob, (held.get(blob) ?? 0) + 1);
    let ownBytes = 0;
    let sharedBytes = 0;
    for (const [digest, count] of held) {
      const blob = this.blobs.get(digest);
      if (!blob) continue;
      if (this.refs(digest) <= count) ownBytes += blob.size;
      else sharedBytes += blob.size;
    }
    const tags = [...node.tags].filter(([, target]) => seen.has(target)).map(([tag]) => tag);
    return {
      repo: node.key,
      digest: root.digest,
      manifests,
      blobs: [...held.keys()],
      tags: tags.sort(),
      pulledAt,
      ownBytes,
      sharedBytes,
    };
  }

  /** Every image of every repository. */
  *images(): Generator<Image> {
    for (const node of this.repositories.values())
      for (const root of this.roots(node)) yield this.image(node, root);
  }

  /** Blobs that no manifest holds: entries of their own. */
  *orphans(): Generator<BlobNode> {
    for (const blob of this.blobs.values()) if (this.refs(blob.digest) === 0) yield blob;
  }

  /** The repository key of a repository id, or undefined when the graph does not know it. */
  repositoryKey(id: string): RepositoryKey | undefined {
    return this.repositories.get(id)?.key;
  }

  /** Drops what left storage (removal.ts here, or another process on the same storage). */
  drop(event: RemovedEvent): void {
    switch (event.kind) {
      case 'blob':
        return this.removeBlob(event.digest);
      case 'link':
        return this.unlinkBlob(event.repo, event.digest);
      case 'manifest':
        return this.removeManifest(event.repo, event.digest);
      case 'tag':
        return this.removeTag(event.repo, event.tag);
    }
  }

  /** Forgets a repository that holds nothing any more. */
  pruneRepository(repo: RepositoryKey): boolean {
    const id = repositoryId(repo);
    const node = this.repositories.get(id);
    if (!node || node.manifests.size > 0 || node.tags.size > 0 || node.links.size > 0) return false;
    this.repositories.delete(id);
    return true;
  }
}
