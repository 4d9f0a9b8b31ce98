/**
 * The contracts of access/: who is asking (an identity from a request's credentials), and what
 * they may do where (rules). The HTTP layer asks; nothing below it knows of users.
 */
import type { IncomingMessage } from 'node:http';

/** What a rule can allow. `admin` is anything that changes the cache (pin, unpin, remove, gc). */
export type Action = 'pull' | 'admin';

/** Who asks. */
export interface Identity {
  /** The htpasswd user whose credentials were verified; undefined for a request without any. */
  readonly user: string | undefined;
  /**
   * Whether the request carried a credential that was taken: a password, a token (an anonymous
   * token too). `/v2/` challenges callers without one, so that clients learn to log in.
   */
  readonly credentialed: boolean;
  /**
   * A pullcache command on the same config (`pullcache pin`, `rm`, `gc`... beside a server),
   * proven by a token made from the owner key in storage (owner-key.ts): may do everything.
   */
  readonly owner?: boolean;
  /**
   * The client is on this host (loopback): the socket's address, for a request that no proxy
   * forwarded (none of the headers proxies add); behind a trusted proxy (`server.trustProxy`)
   * that forwarded it, every X-Forwarded-For entry (the client, and the proxies on this host
   * after it). Only consulted when client authentication is off: then `admin` is granted from
   * this host only.
   */
  readonly local: boolean;
}

/** Where an action applies; omitted fields: the whole cache (gc, recount). */
export interface Target {
  upstream?: string;
  repository?: string;
}

export interface AccessControl {
  /** Whether client authentication is on (`auth.htpasswd` set). */
  readonly enabled: boolean;
  /**
   * The caller of a request, from its Authorization header: a user by a password (Basic) or a
   * token of pullcache's realm, or anonymous when it carries no credentials (or empty Basic ones,
   * which some clients send unasked) or an anonymous token. Throws a RegistryError for
   * credentials that are wrong or expired (AuthenticationRequiredError, 401), of an unknown
   * scheme (401), malformed or over-long (400 INVALID_REQUEST). Synchronous for tokens and for a
   * password verified recently (the usual case); a first verification (bcrypt) is a promise.
   * Never throws anything else.
   */
  identify(req: IncomingMessage): Identity | Promise<Identity>;
  /** Whether `identity` may do `action` on `target`. Never throws. */
  allows(identity: Identity, action: Action, target?: Target): boolean;
  /**
   * Returns when `allows` does; else throws 401 UNAUTHORIZED with the challenge for anonymous
   * callers (they may log in) and 403 DENIED for authenticated ones.
   */
  authorize(identity: Identity, action: Action, target?: Target): void;
  /** Whether anonymous callers are served at all (`auth.anonymous`, or auth off). */
  readonly anonymousAllowed: boolean;
  /**
   * Whether the caller is served at all: a user, a command on the same config, or an anonymous
   * caller where anonymous callers are served. What lists or reads (catalog, admin API reads,
   * the status page) asks this first, and answers 401 when not.
   */
  served(identity: Identity): boolean;
  /**
   * The client's address for the logs: the socket's, or with `server.trustProxy` the last
   * X-Forwarded-For entry (the address the proxy in front saw).
   */
  clientAddress(req: IncomingMessage): string | undefined;
  /**
   * The `WWW-Authenticate` challenge of a 401 to this request: on the registry API (`/v2/...`)
   * pullcache's token realm on the host the client dialled, elsewhere (status page, admin API)
   * Basic, which browsers and scripts answer.
   */
  challenge(req: IncomingMessage): string;
  /**
   * A token of pullcache's realm for the caller (GET /_pullcache/token), or undefined when the
   * caller may not have one (anonymous while anonymous callers are not served).
   */
  issueToken(
    identity: Identity,
  ): { token: string; expiresIn: number; issuedAt: string } | undefined;
  /** Stops watching the htpasswd file. */
  close(): void;
}
