/**
 * The status's refused requests with client authentication: the 401 that challenges a client
 * which sent no credentials (every client's first ping, the handshake) is no refusal, so the
 * real ones (wrong credentials, a 403) are not pushed out of the 50 kept.
 */
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import type { Status } from '../../src/status/status.js';
import { basic, htpasswdFile } from '../helpers/htpasswd.js';
import { makeImage, pushImage, type Image } from '../helpers/images.js';
import { startPullcache, type TestPullcache } from '../helpers/pullcache.js';
import { TestRegistry } from '../helpers/registry.js';
import { expectDirHolds, skopeoCopy } from '../helpers/skopeo.js';

describe('refused requests with client authentication and anonymous pulls', () => {
  let registry: TestRegistry;
  let pc: TestPullcache;
  let open: Image;
  let secret: Image;
  const root = basic('root', 'root-pw'); // pulls and administers everything
  const alice = basic('alice', 'alice-pw'); // pulls public/** only, as anonymous callers do

  beforeAll(async () => {
    registry = await TestRegistry.start();
    open = makeImage('public/app', 'v1', 'oci', [1000]);
    secret = makeImage('secret/app', 'v1', 'oci', [1000]);
    for (const image of [open, secret]) await pushImage(registry, image);
    pc = await startPullcache({
      upstreams: { 'docker.io': { url: registry.url } },
      auth: {
        htpasswd: htpasswdFile({ root: 'root-pw', alice: 'alice-pw' }, 4),
        anonymous: true,
        rules: [
          { users: ['root'], actions: ['pull', 'admin'] },
          { users: ['alice', 'anonymous'], repositories: ['public/**'], actions: ['pull'] },
        ],
      },
    });
  });
  afterAll(async () => {
    await pc?.stop();
    await registry?.close();
  });

  const get = (path: string, headers: Record<string, string> = {}) =>
    fetch(`${pc.url}${path}`, { headers: { accept: open.mediaType, ...headers } });

  test('a challenge to a request without credentials is not a refusal; wrong credentials and a 403 are', async () => {
    // The handshake: skopeo pings without credentials (401), takes an anonymous token, pulls.
    const dir = mkdtempSync(join(tmpdir(), 'pullcache-refused-'));
    await skopeoCopy(pc.host, 'public/app:v1', dir);
    expectDirHolds(dir, open);
    expect((await get('/v2/')).status).toBe(401);
    // An anonymous caller asking for what only users get is challenged to authenticate too.
    expect((await get('/v2/secret/app/manifests/v1')).status).toBe(401);

    // Refusals: wrong credentials, a user asking for what she may not pull.
    const wrong = basic('alice', 'not-her-password');
    expect((await get('/v2/', wrong)).status).toBe(401);
    expect((await get('/v2/secret/app/manifests/v1', alice)).status).toBe(403);

    const res = await get('/_pullcache/v1/status', root);
    expect(res.status).toBe(200);
    const { recent } = (await res.json()) as Status;
    expect(recent.refused).toEqual([
      expect.objectContaining({
        path: '/v2/secret/app/manifests/v1',
        status: 403,
        code: 'DENIED',
        count: 1,
      }),
      expect.objectContaining({ path: '/v2/', status: 401, code: 'UNAUTHORIZED', count: 1 }),
    ]);
  });
});
