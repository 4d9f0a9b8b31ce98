/**
 * Pinned images are never evicted: those of `retention.pins` in the config, and those pinned with
 * `pullcache pin`, kept in storage (`lifecycle/pins.json`) so that they survive a restart. A pin
 * names a tag (the image it points at now), a digest, or with neither every image of the
 * repository.
 */
import { UnavailableError } from '../oci/errors.js';
import { createHash } from 'node:crypto';
import type { Logger } from '../log/logger.js';
import { parseDigest } from '../oci/digest.js';
import { parseRepository, parseTag } from '../oci/reference.js';
import { paths } from '../storage/paths.js';
import type { StorageDriver } from '../storage/types.js';
import { PathNotFoundError } from '../storage/errors.js';
import type { Image, RepositoryNode } from './image-graph.js';
import type { ImageRef } from './types.js';

/**
 * A pins file that cannot be read (torn, hand-edited into something that is not a JSON list) is
 * kept as it is: its pins are the operator's to recover, so nothing is saved over it. Until it
 * is fixed (or removed), `pin` and `unpin` fail naming it, and the pins last read from it stay in
 * force (none in a process that never read it whole: those images are then not protected, which
 * the error in the log says). Moving it aside instead would let the next `pin` write a file that
 * silently lacks every other pin. Through the admin API it is a 503 that says why (not a 500).
 */
export class PinsUnreadableError extends UnavailableError {
  constructor(reason: string) {
    super(
      `the pins file (${paths.pins()} in storage) cannot be read (${reason}): fix it or remove it, then try again`,
    );
    this.name = 'PinsUnreadableError';
  }
}

export class Pins {
  private stored: ImageRef[] = [];
  /** Why the pins file could not be read at the last load; undefined when it could. */
  private unreadable: string | undefined;
  /** The content last logged as unreadable: logged once per content, not at every load. */
  private loggedUnreadable: string | undefined;
  /** Whether the pins file has been looked at (found, missing or unreadable). */
  private read = false;

  constructor(
    private readonly driver: StorageDriver,
    private readonly configured: ImageRef[],
    private readonly log?: Logger,
  ) {}

  /** Loads the pins unless a load has been done (the start-up scan's may not have yet). */
  async loaded(): Promise<void> {
    if (!this.read) await this.load();
  }

  async load(): Promise<void> {
    let raw: Buffer;
    try {
      raw = await this.driver.getContent(paths.pins());
    } catch (err) {
      if (!(err instanceof PathNotFoundError)) throw err;
      this.stored = [];
      this.unreadable = undefined;
      this.read = true;
      return;
    }
    this.read = true;
    let value: unknown;
    try {
      value = JSON.parse(raw.toString('utf8'));
      if (!Array.isArray(value)) throw new Error('not a list');
    } catch (err) {
      // Kept, and not saved over (see PinsUnreadableError); the pins last read stay.
      this.unreadable = raw.length === 0 ? 'it is empty' : (err as Error).message;
      const hash = createHash('sha256').update(raw).digest('hex');
      if (this.loggedUnreadable !== hash)
        this.log?.error(
          { file: paths.pins(), reason: this.unreadable, pinsInForce: this.list() },
          'the pins file cannot be read: it is kept as it is, and pin and unpin are refused until it is fixed or removed; meanwhile only the pins in force protect images',
        );
      this.loggedUnreadable = hash;
      return;
    }
    this.stored = value.flatMap((v) => validRef(v));
    this.unreadable = undefined;
    this.loggedUnreadable = undefined;
  }

  list(): string[] {
    return this.all().map((p) => p.reference);
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
    const pins = [...this.stored];
    for (const ref of refs) if (!pins.some((p) => same(p, ref))) pins.push(ref);
    await this.save(pins);
  }

  /** Resolves to the references that no `pin` had pinned. */
  async remove(refs: ImageRef[]): Promise<string[]> {
    await this.load();
    let pins = this.stored;
    const missing: string[] = [];
    for (const ref of refs) {
      const before = pins.length;
      pins = pins.filter((p) => !same(p, ref));
      if (pins.length === before) missing.push(ref.reference);
    }
    await this.save(pins);
    return missing;
  }

  /** Every pin in force: the configured ones, then those `pin` made. */
  all(): ImageRef[] {
    return [...this.configured, ...this.stored];
  }

  /** Stores `pins` and then holds them; nothing changes when they cannot be stored. */
  private async save(pins: ImageRef[]): Promise<void> {
    if (this.unreadable !== undefined) throw new PinsUnreadableError(this.unreadable);
    await this.driver.putContent(paths.pins(), `${JSON.stringify(pins, null, 2)}\n`);
    this.stored = pins;
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
