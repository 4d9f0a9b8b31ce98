/**
 * Repository allow/deny lists per upstream (`upstreams.X.repositories`): a repository outside
 * them is never fetched and never served, whoever asks, on every endpoint, by tag or by digest,
 * cached or not; the catalog, the admin API's images and pins (but to an admin) list none of them;
 * prefetch and import refuse them. Real parts: the
 * upstream registry (behind a recorder that shows it was never asked), skopeo, the real CLI.
 */
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { ownerAuthorization } from '../../src/access/tokens.js';
import { ConfigError, loadConfig } from '../../src/config/load.js';
import { cli, tmp } from '../helpers/cli.js';
import { snapshot } from '../helpers/files.js';
import { basic, htpasswdFile } from '../helpers/htpasswd.js';
import { ociError } from '../helpers/http.js';
import { makeImage, pushImage, type Image } from '../helpers/images.js';
import { startPullcache, type TestPullcache } from '../helpers/pullcache.js';
import { Recorder } from '../helpers/recorder.js';
import { TestRegistry } from '../helpers/registry.js';
import { expectDirHolds, skopeoCopy } from '../helpers/skopeo.js';

const DENY = ['library/private/*'];
const ALLOW = ['library/*', 'org/**'];
const DENIED_BY_DENY =
  'library/private/app: library/private/* is denied on docker.io by upstreams.docker.io.repositories.deny';
const DENIED_BY_ALLOW =
  'team/app: only library/*, org/** are allowed on docker.io by upstreams.docker.io.repositories.allow';

/** A config file for the CLI: docker.io at `url` with the lists (or none), storage at `root`. */
function listsConfig(root: string, url: string, lists: boolean): string {
  const file = join(tmp('config'), 'pullcache.yaml');
  const lines = [
    'storage:',
    '  filesystem:',
    `    root: ${root}`,
    'upstreams:',
    '  docker.io:',
    `    url: ${url}`,
  ];
  if (lists)
    lines.push(
      '    repositories:',
      `      allow: ${JSON.stringify(ALLOW)}`,
      `      deny: ${JSON.stringify(DENY)}`,
    );
  writeFileSync(file, `${lines.join('\n')}\n`);
  return file;
}

async function deniedWith(
  res: Response,
): Promise<{ status: number; code?: string; message?: string }> {
  const text = await res.text();
  if (!text) return { status: res.status };
  const error = (JSON.parse(text) as { errors: { code: string; message: string }[] }).errors[0]!;
  return { status: res.status, code: error.code, message: error.message };
}

describe('repository allow and deny lists', () => {
  let registry: TestRegistry;
  let recorder: Recorder;
  let pc: TestPullcache;
  let alpine: Image;
  let secret: Image;
  let team: Image;
  let deep: Image;
  /** What the upstream was asked about repositories (not the greeting, GET /v2/, at start-up). */
  const asked = () => recorder.requests.filter((r) => r.path !== '/v2/');
  /** Storage where the denied images were cached before the lists were configured. */
  const root = tmp('cache');

  beforeAll(async () => {
    registry = await TestRegistry.start();
    alpine = makeImage('library/alpine', '3.20', 'docker', [20_000]);
    secret = makeImage('library/private/app', 'v1', 'oci', [30_000, 4_000]);
    team = makeImage('team/app', 'v1', 'oci', [6_000]);
    deep = makeImage('org/deep/app', 'v1', 'oci', [7_000]);
    for (const image of [alpine, secret, team, deep]) await pushImage(registry, image);
    recorder = await Recorder.start(registry.url);
    // Cached before the lists existed: a denied repository's content can be in storage.
    const before = await startPullcache(
      { upstreams: { 'docker.io': { url: recorder.url } } },
      root,
    );
    for (const ref of ['library/private/app:v1', 'team/app:v1', 'alpine:3.20'])
      await skopeoCopy(before.host, ref, tmp('pull'));
    await before.stop();
    pc = await startPullcache(
      {
        upstreams: {
          'docker.io': { url: recorder.url, repositories: { allow: ALLOW, deny: DENY } },
          // The same registry under another name, without lists: unaffected by docker.io's.
          'other.test': { url: recorder.url },
          'passthru.test': {
            url: recorder.url,
            mode: 'passthrough',
            repositories: { deny: ['pushed/**'] },
          },
        },
      },
      root,
    );
  });
  afterAll(async () => {
    await pc?.stop();
    await recorder?.close();
    await registry?.close();
  });

  test('a denied repository is 403 DENIED naming the rule on every endpoint, cached or not, and the upstream is never asked', async () => {
    recorder.reset();
    const layer = secret.blobs[1]!.digest;
    // By default routing, by upstream-name prefix, and by containerd's ?ns= (its mirror form).
    const names: [string, string][] = [
      ['library/private/app', ''],
      ['docker.io/library/private/app', ''],
      ['library/private/app', '?ns=docker.io'],
    ];
    for (const [name, query] of names) {
      for (const [method, endpoint] of [
        ['GET', 'manifests/v1'],
        ['HEAD', 'manifests/v1'],
        ['GET', `manifests/${secret.digest}`], // by digest, and cached
        ['HEAD', `manifests/${secret.digest}`],
        ['GET', `blobs/${layer}`], // cached
        ['HEAD', `blobs/${layer}`],
        ['GET', 'tags/list'],
        ['GET', `referrers/${secret.digest}`],
      ] as const) {
        const path = `${name}/${endpoint}${query}`;
        const res = await fetch(`${pc.url}/v2/${path}`, { method });
        const expected =
          method === 'HEAD'
            ? { status: 403 }
            : { status: 403, code: 'DENIED', message: DENIED_BY_DENY };
        expect({ method, path, ...(await deniedWith(res)) }).toEqual({ method, path, ...expected });
      }
    }
    expect(asked()).toEqual([]);
  });

  test('deny wins over allow, and a repository outside a non-empty allow-list is refused naming the list', async () => {
    recorder.reset();
    // library/private/app matches allow's library/* too: deny wins (previous test).
    const res = await fetch(`${pc.url}/v2/team/app/manifests/v1`);
    expect(await deniedWith(res)).toEqual({
      status: 403,
      code: 'DENIED',
      message: DENIED_BY_ALLOW,
    });
    const blob = await fetch(`${pc.url}/v2/team/app/blobs/${team.blobs[1]!.digest}`);
    expect(blob.status).toBe(403);
    expect(await ociError(blob)).toBe('DENIED');
    // "*" stays within one path component: library/* does not allow library/a/b.
    const nested = await fetch(`${pc.url}/v2/library/a/b/manifests/v1`);
    expect(nested.status).toBe(403);
    await nested.arrayBuffer();
    expect(asked()).toEqual([]);
  });

  test('allowed repositories are pulled as before, and another upstream without lists is unaffected', async () => {
    const cached = tmp('pull');
    await skopeoCopy(pc.host, 'alpine:3.20', cached);
    expectDirHolds(cached, alpine);
    const fetched = tmp('pull');
    await skopeoCopy(pc.host, 'org/deep/app:v1', fetched); // org/** crosses path components
    expectDirHolds(fetched, deep);
    const other = tmp('pull');
    await skopeoCopy(pc.host, 'other.test/library/private/app:v1', other);
    expectDirHolds(other, secret);
  });

  test('the catalog lists none of the refused repositories, even when they are cached', async () => {
    const res = await fetch(`${pc.url}/v2/_catalog`);
    const { repositories } = (await res.json()) as { repositories: string[] };
    expect(repositories).toContain('library/alpine');
    expect(repositories).toContain('org/deep/app');
    expect(repositories).toContain('other.test/library/private/app');
    expect(repositories).not.toContain('library/private/app');
    expect(repositories).not.toContain('team/app');
    // They are still in storage: the lists decide what is served, not what is kept.
    expect(await pc.runtime.repositories.listRepositories('docker.io')).toContain(
      'library/private/app',
    );
  });

  test('the admin API lists no image or pin of a refused repository to a caller that may only pull; an admin of the whole cache sees them all', async () => {
    const cache = tmp('cache');
    const before = await startPullcache(
      { upstreams: { 'docker.io': { url: registry.url } } },
      cache,
    );
    for (const ref of ['library/private/app:v1', 'alpine:3.20'])
      await skopeoCopy(before.host, ref, tmp('pull'));
    await before.stop();
    const authed = await startPullcache(
      {
        upstreams: {
          'docker.io': { url: registry.url, repositories: { allow: ALLOW, deny: DENY } },
        },
        // No rules: every user pulls everything the lists serve.
        auth: { htpasswd: htpasswdFile({ alice: 'alice-pw' }) },
      },
      cache,
    );
    try {
      const made = ownerAuthorization(authed.runtime.config);
      if (!('authorization' in made)) throw new Error(made.problem);
      const owner = { authorization: made.authorization };
      const alice = basic('alice', 'alice-pw');
      const pinned = await fetch(`${authed.url}/_pullcache/v1/pins`, {
        method: 'POST',
        headers: { ...owner, 'content-type': 'application/json' },
        body: JSON.stringify({ references: ['library/private/app:v1', 'alpine:3.20'] }),
      });
      expect(pinned.status).toBe(200);
      const get = async (path: string, headers: Record<string, string>) => {
        const res = await fetch(`${authed.url}/_pullcache/v1/${path}`, { headers });
        expect(res.status).toBe(200);
        return (await res.json()) as unknown;
      };
      const references = (images: unknown) =>
        (images as { references: string[] }[]).flatMap((i) => i.references).sort();
      expect(references(await get('images', alice))).toEqual(['docker.io/library/alpine:3.20']);
      expect(await get('pins', alice)).toEqual({ pins: ['alpine:3.20'] });
      const text = JSON.stringify([await get('images', alice), await get('pins', alice)]);
      expect(text).not.toContain('private');
      expect(text).not.toContain(secret.digest);
      // The commands (the owner) manage what storage holds, refused repositories included.
      expect(references(await get('images', owner))).toEqual([
        'docker.io/library/alpine:3.20',
        'docker.io/library/private/app:v1',
      ]);
      expect(((await get('pins', owner)) as { pins: string[] }).pins).toHaveLength(2);
    } finally {
      await authed.stop();
    }
  });

  test("a passthrough upstream's lists refuse before anything is forwarded", async () => {
    recorder.reset();
    for (const method of ['GET', 'PUT']) {
      const res = await fetch(`${pc.url}/v2/passthru.test/pushed/app/manifests/latest`, {
        method,
        ...(method === 'PUT' ? { body: '{}' } : {}),
      });
      expect(res.status).toBe(403);
      expect(await ociError(res)).toBe('DENIED');
    }
    expect(asked()).toEqual([]);
  });

  test('prefetch refuses a denied repository in one line, exit 1, fetching nothing; the others go on', async () => {
    const fresh = tmp('cache');
    const config = listsConfig(fresh, recorder.url, true);
    recorder.reset();
    const denied = await cli('prefetch', '-c', config, 'library/private/app:v1');
    expect(denied.code).toBe(1);
    expect(denied.stderr).toContain(
      `  failed: docker.io/library/private/app:v1: DENIED: ${DENIED_BY_DENY}\n`,
    );
    expect(denied.stderr.match(/DENIED/g)).toHaveLength(1);
    expect(asked()).toEqual([]);
    expect(snapshot(fresh)).toEqual({});
    const mixed = await cli('prefetch', '-c', config, 'alpine:3.20', 'team/app:v1');
    expect(mixed.code).toBe(1);
    expect(mixed.stderr).toContain('1 of 2 images complete');
    expect(mixed.stderr).toContain(`  failed: docker.io/team/app:v1: DENIED: ${DENIED_BY_ALLOW}\n`);
    expect(recorder.count('GET', /\/team\/app\//)).toBe(0);
  });

  test('import refuses a bundle with a denied repository in one line, exit 1, keeping nothing of it', async () => {
    const bundle = join(tmp('bundle'), 'b.tar');
    const exported = await cli(
      'export',
      '-c',
      listsConfig(root, 'http://registry.invalid', false),
      '-o',
      bundle,
      'library/private/app:v1',
      'alpine:3.20',
    );
    expect(exported.code).toBe(0);
    const fresh = tmp('cache');
    const imported = await cli(
      'import',
      '-c',
      listsConfig(fresh, 'http://registry.invalid', true),
      bundle,
    );
    expect(imported.code).toBe(1);
    expect(imported.stderr).toBe(
      `pullcache: ${bundle}: docker.io/library/private/app:v1 is refused: library/private/* is denied on docker.io by upstreams.docker.io.repositories.deny\n`,
    );
    expect(snapshot(fresh)).toEqual({});
  });

  test('the lists come from the file and the environment, and a bad glob stops start-up naming its key', () => {
    const config = loadConfig({
      env: {
        PULLCACHE_UPSTREAMS_DOCKER_IO_REPOSITORIES_DENY: 'library/private/*,secret/**',
      },
    });
    expect(config.upstreams['docker.io']!.repositories).toEqual({
      allow: [],
      deny: ['library/private/*', 'secret/**'],
    });
    let problems: string[] = [];
    try {
      loadConfig({ env: { PULLCACHE_UPSTREAMS_DOCKER_IO_REPOSITORIES_ALLOW: 'Library/*' } });
    } catch (err) {
      if (!(err instanceof ConfigError)) throw err;
      problems = err.problems;
    }
    expect(problems).toEqual([
      'upstreams.docker.io.repositories.allow.0: expected a glob on repository names like "library/*" (lower case, no spaces), got "Library/*"',
    ]);
  });
});
