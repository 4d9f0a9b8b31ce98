/**
 * Real clients logging in to pullcache with client authentication on (an htpasswd file written
 * by `htpasswd -B`), over plain HTTP as an insecure registry: skopeo with `--creds`, `podman
 * login` then `podman pull`, `docker login` then `docker pull` through a private Docker Engine.
 * Each is refused without credentials, with wrong ones, and where the rules refuse the user.
 */
import { execFile } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { networkInterfaces, tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { TestDockerd, trustRegistryCa } from '../helpers/dockerd.js';
import { htpasswdFile } from '../helpers/htpasswd.js';
import { makeImage, pushImage, type Image } from '../helpers/images.js';
import { startPullcache, type TestPullcache } from '../helpers/pullcache.js';
import { TestRegistry } from '../helpers/registry.js';
import { expectDirHolds, skopeo } from '../helpers/skopeo.js';
import { TestCa } from '../helpers/tls.js';

const run = promisify(execFile);

describe('clients log in to pullcache', () => {
  let registry: TestRegistry;
  let pc: TestPullcache;
  let app: Image;
  let alpine: Image;
  let work: string;

  beforeAll(async () => {
    registry = await TestRegistry.start();
    app = makeImage('team/app', 'v1', 'docker', [200_000, 30_000]);
    alpine = makeImage('library/alpine', '3.20', 'oci', [50_000]);
    await pushImage(registry, app);
    await pushImage(registry, alpine);
    pc = await startPullcache({
      upstreams: { 'docker.io': { url: registry.url } },
      auth: {
        htpasswd: htpasswdFile({ alice: 'alice-pw', bob: 'bob-pw' }),
        anonymous: true,
        rules: [
          { users: ['alice'], actions: ['pull'] },
          { users: ['*', 'anonymous'], repositories: ['library/*'], actions: ['pull'] },
        ],
      },
    });
    work = mkdtempSync(join(tmpdir(), 'pullcache-login-'));
  });
  afterAll(async () => {
    await pc?.stop();
    await registry?.close();
    if (work) rmSync(work, { recursive: true, force: true });
  });

  const dest = () => mkdtempSync(join(work, 'dir-'));

  test('skopeo copies with --creds, and is refused without them, with a wrong password, or where the rules refuse', async () => {
    const out = dest();
    await skopeo(
      'copy',
      '--src-tls-verify=false',
      '--src-creds',
      'alice:alice-pw',
      `docker://${pc.host}/team/app:v1`,
      `dir:${out}`,
    );
    expectDirHolds(out, app);
    const refused = (...creds: string[]) =>
      skopeo(
        'copy',
        '--src-tls-verify=false',
        ...creds,
        `docker://${pc.host}/team/app:v1`,
        `dir:${dest()}`,
      );
    await expect(refused()).rejects.toThrow(/authentication required|unauthorized/i);
    await expect(refused('--src-creds', 'alice:wrong')).rejects.toThrow(
      /invalid username or password|unauthorized/i,
    );
    await expect(refused('--src-creds', 'bob:bob-pw')).rejects.toThrow(/denied/i);
    // Without credentials, what the rules give anonymous callers.
    const anonymous = dest();
    await skopeo(
      'copy',
      '--src-tls-verify=false',
      `docker://${pc.host}/library/alpine:3.20`,
      `dir:${anonymous}`,
    );
    expectDirHolds(anonymous, alpine);
  });

  test('podman login, then podman pull; a wrong password is refused at login', async () => {
    const dir = mkdtempSync('/tmp/pcp-');
    writeFileSync(join(dir, 'auth.json'), '{}'); // its own, not the host's credentials
    const podman = (...args: string[]) =>
      run(
        'podman',
        [
          '--root',
          join(dir, 'root'),
          '--runroot',
          join(dir, 'run'),
          '--storage-driver',
          'vfs',
          ...args,
        ],
        { timeout: 120_000, env: { ...process.env, REGISTRY_AUTH_FILE: join(dir, 'auth.json') } },
      ).catch((err: { stderr?: string; message: string }) => {
        throw new Error(`podman ${args.join(' ')} failed: ${err.stderr || err.message}`);
      });
    try {
      await expect(
        podman('login', '--tls-verify=false', '-u', 'alice', '-p', 'wrong', pc.host),
      ).rejects.toThrow(/invalid username\/password|unauthorized/i);
      await expect(podman('pull', '--tls-verify=false', `${pc.host}/team/app:v1`)).rejects.toThrow(
        /unauthorized|authentication required/i,
      );
      await podman('login', '--tls-verify=false', '-u', 'alice', '-p', 'alice-pw', pc.host);
      await podman('pull', '--tls-verify=false', `${pc.host}/team/app:v1`);
      const { stdout } = await podman(
        'image',
        'inspect',
        '--format',
        '{{.Digest}}',
        `${pc.host}/team/app:v1`,
      );
      expect(stdout.trim()).toBe(app.digest);
    } finally {
      await podman('rmi', '--all', '--force').catch(() => {});
      rmSync(dir, { recursive: true, force: true });
    }
  });

  describe('docker', () => {
    let dockerd: TestDockerd;

    beforeAll(async () => {
      dockerd = await TestDockerd.start({
        daemonConfig: { 'registry-mirrors': [pc.url], 'insecure-registries': [pc.host] },
      });
    });
    afterAll(async () => {
      await dockerd?.stop();
    });

    test('docker login, then docker pull by pullcache name; a wrong password fails the login, a refused repository the pull', async () => {
      await expect(dockerd.docker('login', '-u', 'alice', '-p', 'wrong', pc.host)).rejects.toThrow(
        /unauthorized|invalid username or password/i,
      );
      await expect(dockerd.docker('pull', `${pc.host}/team/app:v1`)).rejects.toThrow(
        /unauthorized|authentication required|no basic auth credentials/i,
      );
      await dockerd.docker('login', '-u', 'alice', '-p', 'alice-pw', pc.host);
      await dockerd.docker('pull', `${pc.host}/team/app:v1`);
      const id = await dockerd.docker(
        'image',
        'inspect',
        '--format',
        '{{.Id}}',
        `${pc.host}/team/app:v1`,
      );
      expect(id.trim()).toBe(app.blobs[0]!.digest);

      await dockerd.docker('logout', pc.host);
      await dockerd.docker('login', '-u', 'bob', '-p', 'bob-pw', pc.host);
      await expect(dockerd.docker('pull', `${pc.host}/team/app:v1`)).rejects.toThrow(/denied/i);
    });

    test('containerd (ctr) pulls through pullcache as a docker.io mirror with a hosts.toml header, and with its own credentials by pullcache name', async () => {
      // The containerd that dockerd runs, with a hosts directory of our own.
      const address = join(dockerd.dir, 'exec', 'containerd', 'containerd.sock');
      const hosts = mkdtempSync(join(work, 'hosts-'));
      const ctr = (...args: string[]) =>
        run('ctr', ['--address', address, '--namespace', 'pullcache-test', ...args], {
          timeout: 120_000,
        }).catch((err: { stderr?: string; message: string }) => {
          throw new Error(`ctr ${args.join(' ')} failed: ${err.stderr || err.message}`);
        });
      const mirror = (authorization: string) => {
        mkdirSync(join(hosts, 'docker.io'), { recursive: true });
        writeFileSync(
          join(hosts, 'docker.io', 'hosts.toml'),
          [
            'server = "https://registry-1.docker.io"',
            `[host."${pc.url}"]`,
            '  capabilities = ["pull", "resolve"]',
            `  header = { authorization = "${authorization}" }`,
            '',
          ].join('\n'),
        );
      };
      const alice = `Basic ${Buffer.from('alice:alice-pw').toString('base64')}`;
      mirror(alice);
      // The docker.io name goes to pullcache (with ?ns=docker.io); Docker Hub cannot be reached.
      await ctr('image', 'pull', '--hosts-dir', hosts, 'docker.io/team/app:v1');
      const listed = await ctr('image', 'ls', '-q');
      expect(listed.stdout).toContain('docker.io/team/app:v1');
      mirror(`Basic ${Buffer.from('alice:wrong').toString('base64')}`);
      await expect(
        ctr('image', 'pull', '--hosts-dir', hosts, 'docker.io/team/app:v1'),
      ).rejects.toThrow(/401|unauthorized/i);
      // By pullcache's own name, with ctr's credentials (the token flow).
      const direct = `${pc.host}/team/app:v1`;
      await ctr('image', 'pull', '--plain-http', '--user', 'alice:alice-pw', direct);
      await expect(ctr('image', 'pull', '--plain-http', direct)).rejects.toThrow(
        /401|unauthorized/i,
      );
      await ctr('image', 'rm', 'docker.io/team/app:v1', direct).catch(() => {});
    });

    test('docker pulls a Docker Hub name through pullcache as a mirror, anonymously, where the rules allow it', async () => {
      await dockerd.docker('pull', 'alpine:3.20');
      const digests = await dockerd.docker(
        'image',
        'inspect',
        '--format',
        '{{json .RepoDigests}}',
        'alpine:3.20',
      );
      expect(JSON.parse(digests)).toContain(`alpine@${alpine.digest}`);
    });
  });
});

describe('docker login over HTTPS', () => {
  let registry: TestRegistry;
  let ca: TestCa;
  let pc: TestPullcache;
  let untrust: (() => void) | undefined;
  let dockerd: TestDockerd;
  let app: Image;

  beforeAll(async () => {
    registry = await TestRegistry.start();
    app = makeImage('team/app', 'v1', 'oci', [40_000]);
    await pushImage(registry, app);
    ca = TestCa.create();
    // Not 127.0.0.1: dockerd takes loopback for an insecure registry and verifies nothing there.
    const address = Object.values(networkInterfaces())
      .flat()
      .find((a) => a && a.family === 'IPv4' && !a.internal)?.address;
    if (!address) throw new Error('needs a non-loopback IPv4 address of this host');
    pc = await startPullcache(
      {
        server: { listen: `${address}:0` },
        upstreams: { 'docker.io': { url: registry.url } },
        auth: { htpasswd: htpasswdFile({ alice: 'alice-pw' }) },
      },
      undefined,
      { tls: ca.issue({ names: [address] }) },
    );
    untrust = trustRegistryCa(pc.host, ca.pem);
    dockerd = await TestDockerd.start();
  });
  afterAll(async () => {
    await dockerd?.stop();
    untrust?.();
    await pc?.stop();
    await ca?.remove();
    await registry?.close();
  });

  test('docker login and pull by pullcache name over HTTPS, the token realm on https:// too', async () => {
    expect(pc.url).toMatch(/^https:\/\//);
    const challenge = await ca.fetch(`${pc.url}/v2/`);
    expect(challenge.headers.get('www-authenticate')).toBe(
      `Bearer realm="${pc.url}/_pullcache/token",service="pullcache"`,
    );
    await expect(dockerd.docker('login', '-u', 'alice', '-p', 'wrong', pc.host)).rejects.toThrow(
      /unauthorized|invalid username or password/i,
    );
    await dockerd.docker('login', '-u', 'alice', '-p', 'alice-pw', pc.host);
    await dockerd.docker('pull', `${pc.host}/team/app:v1`);
    const digests = await dockerd.docker(
      'image',
      'inspect',
      '--format',
      '{{json .RepoDigests}}',
      `${pc.host}/team/app:v1`,
    );
    expect(JSON.parse(digests)).toContain(`${pc.host}/team/app@${app.digest}`);
  });
});
