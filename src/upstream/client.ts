/**
 * The registry client of one upstream: the registry operations (manifests, blobs, tags,
 * referrers) on top of its transport (transport.ts: send, redirects, error mapping, the
 * circuit breaker) and auth (auth.ts: challenges, the token cache), as in distribution's
 * registry/client. Manifests are capped and verified against their digest; the blob GET, resumed
 * with Range after a break and checked against its digest at the end, is blob-get.ts.
 */
import type { UpstreamConfig } from '../config/schema.js';
import type { Logger } from '../log/logger.js';
import { digestOf, parseDigest, type Digest } from '../oci/digest.js';
import { ManifestInvalidError } from '../oci/errors.js';
import { MANIFEST_ACCEPT, MediaType, baseMediaType } from '../oci/media-types.js';
import { parseReferrersIndex, type ReferrerDescriptor } from '../oci/referrers.js';
import type { Repository } from '../oci/reference.js';
import { contentLength, header } from './answers.js';
import { BlobGetter } from './blob-get.js';
import { errMessage, UpstreamInvalidError } from './errors.js';
import type { HealthOptions } from './health.js';
import { PageLinks } from './pages.js';
import { UpstreamTransport } from './transport.js';
import type {
  BlobHead,
  BlobRequestOptions,
  BlobStream,
  FetchedManifest,
  FetchedReferrers,
  ManifestHead,
  RequestOptions,
  UpstreamClient,
  UpstreamObserver,
} from './types.js';

/** How long the start-up `warm` waits for the upstream, ms. */
const WARM_TIMEOUT = 10_000;
/** Most pages of a tag list, and all of them together in manifests' size (maxManifestSize). */
const MAX_TAG_PAGES = 10_000;
const TAG_PAGES_ROOM = 16;
/** Most pages of a referrers answer (all of them together are one manifest's size). */
const MAX_REFERRER_PAGES = 1000;

export interface ClientOptions {
  name: string;
  config: UpstreamConfig;
  log: Logger;
  /** Resolved password (from `password` or the env var `passwordEnv` names). */
  password?: string | undefined;
  health?: HealthOptions;
  /** Base delay of Range-resume retries, ms. */
  retryDelay?: number;
  /** Most milliseconds a token request may take (tests shorten it); see UpstreamAuth. */
  tokenTimeout?: number;
  /** Told of every request, byte and failure (metrics, the status page). */
  observer?: UpstreamObserver;
}

/** Observes nothing. */
const UNOBSERVED: UpstreamObserver = {
  request: () => {},
  received: () => {},
  failed: () => {},
  greeted: () => {},
};

export class RegistryClient implements UpstreamClient {
  readonly name: string;
  private readonly config: UpstreamConfig;
  private readonly transport: UpstreamTransport;
  private readonly log: Logger;
  private readonly observer: UpstreamObserver;
  /** Blob GETs, resumed with Range after a break (blob-get.ts). */
  private readonly blobs: BlobGetter;
  /** Aborted by `close`: stops a `warm` still waiting. */
  private readonly closing = new AbortController();

  constructor(options: ClientOptions) {
    this.name = options.name;
    this.config = options.config;
    this.log = options.log.child({ module: 'upstream', upstream: options.name });
    this.observer = options.observer ?? UNOBSERVED;
    this.transport = new UpstreamTransport({
      name: options.name,
      config: options.config,
      log: this.log,
      password: options.password,
      health: options.health,
      observer: this.observer,
      ...(options.tokenTimeout !== undefined ? { tokenTimeout: options.tokenTimeout } : {}),
    });
    this.blobs = new BlobGetter({
      name: options.name,
      config: options.config,
      transport: this.transport,
      log: this.log,
      retryDelay: options.retryDelay ?? 250,
      observer: this.observer,
    });
  }

  get healthState() {
    return this.transport.healthState;
  }

  get isDown(): boolean {
    return this.transport.isDown;
  }

  get rateLimit() {
    return this.transport.rateLimit;
  }

  get authScheme(): string | undefined {
    return this.transport.authScheme;
  }

  async close(): Promise<void> {
    this.closing.abort();
    await this.transport.close();
  }

  /**
   * Opens a connection to the upstream and learns how it authenticates (`GET /v2/`, as
   * distribution's proxy does when it starts), so that the first pull pays for neither, and says
   * in the log whether the upstream answers. Never throws, never counts toward health: an upstream
   * that is down at start-up is simply asked again on the first pull.
   */
  async warm(): Promise<void> {
    if (this.config.offline) return;
    const started = Date.now();
    try {
      const signal = AbortSignal.any([this.closing.signal, AbortSignal.timeout(WARM_TIMEOUT)]);
      const { status, challenge } = await this.transport.ping(signal);
      this.observer.greeted({ ok: true, status, auth: challenge?.scheme ?? 'none' });
      if (status !== 200 && !challenge) {
        this.log.warn(
          { status, durationMs: Date.now() - started },
          'upstream answers GET /v2/ with neither 200 nor an auth challenge: is the URL a registry?',
        );
        return;
      }
      this.log.info(
        { status, auth: challenge?.scheme ?? 'none', durationMs: Date.now() - started },
        'upstream answers',
      );
    } catch (err) {
      this.observer.greeted({ ok: false, reason: errMessage(err) });
      this.log.warn(
        { err: errMessage(err), durationMs: Date.now() - started },
        'upstream does not answer at start-up; it is asked again on the first pull',
      );
    }
  }

  // ---- manifests ------------------------------------------------------------------------

  async getManifest(
    repository: Repository,
    reference: string,
    options: RequestOptions = {},
  ): Promise<FetchedManifest> {
    const what = `manifest ${repository}:${reference}`;
    const res = await this.transport.send(
      'GET',
      repository,
      `manifests/${reference}`,
      what,
      { accept: MANIFEST_ACCEPT },
      options,
    );
    const bytes = await this.transport.readSmallBody(
      res,
      'manifest',
      what,
      this.config.maxManifestSize,
    );
    const size = bytes.length;
    const digest = this.verifyManifestDigest(
      bytes,
      reference,
      header(res.headers, 'docker-content-digest'),
      what,
    );
    const mediaType =
      baseMediaType(header(res.headers, 'content-type')) || 'application/octet-stream';
    return { digest, mediaType, size, bytes };
  }

  async headManifest(
    repository: Repository,
    reference: string,
    options: RequestOptions = {},
  ): Promise<ManifestHead> {
    const what = `manifest ${repository}:${reference}`;
    const res = await this.transport.send(
      'HEAD',
      repository,
      `manifests/${reference}`,
      what,
      { accept: MANIFEST_ACCEPT },
      options,
    );
    res.body.resume();
    // The header is a SHOULD in the spec (older versions) and proxies strip it: without it a HEAD
    // by tag gives no digest, and the caller GETs the manifest to learn it, as containerd does.
    // https://github.com/opencontainers/distribution-spec/blob/v1.0.1/spec.md#checking-if-content-exists-in-the-registry
    return {
      digest: this.expectedDigest(reference, header(res.headers, 'docker-content-digest'), what),
      mediaType: baseMediaType(header(res.headers, 'content-type')),
      size: Number(header(res.headers, 'content-length') ?? 0),
    };
  }

  /**
   * The digest a manifest must have: the one asked for, else the Docker-Content-Digest the
   * upstream sent (undefined when it sent none); a malformed header is the upstream's error.
   */
  private expectedDigest(
    reference: string,
    headerDigest: string | undefined,
    what: string,
  ): Digest | undefined {
    if (reference.includes(':')) return parseDigest(reference).digest;
    if (!headerDigest) return undefined;
    try {
      return parseDigest(headerDigest).digest;
    } catch {
      throw new UpstreamInvalidError(this.name, `${what}: invalid Docker-Content-Digest`);
    }
  }

  private verifyManifestDigest(
    bytes: Buffer,
    reference: string,
    headerDigest: string | undefined,
    what: string,
  ): Digest {
    const expected = this.expectedDigest(reference, headerDigest, what);
    if (!expected) return digestOf(bytes);
    const actual = digestOf(bytes, parseDigest(expected).algorithm);
    if (actual !== expected)
      throw new UpstreamInvalidError(
        this.name,
        `${what}: content is ${actual}, expected ${expected}`,
      );
    return expected;
  }

  // ---- blobs ----------------------------------------------------------------------------

  async headBlob(
    repository: Repository,
    digest: Digest,
    options: RequestOptions = {},
  ): Promise<BlobHead> {
    const res = await this.transport.send(
      'HEAD',
      repository,
      `blobs/${digest}`,
      `blob ${digest}`,
      {},
      options,
    );
    res.body.resume();
    // The spec's HEAD answer carries the blob's length. Without it the size is unknown, not 0:
    // read as 0, a client of pullcache would be told the blob is empty.
    return { size: contentLength(res.headers) };
  }

  async getBlob(
    repository: Repository,
    digest: Digest,
    options: BlobRequestOptions = {},
  ): Promise<BlobStream> {
    return this.blobs.get(repository, digest, options);
  }

  // ---- tags -----------------------------------------------------------------------------

  async listTags(
    repository: Repository,
    options: RequestOptions & { pageSize?: number } = {},
  ): Promise<string[]> {
    const what = `tags of ${repository}`;
    const tags: string[] = [];
    // A page is held to the size of a manifest (the upstream decides how long its pages are),
    // all of them together to TAG_PAGES_ROOM manifests: a long list is a few MB.
    let room = TAG_PAGES_ROOM * this.config.maxManifestSize;
    const pages = new PageLinks(this.name, what, MAX_TAG_PAGES);
    let next: string | undefined = `tags/list?n=${options.pageSize ?? 1000}`;
    while (next) {
      const res = await this.transport.send(
        'GET',
        repository,
        next,
        what,
        { accept: 'application/json' },
        options,
      );
      const bytes = await this.transport.readSmallBody(
        res,
        'tags',
        what,
        Math.min(this.config.maxManifestSize, room),
      );
      room -= bytes.length;
      let body: { tags?: unknown } | null;
      try {
        body = JSON.parse(bytes.toString('utf8')) as { tags?: unknown } | null;
      } catch {
        throw new UpstreamInvalidError(this.name, `${what}: not JSON`);
      }
      if (Array.isArray(body?.tags))
        tags.push(...body.tags.filter((t): t is string => typeof t === 'string'));
      next = pages.after(next, header(res.headers, 'link'), repository);
    }
    return tags;
  }

  // ---- referrers ------------------------------------------------------------------------

  async listReferrers(
    repository: Repository,
    subject: Digest,
    options: RequestOptions & { artifactType?: string } = {},
  ): Promise<FetchedReferrers> {
    const what = `referrers of ${repository}@${subject}`;
    const manifests: ReferrerDescriptor[] = [];
    let filtersApplied: string[] | undefined;
    // All pages together are held to the size of one manifest: the answer is served as one.
    let room = this.config.maxManifestSize;
    let next: string | undefined =
      `referrers/${subject}` +
      (options.artifactType !== undefined
        ? `?artifactType=${encodeURIComponent(options.artifactType)}`
        : '');
    const pages = new PageLinks(this.name, what, MAX_REFERRER_PAGES);
    while (next) {
      const res = await this.transport.send(
        'GET',
        repository,
        next,
        what,
        { accept: MediaType.OciIndex },
        options,
      );
      const bytes = await this.transport.readSmallBody(res, 'referrers', what, room);
      room -= bytes.length;
      try {
        manifests.push(...parseReferrersIndex(bytes));
      } catch (err) {
        if (err instanceof ManifestInvalidError)
          throw new UpstreamInvalidError(this.name, `${what}: ${err.message}`);
        throw err;
      }
      // The first page says which filters the upstream applied; later pages follow its Link.
      filtersApplied ??= (header(res.headers, 'oci-filters-applied') ?? '')
        .split(',')
        .map((f) => f.trim())
        .filter(Boolean);
      next = pages.after(next, header(res.headers, 'link'), repository);
    }
    return { manifests, filtersApplied: filtersApplied ?? [] };
  }
}
