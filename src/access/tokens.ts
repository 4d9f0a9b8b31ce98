/**
 * pullcache as its own token realm, the way Docker Hub works: a client challenged with
 * `Bearer realm=".../_pullcache/token"` asks there, with its Basic credentials or none, and gets a
 * short-lived token to send instead. Docker Engine needs it: it sends no request without
 * credentials to a registry that challenges with Basic (so anonymous pulls would fail), and one
 * whose `/v2/` answers without a challenge never gets its login's credentials. With a token realm
 * both work on the same server, as they do on Docker Hub.
 *
 * A token says who and until when: `base64url({"s":user|null,"e":expiry})` `.` its HMAC-SHA256.
 * The key of a user's tokens is derived from that user's line of the htpasswd file (the name and
 * the bcrypt hash, whose 128-bit random salt makes it unguessable): every replica reading the
 * same file takes every other's tokens, a restart keeps them, and a changed password or a removed
 * user ends them at once. Whoever can read the htpasswd file can make tokens: keep it as secret as
 * a key (it is the root of trust either way). An anonymous token grants what no credentials do,
 * so it needs no signature.
 *
 * The commands (`pullcache pin`, `rm`, `gc`...) that go through the admin API of a server on
 * their storage make an owner token (`{"o":1}`), which may do everything. Its key is an HMAC of
 * the htpasswd file's text under the owner key, a random secret of this host that only the
 * server's user reads (owner-key.ts): the text alone is no secret (a file without users is a
 * public string), the secret is what makes the key unguessable; the text in it ends the owner
 * tokens in flight when the file changes. Without a readable owner key no owner token is taken.
 */
import { createHash, createHmac, timingSafeEqual } from 'node:crypto';
import { readFileSync } from 'node:fs';
import type { Config } from '../config/schema.js';
import { fileProblem, type HtpasswdFile } from './htpasswd.js';
import { ownerKeyPath, readOwnerKey } from './owner-key.js';

/** How long a token is good for, seconds (clients fetch a new one when it runs out). */
export const TOKEN_TTL_S = 300;

export interface Token {
  token: string;
  expiresIn: number;
  issuedAt: string;
}

export class TokenService {
  /** user -> key, from the file as it is now. */
  private readonly keys = new Map<string, Buffer>();
  /** The owner tokens' key, with the secret it was made from. */
  private owner: { secret: Buffer; key: Buffer } | undefined;

  /**
   * `ownerSecret`: the owner key's secret now (OwnerKey.secret), undefined when there is none;
   * without it, owner tokens are refused.
   */
  constructor(
    private readonly file: HtpasswdFile,
    private readonly ownerSecret: () => Buffer | undefined = () => undefined,
  ) {
    file.onChange(() => {
      this.keys.clear();
      this.owner = undefined;
    });
  }

  /** A token for the user (undefined: anonymous). */
  issue(user: string | undefined, now = Date.now()): Token {
    const payload = Buffer.from(
      JSON.stringify({ s: user ?? null, e: Math.floor(now / 1000) + TOKEN_TTL_S }),
    ).toString('base64url');
    const key = user === undefined ? undefined : this.key(user);
    const signature = key ? createHmac('sha256', key).update(payload).digest('base64url') : '';
    return {
      token: `${payload}.${signature}`,
      expiresIn: TOKEN_TTL_S,
      issuedAt: new Date(now).toISOString(),
    };
  }

  /**
   * The caller a token stands for (`{user: undefined}` for an anonymous token, `owner` for one of
   * the commands), or undefined when it is not one of ours, is expired, or its user's line (the
   * file, for an owner token) changed. Never throws.
   */
  verify(
    token: string,
    now = Date.now(),
  ): { user: string | undefined; owner?: true; expires: number } | undefined {
    const dot = token.indexOf('.');
    if (dot <= 0) return undefined;
    const payload = token.slice(0, dot);
    let claims: { s?: unknown; e?: unknown; o?: unknown };
    try {
      claims = JSON.parse(Buffer.from(payload, 'base64url').toString('utf8')) as typeof claims;
    } catch {
      return undefined;
    }
    if (typeof claims !== 'object' || claims === null) return undefined;
    if (typeof claims.e !== 'number' || claims.e * 1000 <= now) return undefined;
    if (claims.o === 1) {
      const key = this.ownerKey();
      return key && signed(token, dot, key)
        ? { user: undefined, owner: true, expires: claims.e * 1000 }
        : undefined;
    }
    if (claims.s === null) return { user: undefined, expires: claims.e * 1000 };
    if (typeof claims.s !== 'string') return undefined;
    const key = this.key(claims.s);
    if (!key || !signed(token, dot, key)) return undefined;
    return { user: claims.s, expires: claims.e * 1000 };
  }

  private ownerKey(): Buffer | undefined {
    const secret = this.ownerSecret();
    if (!secret) return undefined;
    if (this.owner?.secret !== secret)
      this.owner = { secret, key: ownerKey(secret, this.file.content) };
    return this.owner.key;
  }

  private key(user: string): Buffer | undefined {
    let key = this.keys.get(user);
    if (key) return key;
    const hash = this.file.hash(user);
    if (hash === undefined) return undefined;
    key = createHash('sha256').update(`pullcache token v1\0${user}\0${hash}`).digest();
    this.keys.set(user, key);
    return key;
  }
}

function signed(token: string, dot: number, key: Buffer): boolean {
  const expected = createHmac('sha256', key).update(token.slice(0, dot)).digest();
  const given = Buffer.from(token.slice(dot + 1), 'base64url');
  return given.length === expected.length && timingSafeEqual(given, expected);
}

function ownerKey(secret: Buffer, htpasswd: string): Buffer {
  return createHmac('sha256', secret).update(`pullcache owner v2\0${htpasswd}`).digest();
}

/**
 * The Authorization header with which a command on `config` (the server's config, on its host)
 * may do everything through a running server's admin API; or, when the htpasswd file or the
 * owner key cannot be read, why not. Never throws.
 */
export function ownerAuthorization(
  config: Pick<Config, 'auth' | 'storage'>,
  now = Date.now(),
): { authorization: string } | { problem: string } {
  let content: string;
  try {
    content = readFileSync(config.auth.htpasswd, 'utf8');
  } catch (err) {
    return { problem: `cannot read ${config.auth.htpasswd}: ${fileProblem(err)}` };
  }
  const path = ownerKeyPath(config);
  const read = readOwnerKey(path);
  if (!read.found)
    return {
      problem: `cannot read the owner key ${path}: ${read.problem}${read.missing ? ' (the server makes it when it starts)' : ''}`,
    };
  const payload = Buffer.from(
    JSON.stringify({ o: 1, e: Math.floor(now / 1000) + TOKEN_TTL_S }),
  ).toString('base64url');
  const signature = createHmac('sha256', ownerKey(read.secret, content))
    .update(payload)
    .digest('base64url');
  return { authorization: `Bearer ${payload}.${signature}` };
}
