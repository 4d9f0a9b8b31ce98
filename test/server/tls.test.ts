/**
 * HTTPS (server.tls): what is served and refused, a renewed certificate picked up without a
 * restart, start-up refusing files it cannot use, and this host's own callers (the commands
 * through the owner record, bin/healthcheck) speaking HTTPS to the server. Certificates come
 * from a test CA made with openssl (test/helpers/tls.ts); skopeo checks them as a client would.
 */
import { execFile } from 'node:child_process';
import {
  copyFileSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  renameSync,
  rmSync,
  symlinkSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import tls from 'node:tls';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { ConfigError, parseConfig } from '../../src/config/load.js';
import { cli } from '../helpers/cli.js';
import { makeImage, pushImage, type Image } from '../helpers/images.js';
import { waitFor } from '../helpers/net.js';
import { capturedLog, startPullcache, type TestPullcache } from '../helpers/pullcache.js';
import { TestRegistry } from '../helpers/registry.js';
import { expectDirHolds, skopeo } from '../helpers/skopeo.js';
import { handshake, TestCa, type TestCertificate } from '../helpers/tls.js';

let ca: TestCa;
let registry: TestRegistry;
let image: Image;
const defaultMinVersion = tls.DEFAULT_MIN_VERSION;

beforeAll(async () => {
  // Node's own default already refuses TLS 1.0 and 1.1; lowered here, so that what refuses them
  // in these tests is pullcache's setting, not the default of the process it runs in.
  tls.DEFAULT_MIN_VERSION = 'TLSv1';
  ca = TestCa.create();
  registry = await TestRegistry.start();
  image = makeImage('library/tls-fixture', 'v1', 'oci', [70_000, 3_000]);
  await pushImage(registry, image);
});
afterAll(async () => {
  tls.DEFAULT_MIN_VERSION = defaultMinVersion;
  await registry?.close();
  await ca?.remove();
});

const upstreams = () => ({ 'docker.io': { url: registry.url } });

/** Replaces `to` with `from` at once (a rename), as a renewal that writes a new file does. */
function replaceFile(from: string, to: string): void {
  const next = `${to}.new`;
  copyFileSync(from, next);
  renameSync(next, to);
}

describe('serving HTTPS', () => {
  let cert: TestCertificate;
  let pc: TestPullcache;

  beforeAll(async () => {
    cert = ca.issue();
    pc = await startPullcache({ upstreams: upstreams() }, undefined, { tls: cert });
  });
  afterAll(async () => {
    await pc?.stop();
  });

  test('serves the registry API over HTTPS with the configured certificate', async () => {
    expect(pc.url).toBe(`https://${pc.address}`);
    expect((await handshake(pc.address, { ca: ca.pem })).serial).toBe(cert.serial);
    const res = await ca.fetch(`${pc.url}/v2/`);
    expect(res.status).toBe(200);
    expect(await res.json()).toEqual({});
  });

  test('plain HTTP to the HTTPS port gets no answer', async () => {
    await expect(fetch(`http://${pc.address}/v2/`)).rejects.toThrow();
  });

  test('TLS 1.0 and 1.1 are refused with a protocol_version alert; TLS 1.2 and 1.3 are served', async () => {
    for (const version of ['TLSv1', 'TLSv1.1'] as const) {
      await expect(handshake(pc.address, { ca: ca.pem, version })).rejects.toMatchObject({
        code: 'ERR_SSL_TLSV1_ALERT_PROTOCOL_VERSION',
      });
    }
    for (const version of ['TLSv1.2', 'TLSv1.3'] as const) {
      expect(await handshake(pc.address, { ca: ca.pem, version })).toEqual({
        protocol: version,
        serial: cert.serial,
      });
    }
  });

  test('skopeo pulls through HTTPS, verifying the certificate against the CA in --src-cert-dir', async () => {
    const dest = mkdtempSync(join(tmpdir(), 'pullcache-tls-skopeo-'));
    try {
      await skopeo(
        'copy',
        '--src-cert-dir',
        ca.certDir(),
        `docker://${pc.host}/${image.repository}:${image.tag}`,
        `dir:${dest}`,
      );
      expectDirHolds(dest, image);
    } finally {
      rmSync(dest, { recursive: true, force: true });
    }
  });
});

describe('a renewed certificate', () => {
  let dir: string;
  let pc: TestPullcache;
  let log: ReturnType<typeof capturedLog>;
  /** The configured files; the serial of the pair in them. */
  let files: { certPath: string; keyPath: string };
  let serial: string;

  const servedSerial = async () => (await handshake(pc.address, { ca: ca.pem })).serial;
  const logged = (msg: string, match: Record<string, unknown> = {}) =>
    log.lines.filter((l) => l.msg === msg && Object.entries(match).every(([k, v]) => l[k] === v));

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), 'pullcache-tls-renew-'));
    const first = ca.issue({ dir });
    files = first;
    serial = first.serial;
    log = capturedLog('info');
    pc = await startPullcache(
      {
        upstreams: upstreams(),
        server: { tls: { cert: files.certPath, key: files.keyPath, reloadInterval: '100ms' } },
      },
      undefined,
      { log: log.log },
    );
  });
  afterAll(async () => {
    await pc?.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  test('is served to new connections without a restart, still TLS 1.2+ only', async () => {
    expect(await servedSerial()).toBe(serial);
    const renewed = ca.issue();
    replaceFile(renewed.keyPath, files.keyPath);
    replaceFile(renewed.certPath, files.certPath);

    await waitFor(async () => (await servedSerial()) === renewed.serial, 'the renewed serial');
    expect((await ca.fetch(`${pc.url}/v2/`)).status).toBe(200);
    expect(
      logged('TLS certificate reloaded').map((l) => String(l.serial).replace(/^0+/, '')),
    ).toContain(renewed.serial);
    await expect(handshake(pc.address, { ca: ca.pem, version: 'TLSv1.1' })).rejects.toMatchObject({
      code: 'ERR_SSL_TLSV1_ALERT_PROTOCOL_VERSION',
    });
    serial = renewed.serial;
  });

  test('a key of another certificate or a half-written file keeps the served one, with a warning', async () => {
    const next = ca.issue();
    // The certificate is renewed first, the key a moment later.
    replaceFile(next.certPath, files.certPath);
    await waitFor(
      async () =>
        logged('TLS files changed but cannot be used; serving the previous ones', {
          key: 'server.tls.key',
        }).length > 0,
      'the warning for a mismatched pair',
    );
    expect(await servedSerial()).toBe(serial);

    // A certificate file caught in the middle of being written.
    writeFileSync(files.certPath, next.pem.slice(0, next.pem.length / 2));
    await waitFor(
      async () =>
        logged('TLS files changed but cannot be used; serving the previous ones', {
          key: 'server.tls.cert',
        }).length > 0,
      'the warning for a half-written certificate',
    );
    expect(await servedSerial()).toBe(serial);
    expect((await ca.fetch(`${pc.url}/v2/`)).status).toBe(200);

    // The renewal completes: both files of the new pair.
    writeFileSync(files.certPath, next.pem);
    replaceFile(next.keyPath, files.keyPath);
    await waitFor(async () => (await servedSerial()) === next.serial, 'the renewed serial');
  });

  test('a Kubernetes secret volume renewal (a symlinked directory swapped) is picked up', async () => {
    // As the kubelet lays a secret out: tls.crt -> ..data/tls.crt, ..data -> ..<timestamp>.
    const volume = mkdtempSync(join(tmpdir(), 'pullcache-tls-volume-'));
    const version = (name: string, cert: TestCertificate) => {
      mkdirSync(join(volume, name));
      copyFileSync(cert.certPath, join(volume, name, 'tls.crt'));
      copyFileSync(cert.keyPath, join(volume, name, 'tls.key'));
      symlinkSync(name, join(volume, '..data_tmp'));
      renameSync(join(volume, '..data_tmp'), join(volume, '..data'));
    };
    const first = ca.issue();
    version('..2024_01_01', first);
    symlinkSync('..data/tls.crt', join(volume, 'tls.crt'));
    symlinkSync('..data/tls.key', join(volume, 'tls.key'));
    const k8s = await startPullcache({
      upstreams: upstreams(),
      server: {
        tls: {
          cert: join(volume, 'tls.crt'),
          key: join(volume, 'tls.key'),
          reloadInterval: '100ms',
        },
      },
    });
    try {
      expect((await handshake(k8s.address, { ca: ca.pem })).serial).toBe(first.serial);
      const second = ca.issue();
      version('..2024_03_01', second);
      await waitFor(
        async () => (await handshake(k8s.address, { ca: ca.pem })).serial === second.serial,
        'the swapped-in serial',
      );
    } finally {
      await k8s.stop();
      rmSync(volume, { recursive: true, force: true });
    }
  });
});

describe('start-up refuses TLS files it cannot use (exit code 2, naming the key)', () => {
  let good: TestCertificate;
  let other: TestCertificate;
  let dir: string;

  beforeAll(() => {
    good = ca.issue();
    other = ca.issue();
    dir = mkdtempSync(join(tmpdir(), 'pullcache-tls-startup-'));
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  /** `pullcache serve` with these server.tls keys; resolves when it exits. */
  function serve(tlsKeys: Record<string, string>) {
    const file = join(mkdtempSync(join(dir, 'c-')), 'pullcache.yaml');
    writeFileSync(
      file,
      [
        'server:',
        '  listen: 127.0.0.1:0',
        '  tls:',
        ...Object.entries(tlsKeys).map(([k, v]) => `    ${k}: ${JSON.stringify(v)}`),
        'storage:',
        '  filesystem:',
        `    root: ${join(dir, 'data')}`,
        'upstreams:',
        '  docker.io:',
        `    url: ${registry.url}`,
        '',
      ].join('\n'),
    );
    return cli('serve', '--config', file);
  }

  test('a missing key file', async () => {
    const missing = join(dir, 'missing.key');
    const out = await serve({ cert: good.certPath, key: missing });
    expect(out.code).toBe(2);
    expect(out.stderr.trim()).toBe(
      `pullcache: cannot start: server.tls.key: cannot read ${JSON.stringify(missing)}: no such file (ENOENT)`,
    );
  });

  test('a key that belongs to another certificate', async () => {
    const out = await serve({ cert: good.certPath, key: other.keyPath });
    expect(out.code).toBe(2);
    expect(out.stderr).toMatch(
      /^pullcache: cannot start: server\.tls\.key: the key in ".*" does not match the first certificate in ".*" \(server\.tls\.cert: the server's own comes first, then its chain\)$/m,
    );
  });

  test('a certificate file that holds no certificate', async () => {
    const out = await serve({ cert: good.keyPath, key: good.keyPath });
    expect(out.code).toBe(2);
    expect(out.stderr).toContain(`server.tls.cert: no PEM certificate in "${good.keyPath}"`);
  });

  test('a certificate without a key', async () => {
    const out = await serve({ cert: good.certPath });
    expect(out.code).toBe(2);
    expect(out.stderr).toContain('pullcache: invalid configuration');
    expect(out.stderr).toContain(
      'server.tls.key: expected a path: server.tls.cert is set, and HTTPS needs both',
    );
  });
});

test('the config names the missing half of the pair, and a reload interval too short', () => {
  const problems = (tlsKeys: Record<string, string>) => {
    try {
      parseConfig({ server: { tls: tlsKeys } });
      return [];
    } catch (err) {
      return (err as ConfigError).problems;
    }
  };
  expect(problems({ key: '/k.pem' })).toEqual([
    'server.tls.cert: expected a path: server.tls.key is set, and HTTPS needs both',
  ]);
  expect(problems({ cert: '/c.pem', key: '/k.pem', reloadInterval: '10ms' })).toEqual([
    'server.tls.reloadInterval: expected a duration of 100ms or more',
  ]);
  expect(problems({})).toEqual([]);
});

describe("this host's callers speak HTTPS to the server", () => {
  let cert: TestCertificate;
  let pc: TestPullcache;
  let root: string;

  beforeAll(async () => {
    cert = ca.issue();
    root = mkdtempSync(join(tmpdir(), 'pullcache-tls-own-'));
    pc = await startPullcache({ upstreams: upstreams() }, root, { tls: cert });
    const res = await ca.fetch(`${pc.url}/v2/${image.repository}/manifests/${image.tag}`, {
      headers: { accept: image.mediaType },
    });
    expect(res.status).toBe(200);
    await res.arrayBuffer();
  });
  afterAll(async () => {
    await pc?.stop();
    rmSync(root, { recursive: true, force: true });
  });

  /** The server's config as a file, with another certificate if given. */
  function configWith(certificate: TestCertificate): string {
    const file = join(mkdtempSync(join(root, '..', 'pullcache-tls-cfg-')), 'pullcache.yaml');
    writeFileSync(
      file,
      [
        'server:',
        `  listen: ${pc.address}`,
        '  tls:',
        `    cert: ${certificate.certPath}`,
        `    key: ${certificate.keyPath}`,
        'storage:',
        '  filesystem:',
        `    root: ${root}`,
        'upstreams:',
        '  docker.io:',
        `    url: ${registry.url}`,
        'log:',
        '  level: warn',
        '',
      ].join('\n'),
    );
    return file;
  }

  test('the server records an https URL for the commands, and `ls` goes through it', async () => {
    const record = JSON.parse(readFileSync(join(root, 'lifecycle', 'owner.json'), 'utf8')) as {
      url: string;
    };
    expect(record.url).toBe(`https://${pc.address}`);
    const ls = await cli('ls', '--config', configWith(cert), '--json');
    expect(ls.stderr).toBe('');
    expect(ls.code).toBe(0);
    expect(
      (JSON.parse(ls.stdout.toString()) as { references: string[] }[]).map((i) => i.references),
    ).toEqual([[`docker.io/${image.repository}:${image.tag}`]]);
  });

  test('a command trusts only the configured certificate, not any other of the same CA', async () => {
    const impostor = ca.issue(); // valid for 127.0.0.1 too, signed by the same CA
    const ls = await cli('ls', '--config', configWith(impostor));
    expect(ls.code).toBe(1);
    expect(ls.stderr).toContain(
      `the server managing this storage (https://${pc.address}) does not answer: the server presents another certificate`,
    );
  });

  test('bin/healthcheck checks /readyz over HTTPS', async () => {
    const run = (config: string) =>
      new Promise<{ code: number; stdout: string; stderr: string }>((resolve) =>
        execFile(
          'bin/healthcheck',
          { env: { PATH: process.env.PATH ?? '', PULLCACHE_CONFIG: config }, timeout: 10_000 },
          (err, stdout, stderr) =>
            resolve({ code: err ? Number(err.code ?? -1) : 0, stdout, stderr }),
        ),
      );
    expect(await run(configWith(cert))).toEqual({
      code: 0,
      stdout: `ready: https://${pc.address}/readyz\n`,
      stderr: '',
    });
    const impostor = await run(configWith(ca.issue()));
    expect(impostor.code).toBe(1);
    expect(impostor.stderr).toMatch(
      new RegExp(
        `^unhealthy: https://${pc.address}/readyz: the server presents another certificate`,
      ),
    );
  });
});
