import { execFile } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { describe, expect, test } from 'vitest';
import { loadConfig, parseConfig } from '../../src/config/load.js';
import { redactConfig } from '../../src/config/print.js';
import { configShape, type KeyTree } from '../../src/config/shape.js';
import { problems, yamlFile } from '../helpers/config.js';

const run = promisify(execFile);

describe('config', () => {
  test('config/default.yaml is valid and says exactly what the schema defaults are', () => {
    expect(loadConfig({ file: 'config/default.yaml', env: {} })).toEqual(parseConfig({}));
  });

  test('config/default.yaml documents every key of the schema, commented out or set', () => {
    const text = readFileSync('config/default.yaml', 'utf8');
    const undocumented: string[] = [];
    const walk = (tree: KeyTree, path: string[]): void => {
      if (tree.kind === 'record') return walk(tree.item, [...path, '<name>']);
      if (tree.kind === 'leaf') {
        const key = path[path.length - 1]!;
        if (!new RegExp(`^\\s*(#\\s*)?${key}:`, 'm').test(text)) undocumented.push(path.join('.'));
        return;
      }
      for (const [key, sub] of tree.children) walk(sub, [...path, key]);
    };
    walk(configShape(), []);
    expect(undocumented).toEqual([]);
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
        GHCR_TOKEN: 'stand-in',
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

  test('replicas: advertise needs a peer secret and Redis; a secret is given one way', () => {
    const up = { 'docker.io': { url: 'https://x' } };
    expect(
      problems(() => parseConfig({ upstreams: up, server: { advertise: 'http://10.0.0.5:5000' } })),
    ).toEqual([
      'server.peerSecret: server.advertise needs a peerSecret (or peerSecretEnv) shared by the replicas',
      'server.advertise: server.advertise needs cache.store: redis (the replicas take their leases there)',
    ]);
    expect(
      problems(() =>
        parseConfig({
          upstreams: up,
          server: { advertise: 'http://10.0.0.5:5000/', peerSecret: 's', peerSecretEnv: 'S' },
          cache: { store: 'redis' },
        }),
      ),
    ).toEqual(['server.peerSecret: give peerSecret or peerSecretEnv, not both']);
    expect(
      problems(() => parseConfig({ upstreams: up, server: { advertise: '10.0.0.5:5000' } }))[0],
    ).toMatch(/^server\.advertise: expected "" or an http\(s\) URL/);
    const ok = parseConfig({
      upstreams: up,
      server: { advertise: 'http://10.0.0.5:5000/', peerSecret: 'hunter2' },
      cache: { store: 'redis' },
    });
    expect(ok.server.advertise).toBe('http://10.0.0.5:5000');
    expect(JSON.stringify(redactConfig(ok))).not.toContain('hunter2');
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

  test('an upstream url ending in /v2/ or /v2 is taken without it', () => {
    const config = parseConfig({
      upstreams: {
        'a.example': { url: 'https://a.example/v2/' },
        'b.example': { url: 'http://b.example:5000/v2' },
        'c.example': { url: 'https://c.example/mirror/v2/' },
        'd.example': { url: 'https://d.example/v2x' },
      },
    });
    expect(config.upstreams['a.example']!.url).toBe('https://a.example');
    expect(config.upstreams['b.example']!.url).toBe('http://b.example:5000');
    expect(config.upstreams['c.example']!.url).toBe('https://c.example/mirror');
    expect(config.upstreams['d.example']!.url).toBe('https://d.example/v2x');
  });

  test('a config without upstreams is refused naming upstreams', () => {
    expect(problems(() => loadConfig({ file: yamlFile('upstreams: {}\n'), env: {} }))).toEqual([
      'upstreams: expected at least one upstream, got none (leave "upstreams" out for the default, docker.io)',
    ]);
  });

  test('an upstream url with credentials is refused without echoing them', () => {
    const file = yamlFile(`
upstreams:
  docker.io:
    url: https://user:pw123@registry.example.com
  ghcr.io:
    url: https://user:pw/123@ghcr.io:99999
    authRealms: [https://me:pw123@auth.example/token]
  quay.io:
    url: https://quay.io
    username: me
    password: 123123
`);
    const shown = problems(() => loadConfig({ file, env: {} }));
    expect(shown).toEqual([
      'upstreams.docker.io.url: expected an http(s) URL without credentials or query (credentials go in username and passwordEnv), got "https://[redacted]@registry.example.com"',
      'upstreams.ghcr.io.url: expected an http(s) URL without credentials or query (credentials go in username and passwordEnv), got "https://[redacted]@ghcr.io:99999"',
      'upstreams.ghcr.io.authRealms.0: expected an http(s) URL without credentials or query (credentials go in username and passwordEnv), got "https://[redacted]@auth.example/token"',
      'upstreams.quay.io.password: expected string, got a number',
    ]);
    expect(shown.join('\n')).not.toMatch(/pw|123123/);
  });

  test('the environment adds an upstream by its URL, named by its host or by _NAME', () => {
    const config = loadConfig({
      env: {
        PULLCACHE_UPSTREAMS_QUAY_IO_URL: 'https://quay.io/v2/',
        PULLCACHE_UPSTREAMS_QUAY_IO_TAGTTL: '1m',
        PULLCACHE_UPSTREAMS_REGISTRY_LOCAL_5000_URL: 'http://registry.local:5000',
        PULLCACHE_UPSTREAMS_LAB_URL: 'http://10.0.0.5:5000',
        PULLCACHE_UPSTREAMS_LAB_NAME: 'lab.example',
        PULLCACHE_UPSTREAMS_LAB_OFFLINE: 'true',
      },
    });
    expect(Object.keys(config.upstreams).sort()).toEqual([
      'docker.io',
      'lab.example',
      'quay.io',
      'registry.local:5000',
    ]);
    expect(config.upstreams['quay.io']).toMatchObject({ url: 'https://quay.io', tagTTL: 60_000 });
    expect(config.upstreams['registry.local:5000']!.url).toBe('http://registry.local:5000');
    expect(config.upstreams['lab.example']).toMatchObject({
      url: 'http://10.0.0.5:5000',
      offline: true,
    });
    expect(config.routing.default).toBe('docker.io');
  });

  test('an upstream added by the environment whose name is not its host asks for _NAME', () => {
    expect(
      problems(() =>
        loadConfig({
          env: {
            PULLCACHE_UPSTREAMS_HUB_URL: 'https://registry-1.docker.io',
            PULLCACHE_UPSTREAMS_GHCR_IO_TAGTTL: '1m',
          },
        }),
      ),
    ).toEqual([
      'PULLCACHE_UPSTREAMS_HUB_URL: adds an upstream whose name cannot be read from HUB or from the URL\'s host ("registry-1.docker.io"): set PULLCACHE_UPSTREAMS_HUB_NAME to its name',
      'PULLCACHE_UPSTREAMS_GHCR_IO_TAGTTL: names no config key (upstreams: DOCKER_IO; PULLCACHE_UPSTREAMS_<X>_URL adds one)',
    ]);
  });

  test('a number that is not one is shown as given', () => {
    expect(
      problems(() =>
        loadConfig({
          env: {
            PULLCACHE_UPSTREAMS_DOCKER_IO_RETRIES: 'abc',
            PULLCACHE_CACHE_MEMORYENTRIES: '-1',
          },
        }),
      ),
    ).toEqual([
      'cache.memoryEntries: expected a number at least 0, got -1',
      'upstreams.docker.io.retries: expected number, got "abc"',
    ]);
    expect(
      loadConfig({ env: { PULLCACHE_UPSTREAMS_DOCKER_IO_RETRIES: '5' } }).upstreams['docker.io']!
        .retries,
    ).toBe(5);
  });

  test('pullcache config prints durations and sizes in their units, and loads back the same', async () => {
    const file = yamlFile(`
server:
  cacheWriteTimeout: 1500ms
storage:
  uploads:
    purgeAge: 36h
upstreams:
  docker.io:
    url: https://registry-1.docker.io
    tagTTL: 90s
    maxManifestSize: 1GB
    timeouts:
      connect: 2d
  ghcr.io:
    url: https://ghcr.io
    maxManifestSize: 1500
`);
    const { stdout } = await run('npx', ['tsx', 'src/cli.ts', 'config', '--config', file], {
      env: { ...process.env },
    });
    for (const line of [
      'cacheWriteTimeout: 1500ms',
      'purgeAge: 36h',
      'purgeInterval: 1h',
      'tagTTL: 90s',
      'tagTTL: 5m',
      'maxManifestSize: 1GB',
      'maxManifestSize: 1500B',
      'connect: 2d',
      'headers: 30s',
    ])
      expect(stdout).toContain(line);
    // The only large number left is a count.
    expect(stdout.match(/\w+: \d{4,}$/gm)).toEqual(['memoryEntries: 10000']);
    expect(loadConfig({ file: yamlFile(stdout), env: {} })).toEqual(loadConfig({ file, env: {} }));
  });

  test('pullcache config with no upstream exits 2 naming upstreams', async () => {
    const err = (await run(
      'npx',
      ['tsx', 'src/cli.ts', 'config', '--config', yamlFile('upstreams: {}\n')],
      { env: { ...process.env } },
    ).catch((e: unknown) => e)) as { code: number; stderr: string };
    expect(err.code).toBe(2);
    expect(err.stderr).toContain('upstreams: expected at least one upstream');
  });
});

describe('the configuration examples of the documentation', () => {
  const documents = ['README.md', 'docs/fleet.md', 'docs/s3.md', 'docs/repositories.md'];
  const blocks = documents.flatMap((doc) =>
    [...readFileSync(doc, 'utf8').matchAll(/^```yaml\n([\s\S]*?)^```$/gm)].map((m, i) => ({
      name: `${doc}, YAML block ${i + 1}`,
      yaml: m[1]!,
    })),
  );

  test('there are some', () => {
    expect(blocks.length).toBeGreaterThanOrEqual(8);
  });

  test.each(blocks)('$name loads as a configuration on its own', ({ yaml }) => {
    const dir = mkdtempSync(join(tmpdir(), 'pullcache-doc-config-'));
    const file = join(dir, 'pullcache.yaml');
    writeFileSync(file, yaml);
    // The variables its *Env keys name are set, as the example tells the reader to.
    const env = Object.fromEntries(
      [...yaml.matchAll(/\b\w+Env: (\w+)/g)].map((m) => [m[1]!, 'stand-in']),
    );
    try {
      expect(() => loadConfig({ file, env })).not.toThrow();
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
