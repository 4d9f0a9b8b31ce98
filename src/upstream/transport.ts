/**
 * How the registry client of one upstream talks to it: small requests on undici with a
 * keep-alive pool, blob GETs on sockets of its own (raw-get.ts). One request to
 * `/v2/<repository>/...` with its Authorization (auth.ts, once more with a fresh token after a
 * 401), redirects followed here so that credentials never reach another origin, answers mapped
 * to the typed failures of errors.ts and their rate-limit figures kept (answers.ts reads both),
 * and a circuit breaker (health.ts). It only ever dials the configured URL, the token realm the
 * upstream names, and the redirect targets the upstream sends.
 */
import { Agent, request, type Dispatcher } from 'undici';
import type { UpstreamConfig } from '../config/schema.js';
import type { Logger } from '../log/logger.js';
import { unlessAborted } from '../abort.js';
import type { Repository } from '../oci/reference.js';
import {
  bodyFailure,
  contentLength,
  header,
  isConnectionError,
  rateLimitOf,
  statusError,
} from './answers.js';
import { parseChallenge, UpstreamAuth, type Challenge } from './auth.js';
import {
  errMessage,
  UpstreamInvalidError,
  UpstreamUnavailableError,
  type RateLimitInfo,
} from './errors.js';
import type { RawBody } from './raw-body.js';
import { RawAgent } from './raw-get.js';
import { UpstreamHealth, type HealthOptions } from './health.js';
import type {
  BlobRequestOptions,
  RequestOptions,
  UpstreamObserver,
  UpstreamRequestKind,
} from './types.js';

const MAX_REDIRECTS = 5;
/** How long `close` lets requests under way finish, ms. */
const CLOSE_GRACE_MS = 2000;
const REDIRECT_STATUSES = new Set([301, 302, 303, 307, 308]);

type UndiciBody = Dispatcher.ResponseData['body'];

export interface Response<B = UndiciBody> {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  body: B;
  url: URL;
}

/**
 * How one hop of a request goes out: on undici (everything but blob bodies), or on the blob
 * path's own sockets (raw-get.ts). Either answers with a body that can be skipped (`resume`).
 */
export type Hop<B> = (
  url: URL,
  headers: Record<string, string>,
) => Promise<{
  statusCode: number;
  headers: Record<string, string | string[] | undefined>;
  body: B;
}>;

/** What `send` asks: a request to `/v2/<repository>/<suffix>`, `what` naming it in errors. */
export type SendRequest = [
  method: 'GET' | 'HEAD',
  repository: Repository,
  suffix: string,
  what: string,
  headers: Record<string, string>,
  options: RequestOptions,
];

export interface TransportOptions {
  name: string;
  config: UpstreamConfig;
  /** The client's logger (module and upstream bound). */
  log: Logger;
  /** Resolved password (from `password` or the env var `passwordEnv` names). */
  password: string | undefined;
  health: HealthOptions | undefined;
  observer: UpstreamObserver;
  /** Most milliseconds a token request may take; UpstreamAuth's default otherwise. */
  tokenTimeout?: number;
}

export class UpstreamTransport {
  private readonly name: string;
  private readonly base: URL;
  private readonly config: UpstreamConfig;
  private readonly agent: Agent;
  /** Blob GETs, on sockets read into reused buffers (raw-get.ts). */
  private readonly raw: RawAgent;
  private readonly log: Logger;
  private readonly health: UpstreamHealth;
  private readonly auth: UpstreamAuth;
  private lastRateLimit: RateLimitInfo | undefined;
  /** Requests sent and not yet answered (headers), for `close`. */
  private readonly waiting = new Set<Promise<unknown>>();
  /** True once the upstream answered without asking for credentials. */
  private anonymous = false;
  private readonly observer: UpstreamObserver;

  constructor(options: TransportOptions) {
    this.name = options.name;
    this.config = options.config;
    this.base = new URL(options.config.url);
    this.log = options.log;
    this.health = new UpstreamHealth(options.health);
    this.observer = options.observer;
    const { timeouts } = options.config;
    this.agent = new Agent({
      connect: { timeout: timeouts.connect },
      headersTimeout: timeouts.headers,
      bodyTimeout: timeouts.bodyIdle,
      keepAliveTimeout: 30_000,
      connections: 64,
    });
    this.raw = new RawAgent(timeouts);
    this.auth = new UpstreamAuth({
      name: options.name,
      base: this.base,
      config: options.config,
      password: options.password,
      agent: this.agent,
      ...(options.tokenTimeout !== undefined ? { tokenTimeout: options.tokenTimeout } : {}),
      log: this.log,
      observer: this.observer,
      observed: (kind, send) => this.observed(kind, send),
      rateLimited: (headers) => {
        this.recordRateLimit(headers);
        return this.lastRateLimit;
      },
    });
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
    return this.auth.scheme ?? (this.anonymous ? 'none' : undefined);
  }

  /**
   * Closes the pools. Requests waiting for their answer get CLOSE_GRACE_MS, then every one still
   * open is cut (`destroy`; undici's `close` waits for them, and a `destroy` after it does not
   * cut them). A request that hangs (a token service that took it and says nothing) would
   * otherwise hold the shutdown for the headers timeout, past the 10 s after which the CLI exits
   * without closing the rest (the lifecycle's last flush, its lease). The server has cut its
   * clients' connections by then: what is left has no client waiting.
   */
  async close(): Promise<void> {
    this.raw.close();
    if (this.waiting.size > 0)
      await unlessAborted(
        Promise.allSettled([...this.waiting]),
        AbortSignal.timeout(CLOSE_GRACE_MS),
      ).catch(() => {});
    await this.agent.destroy();
  }

  /**
   * `GET /v2/`, redirects followed, no credentials: learns the auth challenge (a 401's) or that
   * none is asked (a 200). Resolves to any answer; throws when there is none.
   */
  async ping(signal: AbortSignal): Promise<{ status: number; challenge: Challenge | undefined }> {
    const url = this.v2Url('');
    const res = await this.dispatch(this.undiciHop('GET', { signal }), 'ping', url, {});
    res.body.resume();
    const challenge =
      res.status === 401 && res.url.origin === url.origin
        ? parseChallenge(res.headers['www-authenticate'])
        : undefined;
    if (challenge) this.auth.greeted(challenge);
    if (res.status === 200) this.anonymous = true;
    return { status: res.status, challenge };
  }

  /**
   * A whole body of at most `limit` bytes (a manifest, a referrers or tags page), counted as
   * received for `kind`; larger is invalid.
   */
  async readSmallBody(
    res: Response,
    kind: 'manifest' | 'referrers' | 'tags',
    what: string,
    limit: number,
  ): Promise<Buffer> {
    const declared = contentLength(res.headers);
    if (declared !== undefined && declared > limit) {
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
    this.observer.received(kind, size);
    return Buffer.concat(chunks, size);
  }

  /**
   * One request to `/v2/<repository>/<suffix>` with auth, redirects and error mapping. Resolves
   * only to a 2xx response (206 included); everything else is thrown as a typed error.
   */
  send(...request: SendRequest): Promise<Response> {
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
  rawHop(options: BlobRequestOptions): Hop<RawBody> {
    return (url, headers) =>
      this.raw.get(url, { headers, signal: options.signal, slabs: options.slabs });
  }

  /** `send`, each hop going out by `hop`. */
  async sendVia<B extends { resume(): void }>(
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
      let token = await this.auth.authorization(scope, options);
      res = await this.dispatch(hop, kind, url, {
        ...headers,
        ...(token ? { authorization: token.header } : {}),
      });
      // Only the upstream's own 401 teaches a challenge: a redirect target's (an object store's)
      // would send the next requests for tokens to a realm the upstream never named.
      if (res.status === 401 && res.url.origin === url.origin) {
        const challenge = parseChallenge(res.headers['www-authenticate']);
        res.body.resume();
        if (challenge) {
          this.auth.challenged(challenge, scope, token);
          token = await this.auth.authorization(scope, options);
          if (token)
            res = await this.dispatch(hop, kind, url, { ...headers, authorization: token.header });
        }
      }
      this.health.success();
    } catch (err) {
      if (isConnectionError(err)) {
        this.health.failure();
        this.observer.failed(`${method} ${url.pathname}`, errMessage(err), [repository]);
        this.log.warn(
          { method, path: url.pathname, err: errMessage(err), durationMs: Date.now() - started },
          'upstream unreachable',
        );
        // Already ours (a token service's 5xx): not wrapped in itself again.
        throw err instanceof UpstreamUnavailableError
          ? err
          : new UpstreamUnavailableError(this.name, errMessage(err));
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
      if (!this.auth.scheme) this.anonymous = true;
      return res;
    }
    res.body.resume();
    if (res.status !== 404)
      this.observer.failed(`${method} ${url.pathname}`, `HTTP ${res.status}`, [repository]);
    throw statusError(this.name, what, res.status, this.lastRateLimit);
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
  private observed<R extends { statusCode: number }>(
    kind: UpstreamRequestKind,
    send: () => Promise<R>,
  ): Promise<R> {
    const started = performance.now();
    // A hop that throws at once fails like one that rejects.
    const answer = new Promise<R>((resolve) => resolve(send())).then(
      (res) => {
        this.observer.request(kind, res.statusCode, (performance.now() - started) / 1000);
        return res;
      },
      (err: unknown) => {
        this.observer.request(kind, 'error', (performance.now() - started) / 1000);
        throw err;
      },
    );
    // Known to `close` until answered.
    this.waiting.add(answer);
    answer.then(
      () => this.waiting.delete(answer),
      () => this.waiting.delete(answer),
    );
    return answer;
  }

  private recordRateLimit(headers: Response['headers']): void {
    const info = rateLimitOf(headers);
    if (info) this.lastRateLimit = info;
  }

  /** A body's failure as the typed error: a broken connection is UpstreamUnavailableError. */
  bodyError(err: unknown, what: string): unknown {
    return bodyFailure(this.name, err, what);
  }
}

/** The kind of a request by its path under the repository. */
function requestKind(suffix: string): UpstreamRequestKind {
  if (suffix.startsWith('blobs/')) return 'blob';
  if (suffix.startsWith('manifests/')) return 'manifest';
  if (suffix.startsWith('tags/')) return 'tags';
  return 'referrers';
}
