/**
 * ProxyReferrersService: the referrers API (distribution-spec 1.1, "Listing Referrers") through
 * the cache. A referrers answer changes as signatures and SBOMs are pushed, so it is kept like a
 * tag: fresh for the upstream's `tagTTL`, asked again after it, and served stale when the
 * upstream cannot answer. An upstream without the referrers API answers 404; its clients keep
 * the referrers in an index under the referrers tag schema's tag (`sha256-<hex>`), which a client
 * reads only when the API answers 404. Here the API always answers (an empty index when there
 * are no referrers), so pullcache reads that tag of the upstream itself and serves what it
 * lists, as the spec's "Listing Referrers" has a registry with the API do (`fromTag`). No such
 * tag upstream: no referrers.
 *
 * Anyone may ask for any repository name, subject digest and set of artifact types, and garbage
 * collection removes the answers of a subject only with the subject's manifest: an answer kept
 * for anything else would be a file that stays, outside the byte budget. So an answer is written
 * to storage only when it lists referrers, the repository holds the subject's manifest, and it is
 * unfiltered or filtered by one artifact type (that a listed referrer has, then): a file per
 * set of several types would let a client make 2^k files of a subject with k types of
 * referrers. An answer that replaces one kept before is written too. Every other answer is
 * remembered in memory, a bounded number of them, fresh and stale alike.
 */
import { LRUCache } from 'lru-cache';
import type { UpstreamConfig } from '../config/schema.js';
import type { Logger } from '../log/logger.js';
import type { Digest } from '../oci/digest.js';
import { isIndexMediaType, isManifestMediaType, isMediaType } from '../oci/media-types.js';
import { ManifestInvalidError } from '../oci/errors.js';
import {
  ARTIFACT_TYPE_FILTER,
  referrersFromIndex,
  referrersIndex,
  referrersTag,
  withArtifactType,
  type ReferrerDescriptor,
} from '../oci/referrers.js';
import type { Metrics } from '../metrics.js';
import type { ReferrersRecord, ReferrersStore, RepositoryKey } from '../storage/types.js';
import type { ReferrersAnswer, ReferrersService } from '../storage/services.js';
import { UpstreamInvalidError, UpstreamNotFoundError } from '../upstream/errors.js';
import type { FetchedManifest, UpstreamClient } from '../upstream/types.js';
import { isUpstreamFailure } from './proxy-tag-service.js';
import { SingleFlight } from './single-flight.js';

export interface ProxyReferrersOptions {
  local: ReferrersStore;
  client: UpstreamClient;
  config: UpstreamConfig;
  log: Logger;
  metrics: Metrics;
  /** Whether the repository holds the subject's manifest: only then is an answer stored. */
  holds: (repo: RepositoryKey, subject: Digest) => Promise<boolean>;
  now?: () => number;
}

/** Referrers as the upstream listed them, and when that was confirmed. */
interface Listing {
  manifests: ReferrerDescriptor[];
  confirmedAt: number;
}

/** Answers remembered in memory (they are not stored): at most so many, and so many bytes. */
const MEMORY_ANSWERS = 4096;
const MEMORY_ANSWER_BYTES = 16 * 1024 * 1024;

export class ProxyReferrersService implements ReferrersService {
  private readonly flights = new SingleFlight<ReferrersAnswer>();
  /** Answers not stored, by `key`: remembered here instead. */
  private readonly memory = new LRUCache<string, ReferrersRecord>({
    max: MEMORY_ANSWERS,
    maxSize: MEMORY_ANSWER_BYTES,
    sizeCalculation: (record, key) => record.index.length + key.length + 64,
  });
  private readonly local: ReferrersStore;
  private readonly holds: ProxyReferrersOptions['holds'];
  private readonly client: UpstreamClient;
  private readonly config: UpstreamConfig;
  private readonly log: Logger;
  private readonly metrics: Metrics;
  private readonly now: () => number;

  constructor(options: ProxyReferrersOptions) {
    this.local = options.local;
    this.holds = options.holds;
    this.client = options.client;
    this.config = options.config;
    this.log = options.log.child({ module: 'proxy-referrers', upstream: options.client.name });
    this.metrics = options.metrics;
    this.now = options.now ?? Date.now;
  }

  async list(
    repo: RepositoryKey,
    subject: Digest,
    artifactTypes: readonly string[],
  ): Promise<ReferrersAnswer> {
    const requested = [...new Set(artifactTypes)].sort();
    // A value that is no media type can be no referrer's artifactType: nothing to ask for it.
    const types = requested.filter(isMediaType);
    if (requested.length > 0 && types.length === 0)
      return { index: referrersIndex([]), filtersApplied: [ARTIFACT_TYPE_FILTER] };

    const key = `${repo.upstream}/${repo.repository}@${subject}?${types.join()}`;
    const stored = await this.local.get(repo, subject, types);
    const known = stored ?? this.memory.get(key);
    if (known && this.now() - known.confirmedAt < this.config.tagTTL) {
      this.metrics.requests.inc({ upstream: repo.upstream, kind: 'referrers', cache: 'hit' });
      return answer(known);
    }
    if (known && this.client.isDown) return this.stale(repo, subject, known, 'upstream down');
    this.metrics.requests.inc({
      upstream: repo.upstream,
      kind: 'referrers',
      cache: known ? 'revalidate' : 'miss',
    });
    return this.flights.run(key, () =>
      this.ask(repo, subject, types, known, stored !== undefined, key),
    );
  }

  /** `kept`: `known` is in storage; `key`: the answer's in `memory`. */
  private async ask(
    repo: RepositoryKey,
    subject: Digest,
    types: string[],
    known: ReferrersRecord | undefined,
    kept: boolean,
    key: string,
  ): Promise<ReferrersAnswer> {
    let listing: Listing;
    try {
      listing = await this.fromUpstream(repo, subject, types);
    } catch (err) {
      if (known && isUpstreamFailure(err))
        return this.stale(repo, subject, known, (err as Error).message);
      throw err;
    }
    const { manifests } = listing;
    // Filtered here whatever the upstream did: filtering twice changes nothing, and the answer
    // can then always say the filter was applied.
    const listed = types.length > 0 ? withArtifactType(manifests, types) : manifests;
    const record: ReferrersRecord = {
      index: referrersIndex(listed),
      filtersApplied: types.length > 0 ? [ARTIFACT_TYPE_FILTER] : [],
      confirmedAt: listing.confirmedAt,
    };
    if (kept || (await this.mayStore(repo, subject, types, listed))) {
      await this.local.set(repo, subject, types, record);
      this.memory.delete(key);
    } else {
      this.memory.set(key, record);
    }
    return answer(record);
  }

  /**
   * The referrers of `subject` from the upstream's referrers API, else (404: it has none) from
   * the referrers tag schema's tag. Throws the upstream's failure.
   */
  private async fromUpstream(
    repo: RepositoryKey,
    subject: Digest,
    types: readonly string[],
  ): Promise<Listing> {
    try {
      // One type is passed on; several are asked for unfiltered (an upstream may take only one).
      const fetched = await this.client.listReferrers(
        repo.repository,
        subject,
        types.length === 1 ? { artifactType: types[0]! } : {},
      );
      return { manifests: fetched.manifests, confirmedAt: this.now() };
    } catch (err) {
      if (!(err instanceof UpstreamNotFoundError)) throw err;
    }
    return this.fromTag(repo, subject);
  }

  /**
   * The referrers listed under the referrers tag schema's tag of `subject` upstream, in this
   * repository only (`repo`: the tag of another repository is none of its business). Asked of
   * the upstream itself, not through the tag service: the answer made of it is what is cached
   * (fresh for `tagTTL`, stale-if-error), and the tag is no image of the repository's (`ls`,
   * eviction, the pull counters would show one). A HEAD first (free against Docker Hub's pull
   * limit): most subjects have no such tag, and then nothing more is asked; a GET only for a tag
   * that is there. No such tag, or one that names no image index: no referrers.
   */
  private async fromTag(repo: RepositoryKey, subject: Digest): Promise<Listing> {
    const tag = referrersTag(subject);
    const none = (why: string): Listing => {
      this.log.debug({ repository: repo.repository, subject, tag }, why);
      return { manifests: [], confirmedAt: this.now() };
    };
    let fetched: FetchedManifest;
    try {
      const head = await this.client.headManifest(repo.repository, tag);
      fetched = await this.client.getManifest(repo.repository, head.digest ?? tag);
    } catch (err) {
      if (err instanceof UpstreamNotFoundError)
        return none('no referrers API upstream and no referrers tag');
      throw err;
    }
    // Its Content-Type when it names a manifest type; any other is told by the bytes below.
    if (isManifestMediaType(fetched.mediaType) && !isIndexMediaType(fetched.mediaType))
      return none('referrers tag names no image index');
    try {
      return { manifests: referrersFromIndex(fetched.bytes), confirmedAt: this.now() };
    } catch (err) {
      if (err instanceof ManifestInvalidError)
        throw new UpstreamInvalidError(this.client.name, err.message);
      throw err;
    }
  }

  /** Whether a new answer goes to storage (see the top of this file). */
  private async mayStore(
    repo: RepositoryKey,
    subject: Digest,
    types: readonly string[],
    listed: readonly ReferrerDescriptor[],
  ): Promise<boolean> {
    // One type at most: as filtered by it, a listed referrer has it.
    if (listed.length === 0 || types.length > 1) return false;
    return this.holds(repo, subject);
  }

  private stale(
    repo: RepositoryKey,
    subject: Digest,
    known: ReferrersRecord,
    reason: string,
  ): ReferrersAnswer {
    this.metrics.staleServed.inc({
      upstream: repo.upstream,
      kind: 'referrers',
      reason: this.client.isDown ? 'down' : 'error',
    });
    this.log.warn(
      {
        repository: repo.repository,
        subject,
        ageMs: this.now() - known.confirmedAt,
        reason,
      },
      'serving stale referrers',
    );
    return { ...answer(known), stale: true };
  }
}

function answer(record: ReferrersRecord): ReferrersAnswer {
  return { index: record.index, filtersApplied: record.filtersApplied };
}
