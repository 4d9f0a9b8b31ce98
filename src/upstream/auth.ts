/**
 * Registry auth as Docker Hub and every registry do it
 * (https://distribution.github.io/distribution/spec/auth/token/): a 401 carries a
 * `WWW-Authenticate` challenge, Bearer (realm, service, scope) or Basic.
 */

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
 * May credentials for `upstreamUrl` go to `realmUrl`? Only to the upstream's own host or a host
 * of its registrable domain (auth.docker.io for registry-1.docker.io), never over a weaker
 * scheme, or to a realm allowed by prefix in the upstream's config.
 */
export function realmMayReceiveCredentials(
  upstreamUrl: URL,
  realmUrl: URL,
  allowed: readonly string[],
): boolean {
  if (allowed.some((prefix) => realmUrl.href.startsWith(prefix))) return true;
  if (upstreamUrl.protocol === 'https:' && realmUrl.protocol !== 'https:') return false;
  const upstreamHost = upstreamUrl.hostname.toLowerCase();
  const realmHost = realmUrl.hostname.toLowerCase();
  if (upstreamHost === realmHost) return true;
  const domain = registrableDomain(upstreamHost);
  return domain !== undefined && (realmHost === domain || realmHost.endsWith(`.${domain}`));
}

/**
 * The last two labels of a DNS name (docker.io for registry-1.docker.io); undefined for an IP
 * address or a single label. A public-suffix list would do better for names under co.uk and the
 * like; for those, configure `authRealms`.
 */
function registrableDomain(host: string): string | undefined {
  if (/^[\d.]+$/.test(host) || host.includes(':') || host.startsWith('[')) return undefined;
  const labels = host.split('.');
  if (labels.length < 2) return undefined;
  return labels.slice(-2).join('.');
}

export interface Token {
  value: string;
  /** ms since epoch after which the token is not used again. */
  refreshAt: number;
}

/** Tokens per scope, and one request at a time per scope. */
export class TokenCache {
  private readonly tokens = new Map<string, Token>();
  private readonly pending = new Map<string, Promise<Token>>();

  constructor(private readonly now: () => number = Date.now) {}

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
