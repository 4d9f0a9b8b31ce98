/**
 * ProxyTagService: resolves a tag to a digest. Inside the upstream's `tagTTL` a known tag is
 * answered without asking upstream; after it, a HEAD revalidates (Docker Hub does not count
 * HEADs against its pull limit) and a GET happens only when the digest changed, the tag is new,
 * or the HEAD answer named no digest (older spec versions allow it). Concurrent lookups of one
 * tag share one upstream request. When the upstream fails, the last known digest is served
 * (stale-if-error) and counted.
 */
import type { UpstreamConfig } from '../config/schema.js';
import type { Logger } from '../log/logger.js';
import type { Digest } from '../oci/digest.js';
import type { Tag } from '../oci/reference.js';
import type { Metrics } from '../metrics.js';
import type { RepositoryKey } from '../storage/types.js';
import type { TagResult, TagService } from '../storage/services.js';
import {
  UpstreamDeniedError,
  UpstreamInvalidError,
  UpstreamNotFoundError,
  UpstreamRateLimitedError,
  UpstreamUnavailableError,
} from '../upstream/errors.js';
import type { UpstreamClient } from '../upstream/types.js';
import type { ProxyManifestStore } from './proxy-manifest-store.js';
import { SingleFlight } from './single-flight.js';

export class ProxyTagService implements TagService {
  private readonly flights = new SingleFlight<TagResult>();
  private readonly log: Logger;
  /** The upstream answered a manifest HEAD without Docker-Content-Digest (logged once). */
  private toldHeadWithoutDigest = false;

  constructor(
    private readonly local: TagService,
    private readonly manifests: ProxyManifestStore,
    private readonly client: UpstreamClient,
    private readonly config: UpstreamConfig,
    log: Logger,
    private readonly metrics: Metrics,
    private readonly now: () => number = Date.now,
  ) {
    this.log = log.child({ module: 'proxy-tag', upstream: client.name });
  }

  async resolve(repo: RepositoryKey, tag: Tag): Promise<TagResult> {
    const known = await this.local.resolve(repo, tag);
    if (known.found && this.now() - known.confirmedAt < this.config.tagTTL) {
      this.metrics.requests.inc({ upstream: repo.upstream, kind: 'tag', cache: 'hit' });
      return known;
    }
    if (known.found && this.client.isDown) {
      // Known to be down (or offline): no point waiting for a timeout.
      return this.stale(repo, tag, known, 'upstream down');
    }
    this.metrics.requests.inc({
      upstream: repo.upstream,
      kind: 'tag',
      cache: known.found ? 'revalidate' : 'miss',
    });
    return this.flights.run(`${repo.upstream}/${repo.repository}:${tag}`, async () => {
      // A flight for this tag may have ended between the read above and this one starting:
      // what it recorded is the answer, not a second upstream request.
      const again = await this.local.resolve(repo, tag);
      if (again.found && this.now() - again.confirmedAt < this.config.tagTTL) return again;
      return this.ask(repo, tag, again.found ? again : known);
    });
  }

  tag(repo: RepositoryKey, tag: Tag, digest: Digest): Promise<void> {
    return this.local.tag(repo, tag, digest);
  }

  /**
   * The upstream's tags when it answers, else the ones cached here. With none cached, the
   * upstream's failure is the answer (UNAVAILABLE while it is down), as for a manifest: an empty
   * list would say the repository has no tags.
   */
  async list(repo: RepositoryKey): Promise<string[]> {
    if (this.client.isDown) {
      const local = await this.local.list(repo);
      // None cached: the client fails fast with the upstream's state, no request made.
      if (local.length > 0) return local;
    }
    try {
      return (await this.client.listTags(repo.repository)).sort();
    } catch (err) {
      if (!(err instanceof UpstreamNotFoundError) && !isUpstreamFailure(err)) throw err;
      const local = await this.local.list(repo);
      if (local.length === 0) throw err;
      if (isUpstreamFailure(err))
        this.log.warn(
          { repository: repo.repository, err: (err as Error).message },
          'tag list from upstream failed, serving cached tags',
        );
      return local;
    }
  }

  private async ask(repo: RepositoryKey, tag: Tag, known: TagResult): Promise<TagResult> {
    try {
      if (known.found) {
        const head = await this.client.headManifest(repo.repository, tag);
        if (head.digest !== undefined) return await this.revalidated(repo, tag, known, head.digest);
        // A HEAD answer without Docker-Content-Digest says nothing of the tag: not a failure
        // (stale would be served for ever), the GET below tells where it points.
        this.headWithoutDigest(repo, tag);
      }
      return await this.fetchTag(repo, tag, known);
    } catch (err) {
      if (err instanceof UpstreamNotFoundError) {
        if (known.found && this.config.staleOnNotFound)
          return this.stale(repo, tag, known, 'not found upstream');
        return { found: false };
      }
      if (known.found && isUpstreamFailure(err)) {
        return this.stale(repo, tag, known, (err as Error).message);
      }
      throw err;
    }
  }

  /** A known tag whose HEAD named `digest`: the manifest is fetched by digest only if it moved. */
  private async revalidated(
    repo: RepositoryKey,
    tag: Tag,
    known: Extract<TagResult, { found: true }>,
    digest: Digest,
  ): Promise<TagResult> {
    let fromUpstream = false;
    if (digest !== known.digest) {
      // The tag moved: fetch the new manifest by digest (stored if new), then record the tag.
      const fetched = await this.manifests.get(repo, digest, { counted: false });
      if (!fetched.found) throw new UpstreamNotFoundError(this.client.name, `manifest ${digest}`);
      fromUpstream = fetched.fromUpstream === true;
      this.moved(repo, tag, known.digest, digest);
    }
    await this.record(repo, tag, digest);
    return { found: true, digest, confirmedAt: this.now(), fromUpstream };
  }

  /**
   * GETs the tag's manifest, keeps it and records the tag: a tag not known here, or a known one
   * whose HEAD answer named no digest. A known tag that has not moved is a revalidation, as a
   * HEAD's would be: its manifest is the one held (a GET of it by digest brings it back if it
   * went), and what is served of it is no miss.
   */
  private async fetchTag(repo: RepositoryKey, tag: Tag, known: TagResult): Promise<TagResult> {
    const started = Date.now();
    const fetched = await this.client.getManifest(repo.repository, tag);
    const unmoved = known.found && fetched.digest === known.digest;
    if (!unmoved) await this.manifests.keep(repo, fetched, started);
    if (known.found && !unmoved) this.moved(repo, tag, known.digest, fetched.digest);
    await this.record(repo, tag, fetched.digest);
    return { found: true, digest: fetched.digest, confirmedAt: this.now(), fromUpstream: !unmoved };
  }

  private moved(repo: RepositoryKey, tag: Tag, from: Digest, to: Digest): void {
    this.log.info({ repository: repo.repository, tag, from, to }, 'tag moved upstream');
  }

  /**
   * Said once per upstream (and process), at debug: it is the way of the upstream (or of a proxy
   * in front of it), not of a tag, and saying it on every revalidation of every tag would tell
   * nothing new. Nothing fails: each GET that takes a HEAD's place (and may count against a pull
   * limit) is told by "manifest fetched".
   */
  private headWithoutDigest(repo: RepositoryKey, tag: Tag): void {
    if (this.toldHeadWithoutDigest) return;
    this.toldHeadWithoutDigest = true;
    this.log.debug(
      { repository: repo.repository, tag },
      'manifest HEAD answered without Docker-Content-Digest: tags are revalidated with a GET',
    );
  }

  /** Records the tag; a full disk only means it is asked of the upstream again next time. */
  private async record(repo: RepositoryKey, tag: Tag, digest: Digest): Promise<void> {
    try {
      await this.local.tag(repo, tag, digest);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOSPC') throw err;
      this.log.warn({ repository: repo.repository, tag }, 'storage is full: tag served, not kept');
    }
  }

  private stale(
    repo: RepositoryKey,
    tag: Tag,
    known: Extract<TagResult, { found: true }>,
    reason: string,
  ): TagResult {
    this.metrics.staleServed.inc({
      upstream: repo.upstream,
      kind: 'tag',
      reason: this.client.isDown ? 'down' : 'error',
    });
    this.log.warn(
      {
        repository: repo.repository,
        tag,
        digest: known.digest,
        ageMs: this.now() - known.confirmedAt,
        reason,
      },
      'serving stale tag',
    );
    return { ...known, stale: true };
  }
}

/** Failures that stale-if-error covers: the upstream could not give an answer. */
export function isUpstreamFailure(err: unknown): boolean {
  return (
    err instanceof UpstreamUnavailableError ||
    err instanceof UpstreamRateLimitedError ||
    err instanceof UpstreamInvalidError ||
    err instanceof UpstreamDeniedError
  );
}
