/**
 * Tokens of pullcache's realm, on a real htpasswd file: what they stand for, when they end, and
 * that one made from another file is not taken. Owner tokens (the commands') need the owner key
 * of the storage: a file without users is no secret.
 */
import { createHash, createHmac } from 'node:crypto';
import { mkdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, test } from 'vitest';
import { HtpasswdFile } from '../../src/access/htpasswd.js';
import { OwnerKey, ownerKeyPath } from '../../src/access/owner-key.js';
import { ownerAuthorization, TOKEN_TTL_S, TokenService } from '../../src/access/tokens.js';
import { parseConfig } from '../../src/config/load.js';
import { silentLogger } from '../../src/log/logger.js';
import { tmp } from '../helpers/cli.js';
import { htpasswdFile } from '../helpers/htpasswd.js';
import { capturedLog, startPullcache, type TestPullcache } from '../helpers/pullcache.js';
import { TestRegistry } from '../helpers/registry.js';

describe('tokens', () => {
  const open: HtpasswdFile[] = [];
  const service = (path: string, ownerSecret?: () => Buffer | undefined) => {
    const file = new HtpasswdFile(path, silentLogger());
    open.push(file);
    return new TokenService(file, ownerSecret);
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

  test('an owner token (the commands) needs the owner key of the storage and the same htpasswd file', () => {
    const path = htpasswdFile({ alice: 'alice-pw' });
    const root = tmp('root');
    const key = new OwnerKey(ownerKeyPath(config(path, root)), silentLogger());
    const a = service(path, () => key.secret());
    const token = owner(config(path, root));
    expect(a.verify(token)).toMatchObject({ owner: true, user: undefined });
    // The server made the key, 0600; a command on the same storage reads it.
    expect(statSync(key.path).mode & 0o777).toBe(0o600);
    // Another storage's key, another htpasswd file, or no owner key at the server: refused.
    const other = tmp('other-root');
    new OwnerKey(ownerKeyPath(config(path, other)), silentLogger());
    expect(a.verify(owner(config(path, other)))).toBeUndefined();
    const otherFile = htpasswdFile({ alice: 'alice-pw' });
    expect(service(otherFile, () => key.secret()).verify(token)).toBeUndefined();
    expect(service(path).verify(token)).toBeUndefined();
    // A command that cannot read one of the two says which.
    expect(ownerAuthorization(config('/nonexistent/htpasswd', root))).toEqual({
      problem: 'cannot read /nonexistent/htpasswd: no such file (ENOENT)',
    });
    expect(ownerAuthorization(config(path, tmp('none')))).toMatchObject({
      problem: expect.stringMatching(/owner\.key: no such file \(ENOENT\) \(the server makes it/),
    });
  });

  test('without a readable owner key every owner token is refused, and a key file is never replaced', () => {
    const path = htpasswdFile({ alice: 'alice-pw' });
    const root = tmp('root');
    const keyPath = ownerKeyPath(config(path, root));
    mkdirSync(dirname(keyPath), { recursive: true });
    writeFileSync(keyPath, 'not a key\n');
    const { log, lines } = capturedLog('warn');
    const key = new OwnerKey(keyPath, log);
    const a = service(path, () => key.secret());
    expect(key.secret()).toBeUndefined();
    expect(readFileSync(keyPath, 'utf8')).toBe('not a key\n');
    expect(lines.filter((l) => /owner key unusable/.test(String(l.msg)))).toHaveLength(1);
    // Whatever a caller signs with: the file's text, or nothing at all.
    for (const secret of [Buffer.from('not a key\n'), Buffer.alloc(32)])
      expect(a.verify(signedOwnerToken(secret, readFileSync(path, 'utf8')))).toBeUndefined();
    // A directory where the key should be: nothing to read, nothing made.
    rmSync(keyPath);
    mkdirSync(keyPath);
    expect(key.secret()).toBeUndefined();
    // Removed: made anew (ending the owner tokens of the old key).
    rmSync(keyPath, { recursive: true });
    expect(key.secret()).toHaveLength(32);
    expect(a.verify(owner(config(path, root)))).toMatchObject({ owner: true });
  });
});

describe('owner tokens at a server whose htpasswd file has no user', () => {
  let registry: TestRegistry;
  let pc: TestPullcache;
  let htpasswd: string;

  beforeAll(async () => {
    registry = await TestRegistry.start();
    htpasswd = join(tmp('htpasswd'), 'htpasswd');
    // No user: anonymous callers only, as the rules say. The file's text is public knowledge.
    writeFileSync(htpasswd, '# nobody logs in here\n');
    pc = await startPullcache({
      upstreams: { 'docker.io': { url: registry.url } },
      auth: {
        htpasswd,
        anonymous: true,
        rules: [{ users: ['anonymous'], actions: ['pull'] }],
      },
    });
  });
  afterAll(async () => {
    await pc?.stop();
    await registry?.close();
  });

  const gc = (authorization?: string) =>
    fetch(`${pc.url}/_pullcache/v1/gc`, {
      method: 'POST',
      headers: {
        'content-type': 'application/json',
        ...(authorization ? { authorization } : {}),
      },
      body: '{"dryRun":true}',
    });

  test('a token keyed by the file alone is refused: it would make anyone the owner', async () => {
    const text = readFileSync(htpasswd, 'utf8');
    // What the owner key was before: a hash of the file's text, which anyone can work out.
    const forged = createHash('sha256').update(`pullcache owner v1\0${text}`).digest();
    const res = await gc(`Bearer ${signedOwnerToken(forged, undefined)}`);
    expect(res.status).toBe(401);
    expect(await gc()).toHaveProperty('status', 401);
    // The commands on the same config and storage are the owner.
    const made = ownerAuthorization(config(htpasswd, pc.root));
    expect(made).toHaveProperty('authorization');
    expect((await gc((made as { authorization: string }).authorization)).status).toBe(200);
  });
});

/** The parts of a config that owner tokens are made from. */
function config(htpasswd: string, root: string) {
  return parseConfig({ auth: { htpasswd }, storage: { filesystem: { root } } });
}

/** The token of the Authorization header `ownerAuthorization` makes. */
function owner(c: ReturnType<typeof config>): string {
  const made = ownerAuthorization(c);
  if (!('authorization' in made)) throw new Error(made.problem);
  return made.authorization.slice('Bearer '.length);
}

/** An owner token signed with `key`, or with a key made from it and `text` as pullcache does. */
function signedOwnerToken(key: Buffer, text: string | undefined): string {
  const payload = Buffer.from(
    JSON.stringify({ o: 1, e: Math.floor(Date.now() / 1000) + 300 }),
  ).toString('base64url');
  const k =
    text === undefined
      ? key
      : createHmac('sha256', key).update(`pullcache owner v2\0${text}`).digest();
  return `${payload}.${createHmac('sha256', k).update(payload).digest('base64url')}`;
}
