import { execFile } from 'node:child_process';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { describe, expect, test } from 'vitest';
import { ConfigError, loadConfig, parseConfig, redactConfig } from '../../src/config/load.js';

const run = promisify(execFile);

function problems(fn: () => unknown): string[] {
  try {
    fn();
  } catch (err) {
    if (err instanceof ConfigError) return err.problems;
    throw err;
  }
  return [];
}

function yamlFile(text: string): string {
  const file = join(mkdtempSync(join(tmpdir(), 'pullcache-config-')), 'config.yaml');
  writeFileSync(file, text);
  return file;
}

describe('config', () => {
  test('config/default.yaml is valid and says exactly what the schema defaults are', () => {
    expect(loadConfig({ file: 'config/default.yaml', env: {} })).toEqual(parseConfig({}));
  });

  test('the documented shape is accepted as is', () => {
    const file = yamlFile(`
server:
  listen: 127.0.0.1:5000
storage:
  driver: filesystem
  filesystem:
    root: ./data
cache:
  store: memory
  redis:
    url: redis://127.0.0.1:6379
upstreams:
  docker.io:
    url: https://registry-1.docker.io
    username: someone
    password: secret
    tagTTL: 5m
routing:
  default: docker.io
log:
  level: info
`);
    const config = loadConfig({ file, env: {} });
    expect(config.upstreams['docker.io']!.tagTTL).toBe(300_000);
    expect(config.upstreams['docker.io']!.password).toBe('secret');
  });

  test('sources: defaults < file < environment < flags', () => {
    const file = yamlFile(
      'server:\n  listen: 127.0.0.1:6000\nlog:\n  level: warn\ncache:\n  store: redis\n',
    );
    const config = loadConfig({
      file,
      env: {
        PULLCACHE_SERVER_LISTEN: '0.0.0.0:7000',
        PULLCACHE_LOG_LEVEL: 'debug',
        PULLCACHE_UPSTREAMS_DOCKER_IO_TAGTTL: '10m',
      },
      overrides: { log: { level: 'error' } },
    });
    expect(config.server.listen).toBe('0.0.0.0:7000');
    expect(config.log.level).toBe('error');
    expect(config.cache.store).toBe('redis');
    expect(config.upstreams['docker.io']!.tagTTL).toBe(600_000);
    expect(config.upstreams['docker.io']!.url).toBe('https://registry-1.docker.io');
  });

  test('environment names follow the key paths, upstream names included', () => {
    const file = yamlFile(
      'upstreams:\n  ghcr.io:\n    url: https://ghcr.io\n  registry.local:5000:\n    url: http://registry.local:5000\n',
    );
    const config = loadConfig({
      file,
      env: {
        PULLCACHE_UPSTREAMS_GHCR_IO_PASSWORDENV: 'GHCR_TOKEN',
        PULLCACHE_UPSTREAMS_GHCR_IO_USERNAME: 'me',
        PULLCACHE_UPSTREAMS_REGISTRY_LOCAL_5000_OFFLINE: 'true',
        PULLCACHE_UPSTREAMS_GHCR_IO_AUTHREALMS: 'https://a.example/token, https://b.example/',
        PULLCACHE_STORAGE_DELETE_ENABLED: 'true',
      },
    });
    expect(config.upstreams['ghcr.io']!.passwordEnv).toBe('GHCR_TOKEN');
    expect(config.upstreams['ghcr.io']!.authRealms).toEqual([
      'https://a.example/token',
      'https://b.example/',
    ]);
    expect(config.upstreams['registry.local:5000']!.offline).toBe(true);
    expect(config.storage.delete.enabled).toBe(true);
    expect(config.routing.default).toBeUndefined();
  });

  test('every problem is one line naming its key path; unknown keys are errors', () => {
    const file = yamlFile(`
server:
  listen: 127.0.0.1:notaport
  listn: x
cache:
  store: mem
upstreams:
  docker.io:
    url: ftp://x
    tagTTL: 5 minutes
`);
    expect(problems(() => loadConfig({ file, env: { PULLCACHE_SERVR_LISTEN: 'x' } }))).toEqual([
      'PULLCACHE_SERVR_LISTEN: names no config key',
      'server.listen: expected host:port, got "127.0.0.1:notaport"',
      'server.listn: unknown key',
      'cache.store: expected one of "memory", "redis", got "mem"',
      'upstreams.docker.io.url: expected an http(s) URL without credentials or query, got "ftp://x"',
      'upstreams.docker.io.tagTTL: expected a duration like "30s" or "5m", got "5 minutes"',
    ]);
  });

  test('checks across keys name their key path too', () => {
    const file = yamlFile(
      'upstreams:\n  docker.io:\n    url: https://x\n    password: p\nrouting:\n  default: quay.io\n',
    );
    expect(problems(() => loadConfig({ file, env: {} }))).toEqual([
      'routing.default: expected one of the configured upstreams (docker.io), got "quay.io"',
      'upstreams.docker.io.username: a password needs a username',
    ]);
  });

  test('a file that is not YAML, or missing, is one clear line', () => {
    expect(problems(() => loadConfig({ file: yamlFile('server: [\n'), env: {} }))[0]).toMatch(
      /invalid YAML/,
    );
    expect(problems(() => loadConfig({ file: '/nonexistent/pullcache.yaml', env: {} }))[0]).toMatch(
      /cannot read config file \(ENOENT\)/,
    );
  });

  test('secrets are redacted', () => {
    const config = parseConfig({
      upstreams: { 'docker.io': { url: 'https://x', username: 'u', password: 'hunter2' } },
      cache: { redis: { url: 'redis://:pw@host:6379' } },
    });
    const shown = JSON.stringify(redactConfig(config));
    expect(shown).not.toContain('hunter2');
    expect(shown).not.toContain(':pw@');
  });

  test('the CLI exits 2 with one line per problem and no stack trace', async () => {
    const err = (await run(
      'npx',
      ['tsx', 'src/cli.ts', 'config', '--listen', '127.0.0.1:notaport'],
      { env: { ...process.env } },
    ).catch((e: unknown) => e)) as {
      code: number;
      stderr: string;
    };
    expect(err.code).toBe(2);
    expect(err.stderr).toContain('server.listen: expected host:port, got "127.0.0.1:notaport"');
    expect(err.stderr).not.toMatch(/\n\s+at /);
  });

  test('pullcache config prints the effective config with secrets redacted', async () => {
    const { stdout } = await run('npx', ['tsx', 'src/cli.ts', 'config'], {
      env: {
        ...process.env,
        PULLCACHE_UPSTREAMS_DOCKER_IO_USERNAME: 'me',
        PULLCACHE_UPSTREAMS_DOCKER_IO_PASSWORD: 'hunter2',
      },
    });
    expect(stdout).toContain('username: me');
    expect(stdout).toContain('[redacted]');
    expect(stdout).not.toContain('hunter2');
  });
});
