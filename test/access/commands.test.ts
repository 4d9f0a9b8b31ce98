/**
 * `pullcache pin | ls | gc` beside a running server with client authentication: the commands go
 * through its admin API, proving themselves with an owner token (made from the owner key the
 * server keeps in storage and the config's htpasswd file), where no rule gives anyone the admin
 * action. A command on another htpasswd file, or without the owner key, is refused.
 */
import { copyFileSync, mkdtempSync, renameSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { cli, tmp } from '../helpers/cli.js';
import { basic, htpasswdFile, htpasswdSet } from '../helpers/htpasswd.js';
import { rawRequest } from '../helpers/http.js';
import { makeImage, pushImage } from '../helpers/images.js';
import { startPullcache, type TestPullcache } from '../helpers/pullcache.js';
import { TestRegistry } from '../helpers/registry.js';

describe('the commands beside a server with client authentication', () => {
  let registry: TestRegistry;
  let pc: TestPullcache;
  let htpasswd: string;
  let root: string;

  const configWith = (file: string) => {
    const config = join(tmp('config'), 'pullcache.yaml');
    writeFileSync(
      config,
      [
        'storage:',
        '  filesystem:',
        `    root: ${root}`,
        'upstreams:',
        '  docker.io:',
        `    url: ${registry.url}`,
        'auth:',
        `  htpasswd: ${file}`,
        '',
      ].join('\n'),
    );
    return config;
  };

  beforeAll(async () => {
    registry = await TestRegistry.start();
    await pushImage(registry, makeImage('org/a', 'v1', 'oci', [2000]));
    htpasswd = htpasswdFile({ alice: 'alice-pw' });
    root = mkdtempSync(join(tmpdir(), 'pullcache-data-'));
    pc = await startPullcache(
      { upstreams: { 'docker.io': { url: registry.url } }, auth: { htpasswd } },
      root,
    );
    const pulled = await rawRequest(pc.url, 'GET', '/v2/org/a/manifests/v1', {
      ...basic('alice', 'alice-pw'),
      accept: 'application/vnd.oci.image.manifest.v1+json',
    });
    expect(pulled.status).toBe(200);
  });
  afterAll(async () => {
    await pc?.stop();
    await registry?.close();
  });

  test("pin, ls and gc work through the server with the config's htpasswd file, though no rule gives anyone admin", async () => {
    const config = configWith(htpasswd);
    const pin = await cli('pin', '-c', config, 'org/a:v1');
    expect({ code: pin.code, stderr: pin.stderr }).toEqual({ code: 0, stderr: '' });
    const ls = JSON.parse((await cli('ls', '-c', config, '--json')).stdout.toString()) as {
      references: string[];
      pinned: boolean;
    }[];
    expect(ls).toMatchObject([{ references: ['docker.io/org/a:v1'], pinned: true }]);
    expect((await cli('gc', '-c', config, '--dry-run')).code).toBe(0);
    const status = await cli('status', '-c', config, '--json');
    expect({ code: status.code, stderr: status.stderr }).toEqual({ code: 0, stderr: '' });
    expect(JSON.parse(status.stdout.toString())).toMatchObject({ viewer: { admin: true } });
    // alice, by the API, may not (no rules: nobody administers).
    const post = await fetch(`${pc.url}/_pullcache/v1/gc`, {
      method: 'POST',
      headers: { ...basic('alice', 'alice-pw'), 'content-type': 'application/json' },
      body: '{"dryRun":true}',
    });
    expect(post.status).toBe(403);
  });

  test('a command whose htpasswd file is another is refused by the server', async () => {
    const other = join(tmp('other'), 'htpasswd');
    copyFileSync(htpasswd, other);
    htpasswdSet(other, 'mallory', 'mallory-pw');
    const res = await cli('unpin', '-c', configWith(other), 'org/a:v1');
    expect(res.code).toBe(1);
    expect(res.stderr).toMatch(/invalid or expired token/);
  });

  test('a command that cannot read the owner key in storage is refused, and says why', async () => {
    const key = join(root, 'lifecycle', 'owner.key');
    expect(statSync(key).mode & 0o777).toBe(0o600);
    renameSync(key, `${key}.aside`);
    try {
      const res = await cli('unpin', '-c', configWith(htpasswd), 'org/a:v1');
      expect(res.code).toBe(1);
      expect(res.stderr).toContain(
        `answered 401: authentication required (no owner token: cannot read the owner key ${key}: no such file (ENOENT)`,
      );
    } finally {
      renameSync(`${key}.aside`, key);
    }
    expect((await cli('unpin', '-c', configWith(htpasswd), 'org/a:v1')).code).toBe(0);
  });
});
