/**
 * Configs that users get wrong, each refused with one line naming the key and exit code 2:
 * secrets forgotten in the environment, durations without their unit, upstream URLs with a path
 * that cannot work, an empty --config, a listen address of another host; and an empty section,
 * which is taken as absent.
 */
import { execFile } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { describe, expect, test } from 'vitest';
import { loadConfig, parseConfig } from '../../src/config/load.js';
import { createRuntime } from '../../src/runtime.js';
import { problems, yamlFile } from '../helpers/config.js';
import { silentLogger } from '../../src/log/logger.js';
import { startRedis } from '../helpers/redis.js';

const run = promisify(execFile);

describe('a variable named by a *Env key', () => {
  const hub = (extra = '') =>
    yamlFile(
      `upstreams:\n  docker.io:\n    url: https://registry-1.docker.io\n    username: me\n    passwordEnv: DOCKERHUB_TOKEN\n${extra}`,
    );

  test('passwordEnv: unset or empty stops the load naming the key, set it loads', () => {
    expect(problems(() => loadConfig({ file: hub(), env: {} }))).toEqual([
      'upstreams.docker.io.passwordEnv: the environment variable DOCKERHUB_TOKEN is not set',
    ]);
    expect(problems(() => loadConfig({ file: hub(), env: { DOCKERHUB_TOKEN: '' } }))).toEqual([
      'upstreams.docker.io.passwordEnv: the environment variable DOCKERHUB_TOKEN is empty',
    ]);
    expect(
      loadConfig({ file: hub(), env: { DOCKERHUB_TOKEN: 't0ken' } }).upstreams['docker.io']!
        .passwordEnv,
    ).toBe('DOCKERHUB_TOKEN');
  });

  test('passwordEnv of an upstream never dialled with it (offline, passthrough) is not needed', () => {
    expect(problems(() => loadConfig({ file: hub('    offline: true\n'), env: {} }))).toEqual([]);
    expect(problems(() => loadConfig({ file: hub('    mode: passthrough\n'), env: {} }))).toEqual(
      [],
    );
  });

  test('peerSecretEnv with advertise, and the S3 keys with the s3 driver', () => {
    const fleet = yamlFile(
      [
        'server:',
        '  advertise: http://10.0.0.5:5000',
        '  peerSecretEnv: PEER_SECRET',
        'cache:',
        '  store: redis',
        'storage:',
        '  driver: s3',
        '  s3:',
        '    accessKeyEnv: S3_ACCESS_KEY',
        '    secretKeyEnv: S3_SECRET_KEY',
        '',
      ].join('\n'),
    );
    expect(problems(() => loadConfig({ file: fleet, env: { S3_SECRET_KEY: 's' } }))).toEqual([
      'server.peerSecretEnv: the environment variable PEER_SECRET is not set',
      'storage.s3.accessKeyEnv: the environment variable S3_ACCESS_KEY is not set',
    ]);
    const env = { PEER_SECRET: 'p', S3_ACCESS_KEY: 'a', S3_SECRET_KEY: 's' };
    expect(problems(() => loadConfig({ file: fleet, env }))).toEqual([]);
    // One S3 key without the other is no credential.
    const half = yamlFile('storage:\n  driver: s3\n  s3:\n    accessKeyEnv: S3_ACCESS_KEY\n');
    expect(problems(() => loadConfig({ file: half, env }))).toEqual([
      'storage.s3.secretKeyEnv: expected the name of a variable: storage.s3.accessKeyEnv is set, and the key needs both',
    ]);
  });

  test('the CLI exits 2 with the one line, no stack trace', async () => {
    const env: NodeJS.ProcessEnv = { ...process.env };
    delete env.DOCKERHUB_TOKEN;
    const err = (await run('npx', ['tsx', 'src/cli.ts', 'config', '--config', hub()], {
      env,
    }).catch((e: unknown) => e)) as { code: number; stderr: string };
    expect(err.code).toBe(2);
    expect(err.stderr).toBe(
      'pullcache: invalid configuration\n  upstreams.docker.io.passwordEnv: the environment variable DOCKERHUB_TOKEN is not set\n',
    );
  });

  test('is not needed by the commands that only read the cache (ls, from a shell without it)', async () => {
    expect(problems(() => loadConfig({ file: hub(), env: {}, secrets: 'storage' }))).toEqual([]);
    const env: NodeJS.ProcessEnv = { ...process.env };
    delete env.DOCKERHUB_TOKEN;
    const root = mkdtempSync(join(tmpdir(), 'pullcache-ls-'));
    try {
      const config = hub(`storage:\n  filesystem:\n    root: ${root}\n`);
      const r = await run('npx', ['tsx', 'src/cli.ts', 'ls', '--config', config], { env });
      expect(r.stdout).toContain('no images');
      // prefetch pulls: it needs the token.
      const err = (await run(
        'npx',
        ['tsx', 'src/cli.ts', 'prefetch', '--config', config, 'alpine:3'],
        {
          env,
        },
      ).catch((e: unknown) => e)) as { code: number; stderr: string };
      expect(err.code).toBe(2);
      expect(err.stderr).toContain('DOCKERHUB_TOKEN is not set');
    } finally {
      rmSync(root, { recursive: true, force: true });
    }
  });
});

describe("a replica's peer secret (server.advertise)", () => {
  const fleet = (root: string, redisUrl: string) =>
    yamlFile(
      `server:\n  advertise: http://10.0.0.5:5000\n  peerSecretEnv: PEER_SECRET\ncache:\n  store: redis\n  redis:\n    url: ${redisUrl}\nstorage:\n  filesystem:\n    root: ${root}\n`,
    );

  test('is needed to serve, not by prefetch nor by the commands on the cache, which follow no peer', async () => {
    const redis = await startRedis();
    const root = mkdtempSync(join(tmpdir(), 'pullcache-ls-'));
    try {
      const file = fleet(root, redis.url);
      expect(problems(() => loadConfig({ file, env: {} }))).toEqual([
        'server.peerSecretEnv: the environment variable PEER_SECRET is not set',
      ]);
      expect(problems(() => loadConfig({ file, env: {}, secrets: 'upstreams' }))).toEqual([]);
      expect(problems(() => loadConfig({ file, env: {}, secrets: 'storage' }))).toEqual([]);
      const env: NodeJS.ProcessEnv = { ...process.env };
      delete env.PEER_SECRET;
      const r = await run('npx', ['tsx', 'src/cli.ts', 'ls', '--config', file], { env });
      expect(r.stdout).toContain('no images');
      // A command's runtime takes no fetch lease that replicas would follow at the server's
      // address, where no fetch of its is under way.
      const runtime = await createRuntime(
        loadConfig({ file, env: {}, secrets: 'upstreams' }),
        silentLogger(),
      );
      try {
        expect(runtime.peer).toBeUndefined();
      } finally {
        await runtime.close();
      }
    } finally {
      rmSync(root, { recursive: true, force: true });
      await redis.stop();
    }
  });
});

describe('a duration', () => {
  const up = { 'docker.io': { url: 'https://x' } };

  test('as a bare number other than 0 is refused, in the file and the environment', () => {
    const file = yamlFile(
      'retention:\n  unusedFor: 30\nupstreams:\n  docker.io:\n    url: https://x\n    timeouts:\n      connect: 10\n',
    );
    expect(
      problems(() => loadConfig({ file, env: { PULLCACHE_SERVER_DRAINTIMEOUT: '20' } })),
    ).toEqual([
      'server.drainTimeout: expected a duration with its unit ("20ms", "20s", "20m", "20h", "20d"): a bare number could mean any, got "20"',
      'retention.unusedFor: expected a duration with its unit ("30ms", "30s", "30m", "30h", "30d"): a bare number could mean any, got 30',
      'upstreams.docker.io.timeouts.connect: expected a duration with its unit ("10ms", "10s", "10m", "10h", "10d"): a bare number could mean any, got 10',
    ]);
  });

  test('0 is still 0 without a unit, and every unit is taken', () => {
    const config = parseConfig({
      upstreams: { 'docker.io': { url: 'https://x', tagTTL: 0, timeouts: { connect: '0' } } },
      retention: { unusedFor: '30d', sweepInterval: '500ms' },
    });
    expect(config.upstreams['docker.io']!.tagTTL).toBe(0);
    expect(config.upstreams['docker.io']!.timeouts.connect).toBe(0);
    expect(config.retention.unusedFor).toBe(30 * 86_400_000);
    expect(config.retention.sweepInterval).toBe(500);
    expect(parseConfig({ upstreams: up }).server.drainTimeout).toBe(20_000);
  });
});

describe("an upstream's URL", () => {
  test('with the API root and repositories in its path is refused', () => {
    expect(
      problems(() =>
        parseConfig({
          upstreams: { 'docker.io': { url: 'https://registry-1.docker.io/v2/library' } },
        }),
      ),
    ).toEqual([
      'upstreams.docker.io.url: expected the registry\'s base URL: a path with /v2/ in it names repositories, which come from the image references, got "https://registry-1.docker.io/v2/library"',
    ]);
    // A prefix the API lives under is kept, with or without the API root after it.
    const config = parseConfig({
      upstreams: { 'a.example': { url: 'https://a.example/registry/v2/' } },
    });
    expect(config.upstreams['a.example']!.url).toBe('https://a.example/registry');
  });

  test('with a path is refused for a passthrough upstream, which forwards to its origin', () => {
    expect(
      problems(() =>
        parseConfig({
          upstreams: { 'r.example': { url: 'https://r.example/mirror', mode: 'passthrough' } },
        }),
      ),
    ).toEqual([
      'upstreams.r.example.url: expected a URL without a path for mode: passthrough (requests are forwarded to its origin as they are), got "https://r.example/mirror"',
    ]);
    const config = parseConfig({
      upstreams: { 'r.example': { url: 'https://r.example/v2/', mode: 'passthrough' } },
    });
    expect(config.upstreams['r.example']!.url).toBe('https://r.example');
  });
});

describe('the config file', () => {
  test('named by an empty --config is refused, not replaced by the defaults', async () => {
    expect(problems(() => loadConfig({ file: '', env: {} }))).toEqual([
      '--config: expected a file, got an empty path',
    ]);
    // An empty PULLCACHE_CONFIG is unset, as variables usually are.
    expect(problems(() => loadConfig({ env: { PULLCACHE_CONFIG: '' } }))).toEqual([]);
    // `pullcache serve --config "$FILE"` with FILE unset.
    const err = (await run('npx', ['tsx', 'src/cli.ts', 'config', '--config', ''], {
      env: { ...process.env },
    }).catch((e: unknown) => e)) as { code: number; stderr: string };
    expect(err.code).toBe(2);
    expect(err.stderr).toBe(
      'pullcache: invalid configuration\n  --config: expected a file, got an empty path\n',
    );
  });
});

describe('an empty section', () => {
  test('(every key under it commented out) is taken as absent; an empty value or upstream is not', () => {
    const config = loadConfig({
      file: yamlFile(
        'server:\n  # listen: 0.0.0.0:5000\nretention:\n  # maxSize: 10GiB\nstorage:\n  filesystem:\n',
      ),
      env: {},
    });
    expect(config.server.listen).toBe('127.0.0.1:5000');
    expect(config.retention.maxSize).toBe(0);
    expect(config.storage.filesystem.root).toBe('./data');
    // A value left empty is not its default: for some keys the default turns a protection off.
    expect(problems(() => loadConfig({ file: yamlFile('auth:\n  htpasswd:\n'), env: {} }))).toEqual(
      [expect.stringMatching(/^auth\.htpasswd: /)],
    );
    // Nor is an upstream with nothing under it dropped from the map.
    expect(
      problems(() =>
        loadConfig({
          file: yamlFile('upstreams:\n  ghcr.io:\n    # url: https://ghcr.io\n'),
          env: {},
        }),
      ),
    ).toEqual([expect.stringMatching(/^upstreams\.ghcr\.io/)]);
  });
});

describe('server.listen', () => {
  test('an address of another host stops serve with exit 2, naming the key', async () => {
    const root = mkdtempSync(join(tmpdir(), 'pullcache-listen-'));
    try {
      const err = (await run('npx', ['tsx', 'src/cli.ts', 'serve'], {
        env: {
          PATH: process.env.PATH ?? '',
          // 192.0.2.0/24 is TEST-NET-1 (RFC 5737): no host has it.
          PULLCACHE_SERVER_LISTEN: '192.0.2.1:5000',
          PULLCACHE_STORAGE_FILESYSTEM_ROOT: root,
          PULLCACHE_UPSTREAMS_DOCKER_IO_URL: 'http://127.0.0.1:9',
          PULLCACHE_LOG_LEVEL: 'silent',
        },
        timeout: 30_000,
      }).catch((e: unknown) => e)) as { code: number; stderr: string };
      expect(err.code).toBe(2);
      expect(err.stderr).toBe(
        'pullcache: cannot start: server.listen: cannot listen on 192.0.2.1:5000: not an address of this host (EADDRNOTAVAIL)\n',
      );
    } finally {
      rmSync(root, { recursive: true, force: true });
    }
  });
});
