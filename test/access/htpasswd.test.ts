/**
 * The htpasswd file as users keep it: written and changed by the real `htpasswd -B` while
 * pullcache runs, a malformed line among good ones, the file read mid-write, emptied, going
 * missing or unreadable, and a missing file at start-up. Plus what the request logs say of who
 * asked.
 */
import { mkdirSync, rmSync, writeFileSync, readFileSync, appendFileSync } from 'node:fs';
import bcrypt from 'bcryptjs';
import { afterAll, beforeAll, describe, expect, test, vi } from 'vitest';
import { HtpasswdFile, standInHash } from '../../src/access/htpasswd.js';
import { cli, tmp } from '../helpers/cli.js';
import { basic, htpasswdDelete, htpasswdFile, htpasswdSet } from '../helpers/htpasswd.js';
import { rawRequest } from '../helpers/http.js';
import { makeImage, pushImage, type Image } from '../helpers/images.js';
import { waitFor } from '../helpers/net.js';
import { capturedLog, startPullcache, type TestPullcache } from '../helpers/pullcache.js';
import { TestRegistry } from '../helpers/registry.js';
import { join } from 'node:path';

describe('the htpasswd file', () => {
  let registry: TestRegistry;
  let image: Image;

  beforeAll(async () => {
    registry = await TestRegistry.start();
    image = makeImage('library/alpine', '3.20', 'oci', [1000]);
    await pushImage(registry, image);
  });
  afterAll(async () => {
    await registry?.close();
  });

  const status = async (pc: TestPullcache, headers: Record<string, string>) =>
    (await rawRequest(pc.url, 'GET', '/v2/alpine/manifests/3.20', headers)).status;

  test('changed by htpasswd while pullcache runs: a new user works, a removed one is refused, a new password replaces the old, without a restart', async () => {
    const file = htpasswdFile({ alice: 'alice-pw', bob: 'bob-pw' });
    const { log, lines } = capturedLog('info');
    const pc = await startPullcache(
      { upstreams: { 'docker.io': { url: registry.url } }, auth: { htpasswd: file } },
      undefined,
      { log },
    );
    try {
      expect(await status(pc, basic('alice', 'alice-pw'))).toBe(200);
      expect(await status(pc, basic('bob', 'bob-pw'))).toBe(200);
      expect(await status(pc, basic('carol', 'carol-pw'))).toBe(401);
      // A token of pullcache's realm, as docker and podman use after logging in.
      const issued = await rawRequest(pc.url, 'GET', '/_pullcache/token', basic('bob', 'bob-pw'));
      const bobToken = {
        authorization: `Bearer ${(JSON.parse(issued.body.toString()) as { token: string }).token}`,
      };
      expect(await status(pc, bobToken)).toBe(200);

      htpasswdSet(file, 'carol', 'carol-pw');
      htpasswdDelete(file, 'bob');
      await waitFor(async () => (await status(pc, basic('carol', 'carol-pw'))) === 200, 'carol');
      // bob was verified (and remembered) before: the change forgets that.
      expect(await status(pc, basic('bob', 'bob-pw'))).toBe(401);
      expect(await status(pc, bobToken)).toBe(401); // his tokens end with him
      expect(await status(pc, basic('alice', 'alice-pw'))).toBe(200);

      htpasswdSet(file, 'alice', 'new-pw');
      await waitFor(async () => (await status(pc, basic('alice', 'new-pw'))) === 200, 'new pw');
      expect(await status(pc, basic('alice', 'alice-pw'))).toBe(401);
      expect(lines.filter((l) => l.msg === 'htpasswd file reloaded').length).toBeGreaterThanOrEqual(
        2,
      );
    } finally {
      await pc.stop();
    }
  });

  test('a malformed line is logged with its line number and the rest of the file is used', async () => {
    const file = htpasswdFile({ alice: 'alice-pw', bob: 'bob-pw' });
    const [alice, bob] = readFileSync(file, 'utf8').trim().split('\n');
    writeFileSync(
      file,
      [
        '# team accounts',
        '',
        'broken-line-without-colon',
        alice,
        'md5user:$apr1$abc$0123456789012345678901',
        `:$2y$05$${'a'.repeat(53)}`,
        `${bob}\r`,
        `alice:$2y$05$${'b'.repeat(53)}`,
        '',
      ].join('\n'),
    );
    const { log, lines } = capturedLog('info');
    const pc = await startPullcache(
      { upstreams: { 'docker.io': { url: registry.url } }, auth: { htpasswd: file } },
      undefined,
      { log },
    );
    try {
      expect(await status(pc, basic('alice', 'alice-pw'))).toBe(200);
      expect(await status(pc, basic('bob', 'bob-pw'))).toBe(200);
      const skipped = lines.filter((l) => l.msg === 'htpasswd line skipped');
      expect(skipped.map((l) => [l.line, l.reason])).toEqual([
        [3, 'expected user:hash'],
        [5, 'not a bcrypt hash (MD5 and SHA1 are too weak): write it with htpasswd -B'],
        [6, 'empty user name'],
        [8, 'user "alice" again; the first line counts'],
      ]);
      expect(skipped.every((l) => l.level === 40 && l.htpasswd === file)).toBe(true);
    } finally {
      await pc.stop();
    }
  });

  test('the last user removed by htpasswd -D: their logins and tokens end within two looks, no restart', async () => {
    const file = htpasswdFile({ alice: 'alice-pw' });
    const { log, lines } = capturedLog('info');
    const pc = await startPullcache(
      {
        upstreams: { 'docker.io': { url: registry.url } },
        auth: { htpasswd: file, anonymous: true, rules: [{ users: ['*'], actions: ['pull'] }] },
      },
      undefined,
      { log },
    );
    try {
      expect(await status(pc, basic('alice', 'alice-pw'))).toBe(200);
      const issued = await rawRequest(
        pc.url,
        'GET',
        '/_pullcache/token',
        basic('alice', 'alice-pw'),
      );
      const token = {
        authorization: `Bearer ${(JSON.parse(issued.body.toString()) as { token: string }).token}`,
      };
      htpasswdDelete(file, 'alice');
      expect(readFileSync(file, 'utf8').trim()).toBe('');
      await waitFor(async () => (await status(pc, basic('alice', 'alice-pw'))) === 401, 'refused');
      expect(await status(pc, token)).toBe(401);
      expect(
        lines.some((l) => l.msg === 'htpasswd file has no valid entry; nobody can log in'),
      ).toBe(true);
    } finally {
      await pc.stop();
    }
  });

  test('a version without a valid entry is taken only when the next look finds it unchanged; one that cannot be read is never', async () => {
    const file = htpasswdFile({ alice: 'alice-pw' });
    const good = readFileSync(file, 'utf8');
    const { log, lines } = capturedLog('info');
    // Looked at when the test says (check), not by the timer.
    const h = new HtpasswdFile(file, log, { pollInterval: 1e9 });
    let changes = 0;
    h.onChange(() => changes++);
    const kept = () =>
      lines.filter((l) => l.msg === 'htpasswd file not usable; keeping the last good version');
    try {
      // Read between htpasswd's truncation and its write: kept, and the write then taken.
      writeFileSync(file, '');
      await h.check();
      expect(h.hash('alice')).toBeDefined();
      expect(kept().at(-1)).toMatchObject({ level: 40, reason: 'no valid entry', users: 1 });
      writeFileSync(file, `# team\n${good}`);
      await h.check();
      await h.check();
      expect(h.hash('alice')).toBeDefined();

      // Comments only, seen twice: that is the file. Nobody can log in.
      writeFileSync(file, '# nobody for now\n');
      await h.check();
      expect(h.hash('alice')).toBeDefined();
      await h.check();
      expect(h.hash('alice')).toBeUndefined();
      expect(h.content).toBe('# nobody for now\n');
      const before = changes;
      await h.check(); // unchanged since: nothing more happens
      expect(changes).toBe(before);

      // Removed, for two looks: no one either; back, taken again.
      writeFileSync(file, good);
      await h.check();
      expect(h.hash('alice')).toBeDefined();
      rmSync(file);
      await h.check();
      expect(h.hash('alice')).toBeDefined();
      expect(kept().at(-1)).toMatchObject({ reason: 'no such file (ENOENT)' });
      await h.check();
      expect(h.hash('alice')).toBeUndefined();
      writeFileSync(file, good);
      await h.check();
      expect(h.hash('alice')).toBeDefined();

      // Something that cannot be read says nothing of the users: the last good version stays,
      // the problem logged once.
      rmSync(file);
      mkdirSync(file);
      const logged = kept().length;
      for (let i = 0; i < 3; i++) await h.check();
      expect(h.hash('alice')).toBeDefined();
      expect(
        kept()
          .slice(logged)
          .map((l) => l.reason),
      ).toEqual(['it is a directory (EISDIR)']);
      rmSync(file, { recursive: true });
    } finally {
      h.close();
    }
  });

  test("an unknown user's password is checked against a hash of the file's cost, as a known user's is", async () => {
    // htpasswd -B writes cost 5: a fixed cost-10 stand-in took 32 times the work to refuse an
    // unknown name as a wrong password, which told the names that exist.
    const file = htpasswdFile({ alice: 'alice-pw', bob: 'bob-pw' }, 5);
    const pc = await startPullcache({
      upstreams: { 'docker.io': { url: registry.url } },
      auth: { htpasswd: file },
    });
    const compare = vi.spyOn(bcrypt, 'compare');
    try {
      expect(await status(pc, basic('alice', 'wrong-pw'))).toBe(401);
      expect(await status(pc, basic('mallory', 'alice-pw'))).toBe(401);
      const hashes = compare.mock.calls.map((call) => String(call[1]));
      expect(hashes).toHaveLength(2);
      expect(hashes[0]).toMatch(/^\$2y\$05\$/);
      expect(hashes[1]).toMatch(/^\$2[aby]\$05\$.{53}$/);
      // The file at another cost: the stand-in follows it.
      htpasswdSet(file, 'alice', 'alice-pw', 7);
      htpasswdSet(file, 'bob', 'new-pw', 7);
      await waitFor(async () => (await status(pc, basic('bob', 'new-pw'))) === 200, 'cost 7');
      compare.mockClear();
      expect(await status(pc, basic('mallory', 'other-pw'))).toBe(401);
      expect(String(compare.mock.calls[0]![1])).toMatch(/^\$2[aby]\$07\$/);
    } finally {
      compare.mockRestore();
      await pc.stop();
    }
  });

  test('the stand-in hash has the cost most of the users have, and matches no password', async () => {
    const hash = (cost: number) => `$2y$${String(cost).padStart(2, '0')}$${'a'.repeat(53)}`;
    const users = (...costs: number[]) => new Map(costs.map((c, i) => [`u${i}`, hash(c)]));
    const cost = (h: string) => /^\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}$/.exec(h)?.[1];
    expect(cost(standInHash(users(5)))).toBe('05');
    expect(cost(standInHash(users(5, 12, 5)))).toBe('05');
    expect(cost(standInHash(users(5, 12)))).toBe('12'); // equals: the higher
    expect(cost(standInHash(users()))).toBe('10');
    expect(cost(standInHash(users(2)))).toBe('04'); // bcrypt's least
    const standIn = standInHash(users(4));
    expect(standIn).not.toBe(standInHash(users(4)));
    for (const password of ['', 'alice-pw', 'a'.repeat(72)])
      expect(await bcrypt.compare(password, standIn)).toBe(false);
  });

  test('a missing htpasswd file stops start-up with exit code 2 naming auth.htpasswd', async () => {
    const dir = tmp('auth');
    const config = join(dir, 'pullcache.yaml');
    const missing = join(dir, 'no-such-htpasswd');
    writeFileSync(
      config,
      `server:\n  listen: 127.0.0.1:0\nstorage:\n  filesystem:\n    root: ${join(dir, 'data')}\nauth:\n  htpasswd: ${missing}\n`,
    );
    const res = await cli('serve', '--config', config);
    expect(res.code).toBe(2);
    expect(res.stderr).toContain(`auth.htpasswd: cannot read "${missing}": no such file (ENOENT)`);
  });

  test('rules or anonymous without an htpasswd file, and a rule naming an unknown upstream, are configuration errors', async () => {
    const dir = tmp('auth');
    const config = join(dir, 'pullcache.yaml');
    writeFileSync(
      config,
      'auth:\n  anonymous: true\n  rules:\n    - users: ["*"]\n      upstreams: ["docker.io", "nowhere.test"]\n      actions: ["pull"]\n',
    );
    const res = await cli('config', '--config', config);
    expect(res.code).toBe(2);
    expect(res.stderr).toContain(
      'auth.htpasswd: auth.anonymous and auth.rules need an htpasswd file',
    );
    expect(res.stderr).toContain(
      'auth.rules.0.upstreams.1: expected one of the configured upstreams (docker.io), got "nowhere.test"',
    );
    appendFileSync(config, 'server:\n  trustProxy: maybe\n');
    expect((await cli('config', '--config', config)).stderr).toContain(
      'server.trustProxy: expected boolean',
    );
  });

  test('request logs name the user, the client address and the user agent, and never the credentials', async () => {
    const file = htpasswdFile({ alice: 'alice-pw' });
    const { log, lines } = capturedLog('debug');
    const upstreams = { 'docker.io': { url: registry.url } };
    const pc = await startPullcache({ upstreams, auth: { htpasswd: file } }, undefined, { log });
    const behind = await startPullcache(
      { upstreams, auth: { htpasswd: file }, server: { trustProxy: true } },
      undefined,
      { log },
    );
    try {
      const alice = { ...basic('alice', 'alice-pw'), 'user-agent': 'docker/28.0 go/go1.24' };
      const forwarded = { 'x-forwarded-for': '203.0.113.9, 198.51.100.7' };
      // The manifest fast path and express (a blob), each with and without a trusted proxy.
      for (const [pc2, headers] of [
        [pc, { ...alice, ...forwarded }],
        [behind, { ...alice, ...forwarded }],
      ] as const) {
        expect(
          (await rawRequest(pc2.url, 'GET', '/v2/alpine/manifests/3.20', headers)).status,
        ).toBe(200);
        expect(
          (await rawRequest(pc2.url, 'GET', `/v2/alpine/blobs/${image.blobs[1]!.digest}`, headers))
            .status,
        ).toBe(200);
      }
      await rawRequest(pc.url, 'GET', '/v2/alpine/manifests/3.20', basic('alice', 'wrong-pw'));
      await rawRequest(pc.url, 'GET', '/v2/', basic('alice', 'wrong-pw'));
      await rawRequest(pc.url, 'GET', '/v2/', { authorization: 'Bearer some.secret.token' });
      await new Promise((r) => setTimeout(r, 100));
      const requests = lines.filter((l) => l.msg === 'request');
      const shown = requests
        .filter((l) => l.user === 'alice')
        .map((l) => [(l.req as { url: string }).url.split('/')[3], l.client, l.userAgent]);
      expect(shown).toEqual([
        ['manifests', '127.0.0.1', 'docker/28.0 go/go1.24'],
        ['blobs', '127.0.0.1', 'docker/28.0 go/go1.24'],
        ['manifests', '198.51.100.7', 'docker/28.0 go/go1.24'],
        ['blobs', '198.51.100.7', 'docker/28.0 go/go1.24'],
      ]);
      const refused = requests.filter((l) => (l.res as { statusCode: number }).statusCode === 401);
      expect(refused).toHaveLength(3);
      expect(refused.every((l) => l.user === undefined && l.errorCode === 'UNAUTHORIZED')).toBe(
        true,
      );
      const everything = lines.map((l) => JSON.stringify(l)).join('\n');
      for (const secret of [
        'alice-pw',
        'wrong-pw',
        Buffer.from('alice:alice-pw').toString('base64'),
        Buffer.from('alice:wrong-pw').toString('base64'),
        'some.secret.token',
      ])
        expect(everything).not.toContain(secret);
    } finally {
      await pc.stop();
      await behind.stop();
      rmSync(file, { force: true });
    }
  });
});
