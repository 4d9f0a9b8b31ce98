/**
 * The gap of a single flight: a lookup that read storage before a flight ended and asks for the
 * flight after it ended. A storage this slow (S3 under load) cannot be timed reliably with a
 * real one, so the storage here is made slow on purpose; the tag service is the real one.
 */
import { expect, test } from 'vitest';
import { parseConfig } from '../../src/config/load.js';
import { silentLogger } from '../../src/log/logger.js';
import { Metrics } from '../../src/metrics.js';
import type { Digest } from '../../src/oci/digest.js';
import type { Tag } from '../../src/oci/reference.js';
import { ProxyManifestStore } from '../../src/proxy/proxy-manifest-store.js';
import { ProxyTagService } from '../../src/proxy/proxy-tag-service.js';
import type {
  ManifestResult,
  ManifestService,
  TagResult,
  TagService,
} from '../../src/storage/services.js';
import type { ManifestLink, RepositoryKey } from '../../src/storage/types.js';
import type { FetchedManifest, UpstreamClient } from '../../src/upstream/types.js';

const DIGEST = `sha256:${'a'.repeat(64)}` as Digest;

/** Tags in memory; a read answers what was there when it began, once `hold` lets it go. */
class SlowTags implements TagService {
  readonly tags = new Map<string, number>();
  hold: Promise<void> = Promise.resolve();
  async resolve(_repo: RepositoryKey, tag: Tag): Promise<TagResult> {
    const confirmedAt = this.tags.get(tag);
    await this.hold;
    return confirmedAt === undefined
      ? { found: false }
      : { found: true, digest: DIGEST, confirmedAt };
  }
  async tag(_repo: RepositoryKey, tag: Tag): Promise<void> {
    this.tags.set(tag, Date.now());
  }
  async list(): Promise<string[]> {
    return [...this.tags.keys()];
  }
}

/** An upstream whose manifest GETs are counted and answered when the test says. */
function gatedUpstream(bytes: Buffer) {
  const gate = { gets: 0, answer: () => {} };
  const client = {
    name: 'docker.io',
    isDown: false,
    getManifest: async (): Promise<FetchedManifest> => {
      gate.gets++;
      await new Promise<void>((r) => (gate.answer = r));
      return {
        digest: DIGEST,
        mediaType: 'application/vnd.oci.image.manifest.v1+json',
        bytes,
        size: bytes.length,
      } as FetchedManifest;
    },
  } as unknown as UpstreamClient;
  return { client, gate };
}

/**
 * The gap, made to happen: `lookup` once (a flight starts and waits for the gate), then once more
 * while `storage` holds its reads, so that the second lookup reads storage before the flight ends
 * and gets that answer only after it ended. Resolves to both answers.
 */
async function lookupInTheGap<T>(
  lookup: () => Promise<T>,
  storage: { hold: Promise<void> },
  gate: { gets: number; answer: () => void },
): Promise<[T, T]> {
  const first = lookup();
  await new Promise((r) => setTimeout(r, 10));
  expect(gate.gets).toBe(1);
  let release!: () => void;
  storage.hold = new Promise<void>((r) => (release = r));
  const second = lookup();
  storage.hold = Promise.resolve();
  gate.answer();
  const firstAnswer = await first;
  release();
  return [firstAnswer, await second];
}

test('a lookup that read storage before the flight ended does not fetch the tag again', async () => {
  const local = new SlowTags();
  const { client, gate } = gatedUpstream(Buffer.from('{}'));
  const manifests = { keep: async () => ({}) } as unknown as ProxyManifestStore;
  const config = parseConfig({ upstreams: { 'docker.io': { url: 'https://registry.test' } } });
  const tags = new ProxyTagService(
    local,
    manifests,
    client,
    config.upstreams['docker.io']!,
    silentLogger(),
    new Metrics(),
  );
  const repo = { upstream: 'docker.io', repository: 'library/app' } as RepositoryKey;
  const tag = 'v1' as Tag;

  // The second lookup reads storage while there is no tag yet, and gets that answer only later.
  const [first, second] = await lookupInTheGap(() => tags.resolve(repo, tag), local, gate);
  expect(first).toMatchObject({ found: true, digest: DIGEST });
  expect(second).toMatchObject({ found: true, digest: DIGEST });
  expect(gate.gets).toBe(1);
});

/** Manifests in memory, read as slowly as SlowTags. */
class SlowManifests implements ManifestService {
  readonly kept = new Map<string, Buffer>();
  hold: Promise<void> = Promise.resolve();
  async get(_repo: RepositoryKey, digest: Digest): Promise<ManifestResult> {
    const bytes = this.kept.get(digest);
    await this.hold;
    return bytes ? { found: true, link: this.link(digest, bytes), bytes } : { found: false };
  }
  async stat(repo: RepositoryKey, digest: Digest) {
    return this.get(repo, digest);
  }
  async put(_repo: RepositoryKey, bytes: Buffer, digest: Digest): Promise<ManifestLink> {
    this.kept.set(digest, bytes);
    return this.link(digest, bytes);
  }
  private link(digest: Digest, bytes: Buffer): ManifestLink {
    return { digest, mediaType: 'application/vnd.oci.image.manifest.v1+json', size: bytes.length };
  }
}

test('a manifest read before its flight ended is not fetched again', async () => {
  const local = new SlowManifests();
  const bytes = Buffer.from(
    JSON.stringify({
      schemaVersion: 2,
      mediaType: 'application/vnd.oci.image.manifest.v1+json',
      config: { mediaType: 'application/vnd.oci.image.config.v1+json', digest: DIGEST, size: 2 },
      layers: [],
    }),
  );
  const { client, gate } = gatedUpstream(bytes);
  const manifests = new ProxyManifestStore(local, client, silentLogger(), new Metrics());
  const repo = { upstream: 'docker.io', repository: 'library/app' } as RepositoryKey;

  const [first, second] = await lookupInTheGap(() => manifests.get(repo, DIGEST), local, gate);
  expect(first).toMatchObject({ found: true });
  expect(second).toMatchObject({ found: true, bytes });
  expect(gate.gets).toBe(1);
});
