/**
 * Access control as the HTTP layer asks for it (contract in types.ts): client authentication
 * with an htpasswd file and the rules, or, without `auth.htpasswd`, the behaviour of a cache
 * without users: anyone may pull, and `admin` is granted to connections from this host only.
 */
import type { IncomingMessage } from 'node:http';
import { isIP } from 'node:net';
import { ConfigError } from '../config/load.js';
import type { Config } from '../config/schema.js';
import type { Logger } from '../log/logger.js';
import { Authenticator, type Caller } from './credentials.js';
import { AuthenticationRequiredError, denied } from './errors.js';
import { HtpasswdFile, type HtpasswdOptions } from './htpasswd.js';
import { OwnerKey, ownerKeyPath } from './owner-key.js';
import { Rules } from './rules.js';
import { TokenService } from './tokens.js';
import type { AccessControl, Action, Identity, Target } from './types.js';

export type { AccessControl, Action, Identity, Target } from './types.js';

/**
 * The access control of `config`. Throws a ConfigError naming `auth.htpasswd` when the file
 * cannot be read (start-up exits 2).
 */
export function createAccess(
  config: Config,
  log: Logger,
  options: HtpasswdOptions = {},
): AccessControl {
  const trustProxy = config.server.trustProxy;
  if (config.auth.htpasswd === '') return new OpenAccess(trustProxy);
  let file: HtpasswdFile;
  try {
    file = new HtpasswdFile(config.auth.htpasswd, log.child({ module: 'access' }), options);
  } catch (err) {
    throw new ConfigError([
      `auth.htpasswd: cannot read ${JSON.stringify(config.auth.htpasswd)}: ${(err as Error).message}`,
    ]);
  }
  const rules = new Rules(config.auth.rules);
  if (config.auth.anonymous && !rules.mentionsAnonymous)
    log.warn(
      'auth.anonymous is true but no rule names "anonymous": anonymous requests get nothing',
    );
  // Made now if missing, so that the commands find it (they only read it).
  const ownerKey = new OwnerKey(ownerKeyPath(config), log.child({ module: 'access' }));
  const tokens = new TokenService(file, () => ownerKey.secret());
  return new AuthenticatedAccess(file, tokens, rules, config.auth.anonymous, trustProxy, log);
}

/**
 * The client as trusted proxies forwarded it: the right-most X-Forwarded-For entry that is not
 * loopback (those to its right are proxies on this host, as `isLocal` reads them; those to its
 * left what the client wrote), or the last when all are; undefined when an entry read is no IP.
 */
function forwardedFor(req: IncomingMessage): string | undefined {
  const header = req.headers['x-forwarded-for'];
  if (header === undefined) return undefined;
  const entries = (Array.isArray(header) ? header.join(',') : header).split(',');
  for (let i = entries.length - 1; i >= 0; i--) {
    const address = entries[i]!.trim();
    if (isIP(address) === 0) return undefined;
    if (!isLoopback(address) || i === 0) return address;
  }
  return undefined;
}

/** The client's address: the socket's, or behind a trusted proxy the one it forwarded. */
function clientAddress(req: IncomingMessage, trustProxy: boolean): string | undefined {
  return (trustProxy ? forwardedFor(req) : undefined) ?? req.socket.remoteAddress;
}

/**
 * The path of the token realm (a GET, answered by the HTTP layer with
 * AccessControl.issueToken).
 */
export const TOKEN_PATH = '/_pullcache/token';
export const SERVICE = 'pullcache';
const BASIC_CHALLENGE = 'Basic realm="pullcache", charset="UTF-8"';
const HOST = /^(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?$/;

/**
 * The challenge of a 401: the token realm on the registry API, Basic elsewhere. The realm is an
 * absolute URL on the host the client dialled (its Host header, checked), in the scheme it used
 * (X-Forwarded-Proto behind a trusted proxy).
 */
function challenge(req: IncomingMessage, trustProxy: boolean): string {
  // Inside express, req.url is relative to a router's mount point; originalUrl is the request's.
  const path = (req as { originalUrl?: string }).originalUrl ?? req.url ?? '';
  if (!path.startsWith('/v2')) return BASIC_CHALLENGE;
  const forwarded = trustProxy ? req.headers['x-forwarded-proto'] : undefined;
  const scheme =
    forwarded === 'https' || forwarded === 'http'
      ? forwarded
      : (req.socket as { encrypted?: boolean }).encrypted
        ? 'https'
        : 'http';
  const given = req.headers.host;
  const local = req.socket.localAddress ?? '127.0.0.1';
  const host =
    given !== undefined && HOST.test(given)
      ? given
      : `${local.includes(':') ? `[${local}]` : local}:${req.socket.localPort ?? ''}`;
  return `Bearer realm="${scheme}://${host}${TOKEN_PATH}",service="${SERVICE}"`;
}

function isLoopback(address: string | undefined): boolean {
  return (
    address !== undefined &&
    (address === '::1' || address.startsWith('127.') || address.startsWith('::ffff:127.'))
  );
}

/**
 * Headers that proxies add (RFC 7239's Forwarded, the X-Forwarded-* family, nginx's X-Real-IP,
 * Via): a request with one came through a proxy, whose connection says nothing of the client.
 */
const PROXY_HEADERS = [
  'forwarded',
  'x-forwarded-for',
  'x-forwarded-host',
  'x-forwarded-proto',
  'x-real-ip',
  'via',
] as const;

/**
 * Whether the client is on this host: its connection comes from loopback, and
 * - without `server.trustProxy`, the request carries no header a proxy adds: a proxy on this
 *   host (nginx with the usual X-Forwarded-For, X-Real-IP) connects from loopback for every
 *   client, wherever it is. A proxy that adds none of them cannot be told from a local client:
 *   client authentication is what protects a cache published through one;
 * - with it, behind a proxy that forwarded the request, every X-Forwarded-For entry is loopback:
 *   the right-most entry that is not is the client (entries to its right are proxies on this
 *   host, entries to its left what that client wrote, which counts not). One that is not an IP
 *   address is no client of this host, and neither is a request through a proxy that sent
 *   another header of PROXY_HEADERS but no X-Forwarded-For.
 */
function isLocal(req: IncomingMessage, trustProxy: boolean): boolean {
  // The headers only ever take "local" away: a client that connects from elsewhere and sends
  // X-Forwarded-For: 127.0.0.1 is no more local for it.
  if (!isLoopback(req.socket.remoteAddress)) return false;
  const header = req.headers['x-forwarded-for'];
  if (trustProxy && header !== undefined) {
    const entries = (Array.isArray(header) ? header.join(',') : header).split(',');
    return entries.every((entry) => {
      const address = entry.trim();
      return isIP(address) !== 0 && isLoopback(address);
    });
  }
  return PROXY_HEADERS.every((name) => req.headers[name] === undefined);
}

/** No client authentication: everyone may pull; changing the cache from this host only. */
class OpenAccess implements AccessControl {
  readonly enabled = false;
  readonly anonymousAllowed = true;

  constructor(private readonly trustProxy: boolean) {}

  identify(req: IncomingMessage): Identity {
    return { user: undefined, credentialed: false, local: isLocal(req, this.trustProxy) };
  }

  allows(identity: Identity, action: Action): boolean {
    return action === 'pull' || identity.local;
  }

  served(): boolean {
    return true;
  }

  authorize(identity: Identity, action: Action): void {
    if (!this.allows(identity, action))
      throw denied(
        'changing the cache needs the admin action; without client authentication, only from this host',
      );
  }

  clientAddress(req: IncomingMessage): string | undefined {
    return clientAddress(req, this.trustProxy);
  }

  challenge(): string {
    return BASIC_CHALLENGE;
  }

  issueToken(): undefined {
    return undefined;
  }

  close(): void {}
}

class AuthenticatedAccess implements AccessControl {
  readonly enabled = true;
  private readonly authenticator: Authenticator;

  constructor(
    private readonly file: HtpasswdFile,
    private readonly tokens: TokenService,
    private readonly rules: Rules,
    readonly anonymousAllowed: boolean,
    private readonly trustProxy: boolean,
    log: Logger,
  ) {
    this.authenticator = new Authenticator(file, this.tokens, log.child({ module: 'access' }));
  }

  identify(req: IncomingMessage): Identity | Promise<Identity> {
    const local = isLocal(req, this.trustProxy);
    const caller = this.authenticator.authenticate(req.headers.authorization);
    const identity = (c: Caller): Identity =>
      c.owner
        ? { user: undefined, credentialed: true, owner: true, local }
        : { user: c.user, credentialed: c.credentialed, local };
    return 'then' in caller ? caller.then(identity) : identity(caller);
  }

  served(identity: Identity): boolean {
    return identity.user !== undefined || identity.owner === true || this.anonymousAllowed;
  }

  allows(identity: Identity, action: Action, target?: Target): boolean {
    if (identity.owner) return true;
    if (identity.user === undefined && !this.anonymousAllowed) return false;
    return this.rules.allows(identity.user, action, target);
  }

  authorize(identity: Identity, action: Action, target?: Target): void {
    if (this.allows(identity, action, target)) return;
    const what = describe(action, target);
    if (identity.user === undefined)
      throw new AuthenticationRequiredError(`authentication required to ${what}`);
    throw denied(`user ${JSON.stringify(identity.user)} may not ${what}`);
  }

  clientAddress(req: IncomingMessage): string | undefined {
    return clientAddress(req, this.trustProxy);
  }

  challenge(req: IncomingMessage): string {
    return challenge(req, this.trustProxy);
  }

  issueToken(identity: Identity) {
    if (identity.user === undefined && !this.anonymousAllowed) return undefined;
    return this.tokens.issue(identity.user);
  }

  close(): void {
    this.file.close();
  }
}

function describe(action: Action, target: Target = {}): string {
  const verb = action === 'pull' ? 'pull' : 'administer';
  if (target.upstream === undefined) return action === 'pull' ? 'pull' : 'change the cache';
  return `${verb} ${target.upstream}${target.repository === undefined ? '' : `/${target.repository}`}`;
}
