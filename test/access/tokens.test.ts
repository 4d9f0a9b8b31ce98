/**
 * Tokens of pullcache's realm, on a real htpasswd file: what they stand for, when they end, and
 * that one made from another file is not taken.
 */
import { afterEach, describe, expect, test } from 'vitest';
import { HtpasswdFile } from '../../src/access/htpasswd.js';
import { ownerAuthorization, TOKEN_TTL_S, TokenService } from '../../src/access/tokens.js';
import { silentLogger } from '../../src/log/logger.js';
import { htpasswdFile } from '../helpers/htpasswd.js';

describe('tokens', () => {
  const open: HtpasswdFile[] = [];
  const service = (path: string) => {
    const file = new HtpasswdFile(path, silentLogger());
    open.push(file);
    return new TokenService(file);
  };
  afterEach(() => {
    for (const f of open.splice(0)) f.close();
  });

  test('a token stands for its user until it expires, at every server reading the same file', () => {
    const path = htpasswdFile({ alice: 'alice-pw' });
    const a = service(path);
    const now = Date.now();
    const { token, expiresIn } = a.issue('alice', now);
    expect(expiresIn).toBe(TOKEN_TTL_S);
    expect(a.verify(token, now)).toEqual({ user: 'alice', expires: expect.any(Number) as number });
    expect(service(path).verify(token, now)?.user).toBe('alice'); // a replica, or after a restart
    expect(a.verify(token, now + TOKEN_TTL_S * 1000 + 1000)).toBeUndefined();
    // The same user name in another file (another password) is another key.
    expect(service(htpasswdFile({ alice: 'alice-pw' })).verify(token, now)).toBeUndefined();
  });

  test('an anonymous token says nobody; a token of an unknown user or tampered with is nothing', () => {
    const a = service(htpasswdFile({ alice: 'alice-pw' }));
    expect(a.verify(a.issue(undefined).token)?.user).toBeUndefined();
    expect(a.verify(a.issue(undefined).token)).not.toBeUndefined();
    expect(a.verify(a.issue('nobody').token)).toBeUndefined();
    const [payload, signature] = a.issue('alice').token.split('.');
    const claims = JSON.parse(Buffer.from(payload!, 'base64url').toString()) as { e: number };
    const longer = Buffer.from(JSON.stringify({ s: 'alice', e: claims.e + 3600 })).toString(
      'base64url',
    );
    expect(a.verify(`${longer}.${signature}`)).toBeUndefined();
    expect(a.verify('not a token')).toBeUndefined();
  });

  test('an owner token (the commands) is made from the whole file and taken only with that file', () => {
    const path = htpasswdFile({ alice: 'alice-pw' });
    const other = htpasswdFile({ alice: 'alice-pw' });
    const a = service(path);
    const token = ownerAuthorization(path)!.slice('Bearer '.length);
    expect(a.verify(token)).toMatchObject({ owner: true, user: undefined });
    expect(a.verify(ownerAuthorization(other)!.slice('Bearer '.length))).toBeUndefined();
    expect(ownerAuthorization('/nonexistent/htpasswd')).toBeUndefined();
  });
});
