/**
 * Registry auth as Docker Hub and every registry do it
 * (https://distribution.github.io/distribution/spec/auth/token/): a 401 carries a
 * `WWW-Authenticate` challenge, Bearer (realm, service, scope) or Basic. `UpstreamAuth` is one
 * upstream's side of it: the challenge it learned, its tokens per scope, and the Authorization
 * header for a request; credentials go only to a realm `realmMayReceiveCredentials` allows.
 * The transport (transport.ts) sends the requests and tells it of each 401.
 */
import { LRUCache } from 'lru-cache';
import { request, type Agent, type Dispatcher } from 'undici';
import type { UpstreamConfig } from '../config/schema.js';
import type { Logger } from '../log/logger.js';
import { unlessAborted } from '../abort.js';
import {
  errMessage,
  UpstreamDeniedError,
  UpstreamInvalidError,
  UpstreamRateLimitedError,
  UpstreamUnavailableError,
  type RateLimitInfo,
} from './errors.js';
import type { RequestOptions, UpstreamObserver, UpstreamRequestKind } from './types.js';

export type Challenge =
  | { scheme: 'bearer'; realm: string; service?: string; scope?: string }
  | { scheme: 'basic'; realm?: string };

/** Parses a WWW-Authenticate header; undefined when it holds no challenge we support. */
export function parseChallenge(header: string | string[] | undefined): Challenge | undefined {
  const values = Array.isArray(header) ? header : header ? [header] : [];
  for (const value of values) {
    const m = /^\s*(\w+)\s*(.*)$/s.exec(value);
    if (!m) continue;
    const scheme = m[1]!.toLowerCase();
    const params: Record<string, string> = {};
    const re = /([A-Za-z_][\w-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))/g;
    let p: RegExpExecArray | null;
    while ((p = re.exec(m[2]!)) !== null) {
      params[p[1]!.toLowerCase()] = p[2] !== undefined ? p[2].replace(/\\(.)/g, '$1') : p[3]!;
    }
    if (scheme === 'bearer' && params.realm) {
      const challenge: Challenge = { scheme: 'bearer', realm: params.realm };
      if (params.service !== undefined) challenge.service = params.service;
      if (params.scope !== undefined) challenge.scope = params.scope;
      return challenge;
    }
    if (scheme === 'basic')
      return params.realm !== undefined
        ? { scheme: 'basic', realm: params.realm }
        : { scheme: 'basic' };
  }
  return undefined;
}

/**
 * Token realms that receive an upstream's credentials without configuration, beside the
 * upstream's own host, each run by the registry's own operator: Docker Hub's registry hosts
 * send clients to auth.docker.io, GitLab.com's registry to gitlab.com (`/jwt/auth`), NVIDIA's
 * NGC registry to authn.nvidia.com.
 */
const KNOWN_REALM_HOSTS: ReadonlyMap<string, string> = new Map([
  ['registry-1.docker.io', 'auth.docker.io'],
  ['index.docker.io', 'auth.docker.io'],
  ['registry.gitlab.com', 'gitlab.com'],
  ['nvcr.io', 'authn.nvidia.com'],
]);

/**
 * May credentials for `upstreamUrl` go to `realmUrl`? Never to a realm with user information
 * in it. Otherwise to one that `allowed` (the upstream's `authRealms`) names: the same origin
 * (scheme, host, port) and a path under the entry's, segment by segment (`https://a.example/auth`
 * takes `/auth` and `/auth/token`, not `/authx`). Else only over https when the upstream is
 * https, and only to the upstream's own host or its KNOWN_REALM_HOSTS entry. Not to
 * other hosts of the upstream's domain: under a shared domain (`*.azurecr.io`, ECR's
 * `*.amazonaws.com`), another host is another tenant's, and the public suffix list names few
 * of those (not azurecr.io): such a realm is named in `authRealms`.
 */
export function realmMayReceiveCredentials(
  upstreamUrl: URL,
  realmUrl: URL,
  allowed: readonly string[],
): boolean {
  if (realmUrl.username !== '' || realmUrl.password !== '') return false;
  if (allowed.some((entry) => realmListed(realmUrl, entry))) return true;
  if (upstreamUrl.protocol === 'https:' && realmUrl.protocol !== 'https:') return false;
  const upstreamHost = upstreamUrl.hostname.toLowerCase();
  const realmHost = realmUrl.hostname.toLowerCase();
  return realmHost === upstreamHost || KNOWN_REALM_HOSTS.get(upstreamHost) === realmHost;
}

/** Whether an `authRealms` entry names `realm`: same origin, path under the entry's. */
function realmListed(realm: URL, entry: string): boolean {
  let listed: URL;
  try {
    listed = new URL(entry);
  } catch {
    return false;
  }
  if (listed.username !== '' || listed.password !== '') return false;
  if (listed.origin === 'null' || listed.origin !== realm.origin) return false;
  const base = listed.pathname;
  const path = realm.pathname;
  return path === base || path.startsWith(base.endsWith('/') ? base : `${base}/`);
}

export interface Token {
  value: string;
  /** ms since epoch after which the token is not used again. */
  refreshAt: number;
}

/**
 * How many bytes of tokens one upstream keeps (tokens and their scopes): a scope is one
 * repository, and clients choose its name, so the tokens of names asked once (any that does not
 * exist) must not stay for ever. Past it the least recently used go; a token expired stays only
 * until its scope is asked again or it is the least recently used. A few thousand scopes of
 * Docker Hub's tokens (about 1 KB each).
 */
export const TOKEN_CACHE_BYTES = 4 * 1024 * 1024;

/** Tokens per scope, and one request at a time per scope. */
export class TokenCache {
  private readonly tokens: LRUCache<string, Token>;
  private readonly pending = new Map<string, Promise<Token>>();

  constructor(private readonly now: () => number = Date.now) {
    this.tokens = new LRUCache<string, Token>({
      maxSize: TOKEN_CACHE_BYTES,
      sizeCalculation: (token, scope) => token.value.length + scope.length + 64,
    });
  }

  /** Tokens held now (expired ones included until they go). */
  get size(): number {
    return this.tokens.size;
  }

  get(scope: string): Token | undefined {
    const token = this.tokens.get(scope);
    if (token && token.refreshAt > this.now()) return token;
    if (token) this.tokens.delete(scope);
    return undefined;
  }

  invalidate(scope: string, value: string): void {
    if (this.tokens.get(scope)?.value === value) this.tokens.delete(scope);
  }

  /** The cached token, else the one a concurrent caller is fetching, else `fetch()`. */
  async obtain(scope: string, fetch: () => Promise<Token>): Promise<Token> {
    const cached = this.get(scope);
    if (cached) return cached;
    let request = this.pending.get(scope);
    if (!request) {
      request = fetch()
        .then((token) => {
          this.tokens.set(scope, token);
          return token;
        })
        .finally(() => this.pending.delete(scope));
      this.pending.set(scope, request);
    }
    return request;
  }
}

/** When to stop using a token: shortly before it expires (a quarter of its life, at most 30 s). */
export function refreshTime(issuedAt: number, expiresInSeconds: number): number {
  const life = expiresInSeconds * 1000;
  return issuedAt + life - Math.min(30_000, life / 4);
}

/** An Authorization header, the credential in it, and whether it came from the token cache. */
export interface Authorization {
  header: string;
  token: string;
  cached: boolean;
}

export interface AuthOptions {
  name: string;
  /** The configured URL: the realms that may receive credentials are judged against it. */
  base: URL;
  config: UpstreamConfig;
  /** Resolved password (from `password` or the env var `passwordEnv` names). */
  password: string | undefined;
  /** Token requests go out on the transport's keep-alive pool. */
  agent: Agent;
  /**
   * Most milliseconds one token request may take, answer and body: by default the configured
   * timeouts added up, and at least a minute.
   */
  tokenTimeout?: number;
  log: Logger;
  observer: UpstreamObserver;
  /** Times a request and tells the observer of it (the transport's). */
  observed<R extends { statusCode: number }>(
    kind: UpstreamRequestKind,
    send: () => Promise<R>,
  ): Promise<R>;
  /** Records a 429's rate-limit headers; returns the last figures the upstream sent. */
  rateLimited(headers: Dispatcher.ResponseData['headers']): RateLimitInfo | undefined;
}

/** One upstream's auth: the challenge it learned, its tokens, its credentials. */
export class UpstreamAuth {
  private readonly name: string;
  private readonly base: URL;
  private readonly config: UpstreamConfig;
  private readonly password: string | undefined;
  private readonly agent: Agent;
  private readonly tokenTimeout: number;
  private readonly log: Logger;
  private readonly observer: UpstreamObserver;
  private readonly observed: AuthOptions['observed'];
  private readonly rateLimited: AuthOptions['rateLimited'];
  private readonly tokens = new TokenCache();
  /** Learned from the first 401, so later scopes fetch their token without a round trip. */
  private challenge: Challenge | undefined;

  constructor(options: AuthOptions) {
    this.name = options.name;
    this.base = options.base;
    this.config = options.config;
    this.password = options.password;
    this.agent = options.agent;
    const { connect, headers, bodyIdle } = options.config.timeouts;
    this.tokenTimeout = options.tokenTimeout ?? Math.max(60_000, connect + headers + bodyIdle);
    this.log = options.log;
    this.observer = options.observer;
    this.observed = options.observed;
    this.rateLimited = options.rateLimited;
  }

  /** The scheme of the challenge learned (`bearer`, `basic`); undefined before the first. */
  get scheme(): string | undefined {
    return this.challenge?.scheme;
  }

  /** The start-up greeting's challenge: learned unless a request has taught one already. */
  greeted(challenge: Challenge): void {
    this.challenge ??= challenge;
  }

  /** A 401 with `challenge` answered a request that carried `token` (or none). */
  challenged(challenge: Challenge, scope: string, token: Authorization | undefined): void {
    this.challenge = challenge;
    // A 401 on a cached token: one retry with a fresh one. Without a token: the first one.
    if (token?.cached) this.tokens.invalidate(scope, token.token);
  }

  /**
   * The Authorization header for a scope, from the token cache or a new token; none when
   * anonymous access is all we know.
   */
  async authorization(scope: string, options: RequestOptions): Promise<Authorization | undefined> {
    const challenge = this.challenge;
    if (!challenge) return undefined;
    if (challenge.scheme === 'basic') {
      if (this.config.username === undefined) return undefined;
      const value = this.basicCredential();
      return { header: `Basic ${value}`, token: value, cached: false };
    }
    const cached = this.tokens.get(scope);
    if (cached) return { header: `Bearer ${cached.value}`, token: cached.value, cached: true };
    // One token request per scope serves every caller waiting for it, so it is not cut when the
    // caller that started it gives up (its client gone): the others still want the token. It
    // has a deadline of its own (the pool's timeouts may be 0: none), or a token service that
    // took the request and never answered would hold every later caller of the scope; a caller
    // that gives up stops waiting at once.
    const shared = this.tokens.obtain(scope, () => this.fetchToken(challenge, scope));
    const token = await (options.signal ? unlessAborted(shared, options.signal) : shared);
    return { header: `Bearer ${token.value}`, token: token.value, cached: false };
  }

  /** The configured username and password, as Basic auth carries them. */
  private basicCredential(): string {
    return Buffer.from(`${this.config.username}:${this.password ?? ''}`).toString('base64');
  }

  private async fetchToken(
    challenge: Extract<Challenge, { scheme: 'bearer' }>,
    scope: string,
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
        headers.authorization = `Basic ${this.basicCredential()}`;
      } else {
        this.log.warn(
          { realm: realm.origin },
          "token realm is not the upstream's host nor in its authRealms; asking anonymously",
        );
      }
    }
    const issued = Date.now();
    const deadline = AbortSignal.timeout(this.tokenTimeout);
    const late = () =>
      new UpstreamUnavailableError(
        this.name,
        `token service did not answer within ${this.tokenTimeout / 1000} s`,
      );
    let res: Dispatcher.ResponseData;
    try {
      res = await this.observed('token', () =>
        request(realm, {
          method: 'GET',
          headers,
          dispatcher: this.agent,
          signal: deadline,
        }),
      );
    } catch (err) {
      const failure = deadline.aborted ? late() : err;
      this.observer.failed(`a token for ${scope}`, errMessage(failure), scopeRepositories(scope));
      throw failure;
    }
    if (res.statusCode !== 200)
      this.observer.failed(
        `a token for ${scope}`,
        `HTTP ${res.statusCode}`,
        scopeRepositories(scope),
      );
    if (res.statusCode === 401 || res.statusCode === 403) {
      res.body.resume();
      throw new UpstreamDeniedError(this.name, `a token for ${scope}`);
    }
    if (res.statusCode === 429) {
      res.body.resume();
      throw new UpstreamRateLimitedError(
        this.name,
        this.rateLimited(res.headers) ?? { at: Date.now() },
      );
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
      if (deadline.aborted) throw late();
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
}

/**
 * The repositories a token scope names (`repository:library/alpine:pull`; several are separated
 * by spaces): the grammar of distribution's token spec, where a name holds no `:` and no space.
 */
function scopeRepositories(scope: string): string[] {
  return scope
    .split(' ')
    .map((part) => /^repository:([^:]+):[^:]*$/.exec(part)?.[1])
    .filter((name): name is string => name !== undefined);
}
