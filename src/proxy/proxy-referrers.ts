/**
 * ProxyReferrersService: the referrers API (distribution-spec 1.1, "Listing Referrers") through
 * the cache. A referrers answer changes as signatures and SBOMs are pushed, so it is kept like a
 * tag: fresh for the upstream's `tagTTL`, asked again after it, and served stale when the
 * upstream cannot answer. An upstream without the referrers API answers 404; that is served as
 * an empty index, as the spec lets a registry answer, so that clients need no fallback.
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
import { isMediaType } from '../oci/media-types.js';
import {
  ARTIFACT_TYPE_FILTER,
  referrersIndex,
  withArtifactType,
  type ReferrerDescriptor,
} from '../oci/referrers.js';
import type { Metrics } from '../metrics.js';
import type {
  ReferrersAnswer,
  ReferrersRecord,
  ReferrersService,
  ReferrersStore,
  RepositoryKey,
} from '../storage/types.js';
import { UpstreamNotFoundError } from '../upstream/errors.js';
import type { UpstreamClient } from '../upstream/types.js';
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
    let manifests: ReferrerDescriptor[];
    try {
      // One type is passed on; several are asked for unfiltered (an upstream may take only one).
      const fetched = await this.client.listReferrers(
        repo.repository,
        subject,
        types.length === 1 ? { artifactType: types[0]! } : {},
      );
      manifests = fetched.manifests;
    } catch (err) {
      if (err instanceof UpstreamNotFoundError) {
        this.log.debug(
          { repository: repo.repository, subject },
          'upstream has no referrers here, answering an empty index',
        );
        manifests = [];
      } else if (known && isUpstreamFailure(err)) {
        return this.stale(repo, subject, known, (err as Error).message);
      } else {
        throw err;
      }
    }
    // Filtered here whatever the upstream did: filtering twice changes nothing, and the answer
    // can then always say the filter was applied.
    const listed = types.length > 0 ? withArtifactType(manifests, types) : manifests;
    const record: ReferrersRecord = {
      index: referrersIndex(listed),
      filtersApplied: types.length > 0 ? [ARTIFACT_TYPE_FILTER] : [],
      confirmedAt: this.now(),
    };
    if (kept || (await this.mayStore(repo, subject, types, listed))) {
      await this.local.set(repo, subject, types, record);
      this.memory.delete(key);
    } else {
      this.memory.set(key, record);
    }
    return answer(record);
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
