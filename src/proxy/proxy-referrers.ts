/**
 * ProxyReferrersService: the referrers API (distribution-spec 1.1, "Listing Referrers") through
 * the cache. A referrers answer changes as signatures and SBOMs are pushed, so it is kept like a
 * tag: fresh for the upstream's `tagTTL`, asked again after it, and served stale when the
 * upstream cannot answer. An upstream without the referrers API answers 404; that is served as
 * an empty index, as the spec lets a registry answer, so that clients need no fallback.
 *
 * Only answers that list referrers are written to storage (and an empty one that replaces such
 * an answer kept before): anyone may ask for any repository name, subject digest and set of
 * artifact types, and an empty answer to each would be a file that stays, since garbage
 * collection removes the answers of a subject only with the subject's manifest. Empty answers
 * are remembered in memory instead, a bounded number of them, fresh and stale alike.
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
  now?: () => number;
}

/** Empty answers remembered in memory (they are never stored), a few hundred bytes each. */
const EMPTY_ANSWERS_KEPT = 4096;

export class ProxyReferrersService implements ReferrersService {
  private readonly flights = new SingleFlight<ReferrersAnswer>();
  /** Empty answers, by `key`: kept here rather than in storage. */
  private readonly empty = new LRUCache<string, ReferrersRecord>({ max: EMPTY_ANSWERS_KEPT });
  private readonly local: ReferrersStore;
  private readonly client: UpstreamClient;
  private readonly config: UpstreamConfig;
  private readonly log: Logger;
  private readonly metrics: Metrics;
  private readonly now: () => number;

  constructor(options: ProxyReferrersOptions) {
    this.local = options.local;
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
    const known = stored ?? this.empty.get(key);
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

  /** `kept`: `known` is in storage; `key`: the answer's in `empty`. */
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
    if (listed.length > 0 || kept) {
      await this.local.set(repo, subject, types, record);
      this.empty.delete(key);
    } else {
      this.empty.set(key, record);
    }
    return answer(record);
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
