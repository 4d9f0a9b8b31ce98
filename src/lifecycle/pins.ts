/**
 * Pinned images are never evicted: those of `retention.pins` in the config, and those pinned with
 * `pullcache pin`, kept in storage (`lifecycle/pins.json`) so that they survive a restart. A pin
 * names a tag (the image it points at now), a digest, or with neither every image of the
 * repository.
 */
import { parseDigest } from '../oci/digest.js';
import { parseRepository, parseTag } from '../oci/reference.js';
import { paths } from '../storage/paths.js';
import { PathNotFoundError, type StorageDriver } from '../storage/types.js';
import type { Image, RepositoryNode } from './image-graph.js';
import type { ImageRef } from './types.js';

export class Pins {
  private stored: ImageRef[] = [];

  constructor(
    private readonly driver: StorageDriver,
    private readonly configured: ImageRef[],
  ) {}

  async load(): Promise<void> {
    try {
      const value = JSON.parse(
        (await this.driver.getContent(paths.pins())).toString('utf8'),
      ) as unknown;
      this.stored = Array.isArray(value) ? value.flatMap((v) => validRef(v)) : [];
    } catch (err) {
      if (!(err instanceof PathNotFoundError) && !(err instanceof SyntaxError)) throw err;
      this.stored = [];
    }
  }

  list(): string[] {
    return [...this.configured, ...this.stored].map((p) => p.reference);
  }

  covers(node: RepositoryNode, image: Image): boolean {
    for (const pin of this.all()) {
      if (pin.upstream !== node.key.upstream || pin.repository !== node.key.repository) continue;
      if (pin.digest) {
        if (image.manifests.includes(pin.digest)) return true;
      } else if (pin.tag) {
        const target = node.tags.get(pin.tag);
        if (target && image.manifests.includes(target)) return true;
      } else {
        return true;
      }
    }
    return false;
  }

  async add(refs: ImageRef[]): Promise<void> {
    await this.load();
    for (const ref of refs) if (!this.stored.some((p) => same(p, ref))) this.stored.push(ref);
    await this.save();
  }

  /** Resolves to the references that no `pin` had pinned. */
  async remove(refs: ImageRef[]): Promise<string[]> {
    await this.load();
    const missing: string[] = [];
    for (const ref of refs) {
      const before = this.stored.length;
      this.stored = this.stored.filter((p) => !same(p, ref));
      if (this.stored.length === before) missing.push(ref.reference);
    }
    await this.save();
    return missing;
  }

  private all(): ImageRef[] {
    return [...this.configured, ...this.stored];
  }

  private async save(): Promise<void> {
    await this.driver.putContent(paths.pins(), `${JSON.stringify(this.stored, null, 2)}\n`);
  }
}

const same = (a: ImageRef, b: ImageRef) =>
  a.upstream === b.upstream &&
  a.repository === b.repository &&
  a.tag === b.tag &&
  a.digest === b.digest;

/** A pin read back from storage, validated like any name before it is used. */
function validRef(value: unknown): ImageRef[] {
  if (typeof value !== 'object' || value === null) return [];
  const v = value as Record<string, unknown>;
  try {
    if (typeof v.upstream !== 'string' || typeof v.repository !== 'string') return [];
    const ref: ImageRef = {
      upstream: v.upstream,
      repository: parseRepository(v.repository),
      reference: typeof v.reference === 'string' ? v.reference : `${v.upstream}/${v.repository}`,
    };
    if (typeof v.tag === 'string') ref.tag = parseTag(v.tag);
    if (typeof v.digest === 'string') ref.digest = parseDigest(v.digest).digest;
    return [ref];
  } catch {
    return [];
  }
}
