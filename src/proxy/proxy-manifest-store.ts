/**
 * ProxyManifestStore: manifests by digest from storage first, else one GET by digest from the
 * upstream, verified by the client, parsed (so that only manifests are kept) and stored with its
 * manifest media type, to be served byte for byte.
 */
import type { Logger } from '../log/logger.js';
import type { Digest } from '../oci/digest.js';
import { parseManifest } from '../oci/manifest.js';
import { ManifestInvalidError } from '../oci/errors.js';
import type { Metrics } from '../metrics.js';
import type { ManifestLink, RepositoryKey } from '../storage/types.js';
import type { ManifestResult, ManifestService, ManifestStat } from '../storage/services.js';
import { UpstreamInvalidError, UpstreamNotFoundError } from '../upstream/errors.js';
import type { FetchedManifest, UpstreamClient } from '../upstream/types.js';
import { SingleFlight } from './single-flight.js';
import type { StorageBudget } from '../lifecycle/types.js';

export class ProxyManifestStore implements ManifestService {
  private readonly flights = new SingleFlight<ManifestResult>();
  private readonly log: Logger;

  constructor(
    private readonly local: ManifestService,
    private readonly client: UpstreamClient,
    log: Logger,
    private readonly metrics: Metrics,
    /** Told when storage is full; the manifest is then served without being kept. */
    private readonly budget?: StorageBudget,
  ) {
    this.log = log.child({ module: 'proxy-manifest', upstream: client.name });
  }

  async stat(repo: RepositoryKey, digest: Digest): Promise<ManifestStat> {
    const local = await this.local.stat(repo, digest);
    if (local.found) return local;
    const fetched = await this.get(repo, digest);
    return fetched.found ? { found: true, link: fetched.link, fromUpstream: true } : fetched;
  }

  async get(
    repo: RepositoryKey,
    digest: Digest,
    { counted = true }: { counted?: boolean } = {},
  ): Promise<ManifestResult> {
    const local = await this.local.get(repo, digest);
    const count = (cache: 'hit' | 'miss') => {
      if (counted) this.metrics.requests.inc({ upstream: repo.upstream, kind: 'manifest', cache });
    };
    if (local.found) {
      count('hit');
      return local;
    }
    count('miss');
    return this.flights.run(`${repo.upstream}/${repo.repository}@${digest}`, async () => {
      // A flight for this digest may have ended between the read above and this one starting.
      const again = await this.local.get(repo, digest);
      if (again.found) return again;
      let fetched: FetchedManifest;
      const started = Date.now();
      try {
        fetched = await this.client.getManifest(repo.repository, digest);
      } catch (err) {
        if (err instanceof UpstreamNotFoundError) return { found: false };
        throw err;
      }
      const link = await this.keep(repo, fetched, started);
      return { found: true, link, bytes: fetched.bytes, fromUpstream: true };
    });
  }

  put(
    repo: RepositoryKey,
    bytes: Buffer,
    digest: Digest,
    mediaType: string,
  ): Promise<ManifestLink> {
    return this.local.put(repo, bytes, digest, mediaType);
  }

  /** Stores a manifest fetched from the upstream (by digest or by tag) since `started` (ms). */
  async keep(
    repo: RepositoryKey,
    fetched: FetchedManifest,
    started: number,
  ): Promise<ManifestLink> {
    // The Content-Type the upstream sent when it names a manifest type, else the type the bytes
    // name or show (parseManifest): never any other type an upstream sends, which would be served
    // as is on pullcache's origin (`text/html`...).
    let stored: string;
    try {
      stored = parseManifest(fetched.bytes, fetched.mediaType).mediaType;
    } catch (err) {
      if (err instanceof ManifestInvalidError)
        throw new UpstreamInvalidError(this.client.name, err.message);
      throw err;
    }
    let link: ManifestLink;
    try {
      link = await this.local.put(repo, fetched.bytes, fetched.digest, stored);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOSPC') throw err;
      // Verified bytes are worth serving even when they cannot be kept: the pull goes on.
      this.budget?.diskFull(fetched.bytes.length);
      this.log.warn(
        { repository: repo.repository, digest: fetched.digest },
        'storage is full: manifest served, not kept',
      );
      return { digest: fetched.digest, mediaType: stored, size: fetched.bytes.length };
    }
    this.log.info(
      {
        repository: repo.repository,
        digest: fetched.digest,
        mediaType: stored,
        bytes: fetched.size,
        durationMs: Date.now() - started,
      },
      'manifest fetched',
    );
    return link;
  }
}
