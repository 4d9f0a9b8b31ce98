/**
 * The credentials of a request: a token of pullcache's own realm (tokens.ts), or HTTP Basic
 * credentials (RFC 7617) checked against the htpasswd file, cheaply: bcrypt costs tens of
 * milliseconds by design, so a credential is verified once and its outcome remembered in a
 * bounded LRU keyed by a keyed hash of the header (never the password itself), for a short while.
 * Wrong credentials are remembered too (for less long), so that a client retrying a wrong
 * password costs a hash, not a bcrypt. The whole memory goes when the htpasswd file changes.
 * Concurrent first requests with the same credential share one verification.
 */
import { hash, randomBytes } from 'node:crypto';
import bcrypt from 'bcryptjs';
import { LRUCache } from 'lru-cache';
import type { Logger } from '../log/logger.js';
import { AuthenticationRequiredError, malformedCredentials } from './errors.js';
import type { HtpasswdFile } from './htpasswd.js';
import type { TokenService } from './tokens.js';

/** Verified credentials are trusted this long without bcrypt. */
const VERIFIED_TTL_MS = 5 * 60_000;
/** Wrong ones are refused this long without bcrypt. */
const REFUSED_TTL_MS = 60_000;
const MAX_REMEMBERED = 10_000;
/**
 * Longer Authorization headers are refused unread (Basic of a 255-byte name and 1 KiB
 * password).
 */
const MAX_HEADER_LENGTH = 2048;

/** Who a request's credentials say it is. */
export interface Caller {
  /** The user; undefined for anonymous callers. */
  user: string | undefined;
  /** Whether it carried a credential that was taken (an anonymous token counts; none does not). */
  credentialed: boolean;
  /** A command on the same config (tokens.ts): may do everything. */
  owner?: true;
}

const NOBODY: Caller = { user: undefined, credentialed: false };

/** What a credential was found to be: a user's, nobody's (empty Basic), or wrong (and why). */
type Outcome = Caller | { wrong: string };

export class Authenticator {
  private readonly remembered = new LRUCache<string, Outcome>({ max: MAX_REMEMBERED });
  private readonly verifying = new Map<string, Promise<Outcome>>();
  /** Bumped when the file changes, so that a verification begun before does not fill the cache. */
  private generation = 0;
  private readonly salt = randomBytes(16).toString('base64');

  constructor(
    private readonly file: HtpasswdFile,
    private readonly tokens: TokenService,
    private readonly log: Logger,
  ) {
    file.onChange(() => {
      this.generation++;
      this.remembered.clear();
      this.verifying.clear();
    });
  }

  /**
   * The caller of an Authorization header: nobody when there is none (or empty Basic
   * credentials); throws the RegistryError to answer for anything else that is not a valid
   * credential (see AccessControl.identify).
   */
  authenticate(header: string | undefined): Caller | Promise<Caller> {
    if (header === undefined || header === '') return NOBODY;
    if (header.length > MAX_HEADER_LENGTH) throw malformedCredentials('credentials too long');
    const space = header.indexOf(' ');
    const scheme = (space < 0 ? header : header.slice(0, space)).toLowerCase();
    const token = header.slice(space + 1).trim();
    const bearer = scheme === 'bearer' && space > 0;
    if (!bearer && scheme !== 'basic')
      throw new AuthenticationRequiredError(
        `unsupported authorization scheme ${JSON.stringify(scheme.slice(0, 20))}; pullcache takes Basic credentials and its own Bearer tokens`,
      );
    // One hash and a lookup for every credential seen lately, tokens included (checking a token's
    // HMAC costs three times the hash).
    const key = hash('sha256', this.salt + header, 'base64');
    const known = this.remembered.get(key);
    if (known !== undefined) return userOf(known);
    if (bearer) return userOf(this.verifyToken(token, key));
    let pending = this.verifying.get(key);
    if (!pending) {
      pending = this.verify(token, key);
      this.verifying.set(key, pending);
      const done = () => this.verifying.delete(key);
      pending.then(done, done);
    }
    return pending.then(userOf);
  }

  private verifyToken(token: string, key: string): Outcome {
    const now = Date.now();
    const verified = this.tokens.verify(token, now);
    const outcome: Outcome = !verified
      ? { wrong: 'invalid or expired token' }
      : verified.owner
        ? { user: undefined, credentialed: true, owner: true }
        : { user: verified.user, credentialed: true };
    const ttl = verified ? Math.min(verified.expires - now, VERIFIED_TTL_MS) : REFUSED_TTL_MS;
    if (ttl > 0) this.remembered.set(key, outcome, { ttl });
    return outcome;
  }

  private async verify(token: string, key: string): Promise<Outcome> {
    const generation = this.generation;
    const [user, password] = decodeBasic(token);
    let outcome: Outcome;
    if (user === '' && password === '') {
      // containers/image sends empty Basic credentials when it has none: that is no credential.
      outcome = NOBODY;
    } else {
      const stored = this.file.hash(user);
      // An unknown user is checked against a hash of the file's cost: a wrong name takes as
      // long as a wrong password, and does not tell that the name is unknown.
      const ok = await bcrypt.compare(password, stored ?? this.file.unknownUserHash);
      outcome =
        ok && stored !== undefined
          ? { user, credentialed: true }
          : { wrong: 'invalid username or password' };
      if (!ok) this.log.info({ user: user.slice(0, 64) }, 'credentials refused');
    }
    if (generation === this.generation)
      this.remembered.set(key, outcome, {
        ttl: 'wrong' in outcome ? REFUSED_TTL_MS : VERIFIED_TTL_MS,
      });
    return outcome;
  }
}

function userOf(outcome: Outcome): Caller {
  if ('wrong' in outcome) throw new AuthenticationRequiredError(outcome.wrong);
  return outcome;
}

const BASE64 = /^[A-Za-z0-9+/]*={0,2}$/;
const utf8 = new TextDecoder('utf-8', { fatal: true });

/** `user:password` out of a Basic token (RFC 7617); throws 400 for anything malformed. */
function decodeBasic(token: string): [string, string] {
  if (token === '' || token.length % 4 !== 0 || !BASE64.test(token))
    throw malformedCredentials('malformed Basic credentials: not base64');
  let text: string;
  try {
    text = utf8.decode(Buffer.from(token, 'base64'));
  } catch {
    throw malformedCredentials('malformed Basic credentials: not UTF-8');
  }
  const colon = text.indexOf(':');
  // eslint-disable-next-line no-control-regex
  if (colon < 0 || /[\u0000-\u001f\u007f]/.test(text))
    throw malformedCredentials('malformed Basic credentials: expected user:password');
  return [text.slice(0, colon), text.slice(colon + 1)];
}
