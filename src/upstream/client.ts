/**
 * The registry client of one upstream: small requests on undici with a keep-alive pool, blob
 * bodies on sockets of its own read into reused buffers (raw-get.ts). Auth challenges and
 * tokens, redirects (credentials dropped across origins), resumable blob streams, typed
 * failures and a circuit breaker. It only ever dials the configured URL, the token realm the
 * upstream names, and the redirect targets the upstream sends.
 */
import { Readable } from 'node:stream';
import { Agent, errors as undiciErrors, request, type Dispatcher } from 'undici';
import type { UpstreamConfig } from '../config/schema.js';
import type { Logger } from '../log/logger.js';
import { DigestVerifier, digestOf, parseDigest, type Digest } from '../oci/digest.js';
import { ManifestInvalidError } from '../oci/errors.js';
import { MANIFEST_ACCEPT, MediaType, baseMediaType } from '../oci/media-types.js';
import { parseReferrersIndex, type ReferrerDescriptor } from '../oci/referrers.js';
import type { Repository } from '../oci/reference.js';
import {
  parseChallenge,
  realmMayReceiveCredentials,
  refreshTime,
  TokenCache,
  type Challenge,
  type Token,
} from './auth.js';
import {
  UpstreamDeniedError,
  UpstreamInvalidError,
  UpstreamNotFoundError,
  UpstreamRateLimitedError,
  UpstreamUnavailableError,
  type RateLimitInfo,
} from './errors.js';
import { RawAgent, type RawBody } from './raw-get.js';
import { UpstreamHealth, type HealthOptions } from './health.js';
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
  UpstreamRequestKind,
} from './types.js';

const MAX_REDIRECTS = 5;
/** How long the start-up `warm` waits for the upstream, ms. */
const WARM_TIMEOUT = 10_000;
const REDIRECT_STATUSES = new Set([301, 302, 303, 307, 308]);

export interface ClientOptions {
  name: string;
  config: UpstreamConfig;
  log: Logger;
  /** Resolved password (from `password` or the env var `passwordEnv` names). */
  password?: string | undefined;
  health?: HealthOptions;
  /** Base delay of Range-resume retries, ms. */
  retryDelay?: number;
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

type UndiciBody = Dispatcher.ResponseData['body'];

interface Response<B = UndiciBody> {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  body: B;
  url: URL;
}

/**
 * How one hop of a request goes out: on undici (everything but blob bodies), or on the blob
 * path's own sockets (raw-get.ts). Either answers with a body that can be skipped (`resume`).
 */
type Hop<B> = (
  url: URL,
  headers: Record<string, string>,
) => Promise<{
  statusCode: number;
  headers: Record<string, string | string[] | undefined>;
  body: B;
}>;

/** What `send` asks: a request to `/v2/<repository>/<suffix>`, `what` naming it in errors. */
type SendRequest = [
  method: 'GET' | 'HEAD',
  repository: Repository,
  suffix: string,
  what: string,
  headers: Record<string, string>,
  options: RequestOptions,
];

export class RegistryClient implements UpstreamClient {
  readonly name: string;
  private readonly base: URL;
  private readonly config: UpstreamConfig;
  private readonly agent: Agent;
  /** Blob GETs, on sockets read into reused buffers (raw-get.ts). */
  private readonly raw: RawAgent;
  private readonly log: Logger;
  private readonly health: UpstreamHealth;
  private readonly tokens = new TokenCache();
  private readonly password: string | undefined;
  private readonly retryDelay: number;
  /** Learned from the first 401, so later scopes fetch their token without a round trip. */
  private challenge: Challenge | undefined;
  private lastRateLimit: RateLimitInfo | undefined;
  /** True once the upstream answered without asking for credentials. */
  private anonymous = false;
  private readonly observer: UpstreamObserver;
  /** Aborted by `close`: stops a `warm` still waiting. */
  private readonly closing = new AbortController();

  constructor(options: ClientOptions) {
    this.name = options.name;
    this.config = options.config;
    this.base = new URL(options.config.url);
    this.log = options.log.child({ module: 'upstream', upstream: options.name });
    this.health = new UpstreamHealth(options.health);
    this.password = options.password;
    this.retryDelay = options.retryDelay ?? 250;
    this.observer = options.observer ?? UNOBSERVED;
    const { timeouts } = options.config;
    this.agent = new Agent({
      connect: { timeout: timeouts.connect },
      headersTimeout: timeouts.headers,
      bodyTimeout: timeouts.bodyIdle,
      keepAliveTimeout: 30_000,
      connections: 64,
    });
    this.raw = new RawAgent(timeouts);
  }

  get healthState() {
    return this.health.state;
  }

  get isDown(): boolean {
    return this.config.offline || this.health.down;
  }

  get rateLimit() {
    return this.lastRateLimit;
  }

  get authScheme(): string | undefined {
    return this.challenge?.scheme ?? (this.anonymous ? 'none' : undefined);
  }

  async close(): Promise<void> {
    this.closing.abort();
    this.raw.close();
    await this.agent.close();
  }

  /**
   * Opens a connection to the upstream and learns how it authenticates (`GET /v2/`, as
   * distribution's proxy does when it starts), so that the first pull pays for neither, and says
   * in the log whether the upstream answers. Never throws, never counts toward health: an upstream
   * that is down at start-up is simply asked again on the first pull.
   */
  async warm(): Promise<void> {
    if (this.config.offline) return;
    const url = this.v2Url('');
    const started = Date.now();
    try {
      const signal = AbortSignal.any([this.closing.signal, AbortSignal.timeout(WARM_TIMEOUT)]);
      const res = await this.dispatch(this.undiciHop('GET', { signal }), 'ping', url, {});
      res.body.resume();
      const challenge =
        res.status === 401 ? parseChallenge(res.headers['www-authenticate']) : undefined;
      if (challenge) this.challenge ??= challenge;
      if (res.status === 200) this.anonymous = true;
      this.observer.greeted({ ok: true, status: res.status, auth: challenge?.scheme ?? 'none' });
      if (res.status !== 200 && !challenge) {
        this.log.warn(
          { status: res.status, durationMs: Date.now() - started },
          'upstream answers GET /v2/ with neither 200 nor an auth challenge: is the URL a registry?',
        );
        return;
      }
      this.log.info(
        { status: res.status, auth: challenge?.scheme ?? 'none', durationMs: Date.now() - started },
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
    const res = await this.send(
      'GET',
      repository,
      `manifests/${reference}`,
      what,
      { accept: MANIFEST_ACCEPT },
      options,
    );
    const bytes = await this.readSmallBody(res, what, this.config.maxManifestSize);
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
    const res = await this.send(
      'HEAD',
      repository,
      `manifests/${reference}`,
      what,
      { accept: MANIFEST_ACCEPT },
      options,
    );
    res.body.resume();
    const digest = this.expectedDigest(
      reference,
      header(res.headers, 'docker-content-digest'),
      what,
    );
    if (!digest)
      throw new UpstreamInvalidError(
        this.name,
        `${what}: HEAD answered without Docker-Content-Digest`,
      );
    return {
      digest,
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
    const res = await this.send(
      'HEAD',
      repository,
      `blobs/${digest}`,
      `blob ${digest}`,
      {},
      options,
    );
    res.body.resume();
    return { size: Number(header(res.headers, 'content-length') ?? 0) };
  }

  async getBlob(
    repository: Repository,
    digest: Digest,
    options: BlobRequestOptions = {},
  ): Promise<BlobStream> {
    const what = `blob ${digest}`;
    const hop = this.rawHop(options);
    const first = await this.sendVia(hop, 'GET', repository, `blobs/${digest}`, what, {}, options);
    const length = header(first.headers, 'content-length');
    const size = length !== undefined ? Number(length) : undefined;
    const verifier = new DigestVerifier(parseDigest(digest));
    return {
      size,
      stream: Readable.from(
        this.blobChunks(hop, repository, digest, first.body, size, verifier, options),
        // Each chunk as it was yielded: a byte stream would join buffered chunks into a copy,
        // and the consumer could not hand the slabs' views back.
        { objectMode: true, highWaterMark: 1 },
      ),
    };
  }

  /**
   * Yields the blob's bytes (views of `options.slabs`, see receive-slabs.ts); on a break asks
   * again with Range from where it is, then checks the digest.
   */
  private async *blobChunks(
    hop: Hop<RawBody>,
    repository: Repository,
    digest: Digest,
    firstBody: RawBody,
    size: number | undefined,
    verifier: DigestVerifier,
    options: BlobRequestOptions,
  ): AsyncGenerator<Buffer> {
    const what = `blob ${digest}`;
    let queue = firstBody;
    let skip = 0;
    let attempt = 0;
    for (;;) {
      // A consumer that stops early (its stream destroyed, a failed write) returns this
      // generator, and the loop returns the body's: it lets go of the connection, which would
      // otherwise wait, paused, for ever.
      for await (const view of queue.drain()) {
        let chunk = view;
        if (skip > 0) {
          // The upstream ignored Range: drop what we already passed on.
          if (chunk.length <= skip) {
            skip -= chunk.length;
            options.slabs?.release(chunk);
            continue;
          }
          chunk = chunk.subarray(skip);
          skip = 0;
        }
        verifier.update(chunk);
        this.observer.received('blob', chunk.length);
        yield chunk;
      }
      let end = queue.ended!;
      if (end.kind === 'end') {
        if (size === undefined || verifier.bytes === size) break;
        end = {
          kind: 'error',
          error: Object.assign(new Error(`body ended at ${verifier.bytes} of ${size} bytes`), {
            code: 'UND_ERR_SOCKET',
          }),
        };
      }
      if (end.kind === 'error') {
        if (
          options.signal?.aborted ||
          !isConnectionError(end.error) ||
          attempt >= this.config.retries
        ) {
          if (!options.signal?.aborted)
            this.observer.failed(
              `${what} of ${repository}`,
              `body broke off at ${verifier.bytes} bytes: ${errMessage(end.error)}`,
            );
          throw this.bodyError(end.error, what);
        }
        attempt++;
        this.log.warn(
          { repository, digest, offset: verifier.bytes, attempt, err: errMessage(end.error) },
          'blob body broke off, resuming',
        );
        await sleep(this.retryDelay * 2 ** (attempt - 1), options.signal);
      }
      const offset = verifier.bytes;
      const res = await this.sendVia(
        hop,
        'GET',
        repository,
        `blobs/${digest}`,
        what,
        { range: `bytes=${offset}-` },
        options,
      );
      if (res.status === 206) {
        const start = /^bytes (\d+)-/.exec(header(res.headers, 'content-range') ?? '')?.[1];
        if (Number(start) !== offset) {
          res.body.destroy();
          throw new UpstreamInvalidError(
            this.name,
            `${what}: resumed at ${String(start)}, asked for ${offset}`,
          );
        }
      } else {
        skip = offset;
      }
      queue = res.body;
    }
    if (!verifier.matches()) {
      this.observer.failed(`${what} of ${repository}`, `content is ${verifier.actual()}`);
      throw new UpstreamInvalidError(this.name, `${what}: content is ${verifier.actual()}`);
    }
  }

  // ---- tags -----------------------------------------------------------------------------

  async listTags(
    repository: Repository,
    options: RequestOptions & { pageSize?: number } = {},
  ): Promise<string[]> {
    const tags: string[] = [];
    let next: string | undefined = `tags/list?n=${options.pageSize ?? 1000}`;
    for (let page = 0; next && page < 10_000; page++) {
      const res = await this.send(
        'GET',
        repository,
        next,
        `tags of ${repository}`,
        { accept: 'application/json' },
        options,
      );
      this.observer.received('tags', Number(header(res.headers, 'content-length') ?? 0) || 0);
      let body: { tags?: unknown };
      try {
        body = (await res.body.json()) as { tags?: unknown };
      } catch (err) {
        throw this.bodyError(err, `tags of ${repository}`);
      }
      if (Array.isArray(body.tags))
        tags.push(...body.tags.filter((t): t is string => typeof t === 'string'));
      next = nextPage(header(res.headers, 'link'), repository);
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
    for (let page = 0; next && page < 1000; page++) {
      const res = await this.send(
        'GET',
        repository,
        next,
        what,
        { accept: MediaType.OciIndex },
        options,
      );
      const bytes = await this.readSmallBody(res, what, room);
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
      next = nextPage(header(res.headers, 'link'), repository);
    }
    return { manifests, filtersApplied: filtersApplied ?? [] };
  }

  // ---- transport ------------------------------------------------------------------------

  /** A whole body of at most `limit` bytes (a manifest, a referrers page); larger is invalid. */
  private async readSmallBody(res: Response, what: string, limit: number): Promise<Buffer> {
    const declared = Number(header(res.headers, 'content-length'));
    if (declared > limit) {
      res.body.destroy();
      throw new UpstreamInvalidError(
        this.name,
        `${what} is ${declared} bytes, more than the ${limit} allowed`,
      );
    }
    const chunks: Buffer[] = [];
    let size = 0;
    try {
      for await (const chunk of res.body) {
        size += (chunk as Buffer).length;
        if (size > limit) {
          res.body.destroy();
          throw new UpstreamInvalidError(
            this.name,
            `${what} is more than the ${limit} bytes allowed`,
          );
        }
        chunks.push(chunk as Buffer);
      }
    } catch (err) {
      throw this.bodyError(err, what);
    }
    this.observer.received(what.startsWith('referrers') ? 'referrers' : 'manifest', size);
    return Buffer.concat(chunks, size);
  }

  /**
   * One request to `/v2/<repository>/<suffix>` with auth, redirects and error mapping. Resolves
   * only to a 2xx response (206 included); everything else is thrown as a typed error.
   */
  private send(...request: SendRequest): Promise<Response> {
    const [method, , , , , options] = request;
    return this.sendVia(this.undiciHop(method, options), ...request);
  }

  /** Hops on undici's keep-alive pool. */
  private undiciHop(method: 'GET' | 'HEAD', options: RequestOptions): Hop<UndiciBody> {
    return (url, headers) =>
      request(url, {
        method,
        headers,
        dispatcher: this.agent,
        signal: options.signal ?? null,
      });
  }

  /** Blob GET hops, read into `options.slabs`. */
  private rawHop(options: BlobRequestOptions): Hop<RawBody> {
    return (url, headers) =>
      this.raw.get(url, { headers, signal: options.signal, slabs: options.slabs });
  }

  /** `send`, each hop going out by `hop`. */
  private async sendVia<B extends { resume(): void }>(
    hop: Hop<B>,
    ...[method, repository, suffix, what, headers, options]: SendRequest
  ): Promise<Response<B>> {
    if (this.config.offline) throw new UpstreamUnavailableError(this.name, 'configured offline');
    if (!this.health.admit())
      throw new UpstreamUnavailableError(this.name, 'not reachable (failing fast)');
    const url = this.v2Url(`${repository}/${suffix}`);
    const scope = `repository:${repository}:pull`;
    const kind = requestKind(suffix);
    const started = Date.now();
    let res: Response<B>;
    try {
      let token = await this.authorization(scope, options);
      res = await this.dispatch(hop, kind, url, {
        ...headers,
        ...(token ? { authorization: token.header } : {}),
      });
      if (res.status === 401) {
        const challenge = parseChallenge(res.headers['www-authenticate']);
        res.body.resume();
        if (challenge) {
          this.challenge = challenge;
          // A 401 on a cached token: one retry with a fresh one. Without a token: the first one.
          if (token?.cached) this.tokens.invalidate(scope, token.token);
          token = await this.authorization(scope, options);
          if (token)
            res = await this.dispatch(hop, kind, url, { ...headers, authorization: token.header });
        }
      }
      this.health.success();
    } catch (err) {
      if (isConnectionError(err)) {
        this.health.failure();
        this.observer.failed(`${method} ${url.pathname}`, errMessage(err));
        this.log.warn(
          { method, path: url.pathname, err: errMessage(err), durationMs: Date.now() - started },
          'upstream unreachable',
        );
        throw new UpstreamUnavailableError(this.name, errMessage(err));
      }
      this.health.release();
      throw err;
    }
    this.recordRateLimit(res.headers);
    this.log.debug(
      { method, path: url.pathname, status: res.status, durationMs: Date.now() - started },
      'upstream request',
    );
    if (res.status >= 200 && res.status < 300) {
      if (!this.challenge) this.anonymous = true;
      return res;
    }
    res.body.resume();
    if (res.status !== 404) this.observer.failed(`${method} ${url.pathname}`, `HTTP ${res.status}`);
    switch (res.status) {
      case 401:
      case 403:
        throw new UpstreamDeniedError(this.name, what);
      case 404:
        throw new UpstreamNotFoundError(this.name, what);
      case 416:
        throw new UpstreamInvalidError(this.name, `${what}: range not satisfiable`);
      case 429:
        throw new UpstreamRateLimitedError(this.name, this.lastRateLimit ?? { at: Date.now() });
      default:
        if (res.status >= 500) throw new UpstreamUnavailableError(this.name, `HTTP ${res.status}`);
        throw new UpstreamInvalidError(this.name, `${what}: unexpected HTTP ${res.status}`);
    }
  }

  /** `/v2/<path>` under the configured URL (a path prefix in it is kept). */
  private v2Url(path: string): URL {
    return new URL(`${this.base.pathname.replace(/\/$/, '')}/v2/${path}`, this.base);
  }

  /** Follows redirects itself so that credentials never reach another origin. */
  private async dispatch<B extends { resume(): void }>(
    send: Hop<B>,
    kind: UpstreamRequestKind,
    url: URL,
    headers: Record<string, string>,
  ): Promise<Response<B>> {
    let current = url;
    let sendHeaders = headers;
    for (let hop = 0; ; hop++) {
      const res = await this.observed(kind, () => send(current, sendHeaders));
      const location = header(res.headers, 'location');
      if (!REDIRECT_STATUSES.has(res.statusCode) || !location) {
        return { status: res.statusCode, headers: res.headers, body: res.body, url: current };
      }
      res.body.resume();
      if (hop >= MAX_REDIRECTS)
        throw new UpstreamInvalidError(this.name, `more than ${MAX_REDIRECTS} redirects`);
      const next = new URL(location, current);
      if (next.protocol !== 'http:' && next.protocol !== 'https:') {
        throw new UpstreamInvalidError(this.name, `redirect to a ${next.protocol} URL`);
      }
      if (next.origin !== current.origin && sendHeaders.authorization) {
        // Object stores reject (and must never see) the registry's credentials.
        const { authorization: _dropped, ...rest } = sendHeaders;
        sendHeaders = rest;
      }
      current = next;
    }
  }

  /** One request, timed to its answer's headers and told to the observer. */
  private async observed<R extends { statusCode: number }>(
    kind: UpstreamRequestKind,
    send: () => Promise<R>,
  ): Promise<R> {
    const started = performance.now();
    try {
      const res = await send();
      this.observer.request(kind, res.statusCode, (performance.now() - started) / 1000);
      return res;
    } catch (err) {
      this.observer.request(kind, 'error', (performance.now() - started) / 1000);
      throw err;
    }
  }

  /** The Authorization header for a scope, from the token cache or a new token; none when anonymous access is all we know. */
  private async authorization(
    scope: string,
    options: RequestOptions,
  ): Promise<{ header: string; token: string; cached: boolean } | undefined> {
    const challenge = this.challenge;
    if (!challenge) return undefined;
    if (challenge.scheme === 'basic') {
      if (this.config.username === undefined) return undefined;
      const value = Buffer.from(`${this.config.username}:${this.password ?? ''}`).toString(
        'base64',
      );
      return { header: `Basic ${value}`, token: value, cached: false };
    }
    const cached = this.tokens.get(scope);
    if (cached) return { header: `Bearer ${cached.value}`, token: cached.value, cached: true };
    const token = await this.tokens.obtain(scope, () => this.fetchToken(challenge, scope, options));
    return { header: `Bearer ${token.value}`, token: token.value, cached: false };
  }

  private async fetchToken(
    challenge: Extract<Challenge, { scheme: 'bearer' }>,
    scope: string,
    options: RequestOptions,
  ): Promise<Token> {
    let realm: URL;
    try {
      realm = new URL(challenge.realm);
    } catch {
      throw new UpstreamInvalidError(this.name, 'token realm is not a URL');
    }
    if (realm.protocol !== 'http:' && realm.protocol !== 'https:')
      throw new UpstreamInvalidError(this.name, 'token realm is not http(s)');
    if (challenge.service !== undefined) realm.searchParams.set('service', challenge.service);
    realm.searchParams.set('scope', scope);
    const headers: Record<string, string> = { accept: 'application/json' };
    if (this.config.username !== undefined) {
      if (realmMayReceiveCredentials(this.base, realm, this.config.authRealms)) {
        headers.authorization = `Basic ${Buffer.from(`${this.config.username}:${this.password ?? ''}`).toString('base64')}`;
      } else {
        this.log.warn(
          { realm: realm.origin },
          'token realm is outside the upstream domain; asking anonymously',
        );
      }
    }
    const issued = Date.now();
    let res: Dispatcher.ResponseData;
    try {
      res = await this.observed('token', () =>
        request(realm, {
          method: 'GET',
          headers,
          dispatcher: this.agent,
          signal: options.signal ?? null,
        }),
      );
    } catch (err) {
      this.observer.failed(`a token for ${scope}`, errMessage(err));
      throw err;
    }
    if (res.statusCode !== 200)
      this.observer.failed(`a token for ${scope}`, `HTTP ${res.statusCode}`);
    if (res.statusCode === 401 || res.statusCode === 403) {
      res.body.resume();
      throw new UpstreamDeniedError(this.name, `a token for ${scope}`);
    }
    if (res.statusCode === 429) {
      res.body.resume();
      this.recordRateLimit(res.headers);
      throw new UpstreamRateLimitedError(this.name, this.lastRateLimit ?? { at: Date.now() });
    }
    if (res.statusCode !== 200) {
      res.body.resume();
      if (res.statusCode >= 500)
        throw new UpstreamUnavailableError(
          this.name,
          `token service answered HTTP ${res.statusCode}`,
        );
      throw new UpstreamInvalidError(this.name, `token service answered HTTP ${res.statusCode}`);
    }
    let body: { token?: unknown; access_token?: unknown; expires_in?: unknown };
    try {
      body = (await res.body.json()) as typeof body;
    } catch {
      throw new UpstreamInvalidError(this.name, 'token response is not JSON');
    }
    const value =
      typeof body.token === 'string'
        ? body.token
        : typeof body.access_token === 'string'
          ? body.access_token
          : undefined;
    if (!value) throw new UpstreamInvalidError(this.name, 'token response has no token');
    // The spec's default lifetime when expires_in is absent is 60 seconds.
    const expiresIn =
      typeof body.expires_in === 'number' && body.expires_in > 0 ? body.expires_in : 60;
    this.log.debug({ scope, expiresIn }, 'token obtained');
    return { value, refreshAt: refreshTime(issued, expiresIn) };
  }

  private recordRateLimit(headers: Response['headers']): void {
    const limit = header(headers, 'ratelimit-limit');
    const remaining = header(headers, 'ratelimit-remaining');
    const retryAfter = header(headers, 'retry-after');
    if (limit === undefined && remaining === undefined && retryAfter === undefined) return;
    const info: RateLimitInfo = { at: Date.now() };
    const [l, w] = parseRateLimit(limit);
    const [r] = parseRateLimit(remaining);
    if (l !== undefined) info.limit = l;
    if (w !== undefined) info.window = w;
    if (r !== undefined) info.remaining = r;
    if (retryAfter !== undefined) {
      const seconds = /^\d+$/.test(retryAfter)
        ? Number(retryAfter)
        : Math.max(0, Math.ceil((Date.parse(retryAfter) - Date.now()) / 1000));
      if (Number.isFinite(seconds)) info.retryAfterSeconds = seconds;
    }
    const source = header(headers, 'docker-ratelimit-source');
    if (source) info.source = source;
    this.lastRateLimit = info;
  }

  private bodyError(err: unknown, what: string): unknown {
    if (err instanceof UpstreamInvalidError || err instanceof UpstreamUnavailableError) return err;
    if (isConnectionError(err))
      return new UpstreamUnavailableError(this.name, `${what}: ${errMessage(err)}`);
    return err;
  }
}

/** The kind of a request by its path under the repository. */
function requestKind(suffix: string): UpstreamRequestKind {
  if (suffix.startsWith('blobs/')) return 'blob';
  if (suffix.startsWith('manifests/')) return 'manifest';
  if (suffix.startsWith('tags/')) return 'tags';
  return 'referrers';
}

function header(headers: Response['headers'], name: string): string | undefined {
  const v = headers[name];
  return Array.isArray(v) ? v[0] : v;
}

/** `100;w=21600` -> [100, 21600] */
function parseRateLimit(value: string | undefined): [number | undefined, number | undefined] {
  if (value === undefined) return [undefined, undefined];
  const m = /^\s*(\d+)(?:\s*;\s*w=(\d+))?/.exec(value);
  return m ? [Number(m[1]), m[2] !== undefined ? Number(m[2]) : undefined] : [undefined, undefined];
}

/** The next page (tags, referrers) from a `Link: <...>; rel="next"` header, as a path under the repository. */
function nextPage(link: string | undefined, repository: string): string | undefined {
  if (!link) return undefined;
  const m = /<([^>]+)>\s*;\s*rel="?next"?/.exec(link);
  if (!m) return undefined;
  // Only the path and query are used: a Link never makes us dial another host.
  const target = new URL(m[1]!, 'http://upstream.invalid');
  const prefix = `/v2/${repository}/`;
  const at = target.pathname.indexOf(prefix);
  if (at < 0) return undefined;
  return `${target.pathname.slice(at + prefix.length)}${target.search}`;
}

const CONNECTION_CODES = new Set([
  'ECONNREFUSED',
  'ECONNRESET',
  'EPIPE',
  'ETIMEDOUT',
  'EHOSTUNREACH',
  'ENETUNREACH',
  'ENOTFOUND',
  'EAI_AGAIN',
  'UND_ERR_CONNECT_TIMEOUT',
  'UND_ERR_HEADERS_TIMEOUT',
  'UND_ERR_BODY_TIMEOUT',
  'UND_ERR_SOCKET',
  'UND_ERR_CLOSED',
]);

export function isConnectionError(err: unknown): boolean {
  if (err instanceof UpstreamUnavailableError) return true;
  for (
    let e: unknown = err, depth = 0;
    e && depth < 4;
    e = (e as { cause?: unknown }).cause, depth++
  ) {
    const code = (e as { code?: string }).code;
    if (code && CONNECTION_CODES.has(code)) return true;
    if (e instanceof undiciErrors.SocketError || e instanceof undiciErrors.ConnectTimeoutError)
      return true;
  }
  return false;
}

function errMessage(err: unknown): string {
  const e = err as { code?: string; message?: string };
  return e?.code ? `${e.code}${e.message ? `: ${e.message}` : ''}` : String(e?.message ?? err);
}

function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener(
      'abort',
      () => {
        clearTimeout(timer);
        reject(signal.reason);
      },
      { once: true },
    );
  });
}
