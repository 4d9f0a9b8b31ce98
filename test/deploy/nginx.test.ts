/**
 * deploy/nginx/pullcache.conf run by the real nginx: `nginx -t` on the file as shipped (only its
 * certificate paths pointed at a test certificate), then the same file serving, in front of a
 * real pullcache, with its replicas and its port replaced by the test's own.
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { freePort, waitFor } from '../helpers/net.js';
import { startPullcache, type TestPullcache } from '../helpers/pullcache.js';
import { TestCa, type TestCertificate } from '../helpers/tls.js';

const run = promisify(execFile);
const NGINX = 'deploy/nginx/pullcache.conf';
const shipped = readFileSync(NGINX, 'utf8');

/** An nginx.conf whose http block includes `site`, everything nginx writes under `dir`. */
function wrapper(dir: string, site: string): string {
  const conf = join(dir, 'nginx.conf');
  writeFileSync(
    conf,
    [
      `pid ${join(dir, 'nginx.pid')};`,
      `error_log ${join(dir, 'error.log')} warn;`,
      'events {}',
      'http {',
      '  access_log off;',
      ...['client_body', 'proxy', 'fastcgi', 'uwsgi', 'scgi'].map(
        (t) => `  ${t}_temp_path ${join(dir, t)};`,
      ),
      `  include ${site};`,
      '}',
      '',
    ].join('\n'),
  );
  return conf;
}

/** The shipped site with its certificate paths pointed at `cert`. */
function withCertificate(text: string, cert: TestCertificate): string {
  const replaced = text
    .replace(/^(\s*ssl_certificate)\s+\S+;/m, `$1 ${cert.certPath};`)
    .replace(/^(\s*ssl_certificate_key)\s+\S+;/m, `$1 ${cert.keyPath};`);
  expect(replaced).not.toBe(text);
  return replaced;
}

describe(NGINX, () => {
  let dir: string;
  let ca: TestCa;
  let cert: TestCertificate;

  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), 'pullcache-nginx-'));
    ca = TestCa.create();
    cert = ca.issue();
  });
  afterAll(async () => {
    await ca.remove();
    rmSync(dir, { recursive: true, force: true });
  });

  test('is a valid http-block configuration for nginx -t', async () => {
    const site = join(dir, 'shipped.conf');
    writeFileSync(site, withCertificate(shipped, cert));
    const { stderr } = await run('nginx', ['-t', '-c', wrapper(dir, site), '-p', dir]);
    expect(stderr).toContain('test is successful');
    // Nothing nginx warns of either (a directive it ignores, a duplicate).
    expect(stderr.split('\n').filter((l) => /\[(warn|emerg)\]/.test(l))).toEqual([]);
  });

  describe('serving in front of a pullcache', () => {
    let pullcache: TestPullcache;
    let nginx: ChildProcess | undefined;
    let base: string;

    beforeAll(async () => {
      pullcache = await startPullcache({
        server: { trustProxy: true },
        upstreams: { 'docker.io': { url: 'http://127.0.0.1:9', offline: true } },
      });
      const port = await freePort();
      base = `https://127.0.0.1:${port}`;
      // The three replicas become the one pullcache; the public port a free one on loopback.
      const servers = [...shipped.matchAll(/^(\s*)server (\d+\.\d+\.\d+\.\d+:\d+)(.*)$/gm)];
      expect(servers.length).toBeGreaterThanOrEqual(2);
      let site = withCertificate(shipped, cert)
        .replace(/^\s*server \d+\.\d+\.\d+\.\d+:\d+.*\n/gm, '')
        .replace(
          /^(\s*)keepalive /m,
          `$1server ${pullcache.address}${servers[0]![3]}\n$1keepalive `,
        )
        .replace(/^(\s*)listen 443 ssl;/m, `$1listen 127.0.0.1:${port} ssl;`);
      expect(site).toContain(`listen 127.0.0.1:${port} ssl;`);
      site = site.replace(/\r/g, '');
      const file = join(dir, 'serving.conf');
      writeFileSync(file, site);
      const conf = wrapper(dir, file);
      nginx = spawn('nginx', ['-c', conf, '-p', dir, '-g', 'daemon off;'], { stdio: 'ignore' });
      await waitFor(async () => (await ca.fetch(`${base}/v2/`)).ok, 'nginx in front of pullcache');
    });
    afterAll(async () => {
      const n = nginx;
      if (n && n.exitCode === null && n.signalCode === null) {
        await new Promise((resolve) => {
          n.once('exit', resolve);
          n.kill('SIGQUIT');
        });
      }
      await pullcache?.stop();
    });

    test("passes the registry API through, pullcache's own headers included", async () => {
      const res = await ca.fetch(`${base}/v2/`);
      expect(res.status).toBe(200);
      expect(res.headers.get('docker-distribution-api-version')).toBe('registry/2.0');
      await res.arrayBuffer();
      const ready = await ca.fetch(`${base}/readyz`);
      expect(ready.status).toBe(200);
      await ready.arrayBuffer();
    });

    test('refuses the peer endpoint however the path is spelled', async () => {
      const digest = `sha256:${'a'.repeat(64)}`;
      for (const path of [
        `/_pullcache/v1/peer/blobs/${digest}`,
        `/_PullCache/V1/Peer/blobs/${digest}`,
        `/_pullcache/v1/%70eer/blobs/${digest}`,
        `//_pullcache/v1/peer/blobs/${digest}`,
      ]) {
        const res = await ca.fetch(`${base}${path}`);
        expect(res.status, path).toBe(403);
        expect(res.headers.get('server'), path).toMatch(/^nginx/);
        await res.arrayBuffer();
      }
    });
  });
});
