/**
 * The image cannot be built here (its base image comes from Docker Hub), so the Dockerfile and
 * the compose file are validated as files, and what the image runs (bin/pullcache,
 * bin/healthcheck, config/image.yaml) is run from the repository (see healthcheck.test.ts).
 */
import { execFile, execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { parse as parseYaml } from 'yaml';
import { describe, expect, test } from 'vitest';
import { loadConfig, parseConfig } from '../../src/config/load.js';

const run = promisify(execFile);

/** A service of `docker-compose config`'s output, as much as these tests read. */
interface ComposeService {
  environment?: Record<string, string>;
  /** "127.0.0.1:5000:5000/tcp" (docker-compose 1) or the long form (compose 2). */
  ports?: (string | { target: number })[];
  depends_on?: Record<string, unknown>;
}
const dockerfile = readFileSync('Dockerfile', 'utf8');
const IMAGE_CONFIG = '/etc/pullcache/config.yaml';

/** The PULLCACHE_* variables the runtime image sets. */
function imageEnv(): Record<string, string> {
  const runtime = dockerfile.slice(dockerfile.lastIndexOf('\nFROM '));
  return Object.fromEntries(
    [...runtime.matchAll(/(PULLCACHE_[A-Z_]+)=(\S+)/g)].map((m) => [m[1]!, m[2]!]),
  );
}

/** The repository file a COPY instruction puts at `target` in the image. */
function copiedTo(target: string): string | undefined {
  for (const m of dockerfile.matchAll(/^COPY (\S+) (\S+)$/gm)) {
    if (m[2] === target) return m[1];
  }
  return undefined;
}

describe('the Dockerfile', () => {
  test('is multi-stage, runs as a non-root user, with a data volume, through the one launcher', () => {
    expect(dockerfile.match(/^FROM /gm)).toHaveLength(2);
    expect(dockerfile).toMatch(/^USER pullcache$/m);
    expect(dockerfile).toMatch(/^VOLUME \["\/var\/lib\/pullcache"\]$/m);
    // The image, npm start and the npm bin all run pullcache through the one launcher.
    expect(dockerfile).toMatch(/^ENTRYPOINT \["bin\/pullcache"\]$/m);
    const pkg = JSON.parse(readFileSync('package.json', 'utf8')) as {
      version: string;
      scripts: { start: string };
      bin: { pullcache: string };
    };
    expect(pkg.scripts.start).toBe('bin/pullcache serve');
    expect(pkg.bin.pullcache).toBe('bin/pullcache');
    expect(execFileSync('bin/pullcache', ['--version'], { encoding: 'utf8' }).trim()).toBe(
      pkg.version,
    );
    // PULLCACHE_NODE_FLAGS reaches node through the launcher, and is no config key.
    const flagged = execFileSync('bin/pullcache', ['--version'], {
      encoding: 'utf8',
      env: {
        ...process.env,
        PULLCACHE_NODE_FLAGS: '--import=data:text/javascript,process.stdout.write("flag-seen:")',
      },
    });
    expect(flagged.trim()).toBe(`flag-seen:${pkg.version}`);
    expect(() => loadConfig({ env: { PULLCACHE_NODE_FLAGS: '--cpu-prof' } })).not.toThrow();
  });

  test('sets only PULLCACHE_CONFIG, naming the config file it ships: listen on every interface, data in the volume', () => {
    expect(imageEnv()).toEqual({ PULLCACHE_CONFIG: IMAGE_CONFIG });
    const source = copiedTo(IMAGE_CONFIG);
    expect(source).toBe('config/image.yaml');

    const config = loadConfig({ env: { PULLCACHE_CONFIG: source } });
    expect(config.server.listen).toBe('0.0.0.0:5000');
    expect(config.storage.filesystem.root).toBe('/var/lib/pullcache');
    // Nothing else differs from the defaults.
    const defaults = parseConfig({});
    defaults.server.listen = '0.0.0.0:5000';
    defaults.storage.filesystem.root = '/var/lib/pullcache';
    expect(config).toEqual(defaults);
  });

  test("a config file mounted over the image's decides the listen address and storage root", () => {
    const mounted = join(mkdtempSync(join(tmpdir(), 'pullcache-deploy-')), 'config.yaml');
    writeFileSync(
      mounted,
      'server:\n  listen: 0.0.0.0:6001\nstorage:\n  filesystem:\n    root: /srv/cache\n',
    );
    // The image's environment, with its config file replaced by the mounted one.
    const env = { ...imageEnv(), PULLCACHE_CONFIG: mounted };
    const config = loadConfig({ env });
    expect(config.server.listen).toBe('0.0.0.0:6001');
    expect(config.storage.filesystem.root).toBe('/srv/cache');
  });

  test('checks health with bin/healthcheck, which reads the effective config', () => {
    const m = /^HEALTHCHECK .*\\\n\s+CMD \["([^"]+)"\]$/m.exec(dockerfile);
    expect(m?.[1]).toBe('/app/bin/healthcheck');
    expect(dockerfile).toMatch(/^WORKDIR \/app$/m);
    expect(copiedTo('./bin')).toBe('bin');
    expect(() => execFileSync('test', ['-x', 'bin/healthcheck'])).not.toThrow();
  });
});

describe('docker-compose.yml', () => {
  const compose = readFileSync('docker-compose.yml', 'utf8');

  test('is valid and runs pullcache with Redis as its metadata cache, its data in a volume', async () => {
    const { stdout } = await run('docker-compose', ['-f', 'docker-compose.yml', 'config']);
    expect(stdout).toContain('PULLCACHE_CACHE_STORE: redis');
    expect(stdout).toMatch(/redis:\n/);
    expect(stdout).toContain('pullcache-data:/var/lib/pullcache');
  });

  test('publishes the port on loopback only, and warns of serving wider without client authentication', async () => {
    const { stdout } = await run('docker-compose', ['-f', 'docker-compose.yml', 'config']);
    const ports = [...stdout.matchAll(/^ {4}- (\S+:\d+\/tcp)$/gm)].map((m) => m[1]);
    expect(ports).toEqual(['127.0.0.1:5000:5000/tcp']);
    expect(compose).toMatch(/Without client authentication/);
    expect(compose).toMatch(/auth\.htpasswd/);
  });

  test("pullcache's environment loads over the image's config file, dialling the Redis service", async () => {
    const { stdout } = await run('docker-compose', ['-f', 'docker-compose.yml', 'config']);
    const services = (parseYaml(stdout) as { services: Record<string, ComposeService> }).services;
    const env = { ...imageEnv(), ...services.pullcache!.environment };
    env.PULLCACHE_CONFIG = copiedTo(env.PULLCACHE_CONFIG!)!;
    // As start-up does: a variable naming no key, or an invalid value, is refused.
    const config = loadConfig({ env });
    expect(config.cache.store).toBe('redis');
    const redis = new URL(config.cache.redis.url);
    expect(Object.keys(services)).toContain(redis.hostname);
    expect(services.pullcache!.depends_on).toHaveProperty(redis.hostname);
    // The published port reaches the address pullcache listens on.
    const listenPort = config.server.listen.split(':')[1];
    expect(
      services.pullcache!.ports?.map((p) =>
        typeof p === 'string'
          ? p
              .replace(/\/\w+$/, '')
              .split(':')
              .at(-1)
          : String(p.target),
      ),
    ).toContain(listenPort);
  });

  test("its commented Docker Hub credentials, once uncommented, load as the upstream's", () => {
    const lines = [...compose.matchAll(/^\s*#\s*([A-Z][A-Z0-9_]*): (\S+)$/gm)];
    const env: Record<string, string> = { PULLCACHE_CONFIG: 'config/image.yaml' };
    // What compose substitutes for ${VAR}: the value from .env, here a stand-in.
    for (const [, name, value] of lines) env[name!] = value!.replace(/^\$\{\w+\}$/, 'stand-in');
    expect(Object.keys(env)).toContain('PULLCACHE_UPSTREAMS_DOCKER_IO_PASSWORDENV');
    const hub = loadConfig({ env }).upstreams['docker.io']!;
    expect(hub.username).toBe('stand-in');
    expect(env[hub.passwordEnv!]).toBe('stand-in');
    // A token missing from .env is substituted empty: start-up says so, naming the key.
    expect(() => loadConfig({ env: { ...env, [hub.passwordEnv!]: '' } })).toThrow(
      `upstreams.docker.io.passwordEnv: the environment variable ${hub.passwordEnv} is empty`,
    );
  });

  test('its config file example mounts over the file the image reads, and names files that exist', () => {
    const mount = /^\s*#\s*- \.\/\S+:(\S+):ro$/m.exec(compose);
    expect(mount?.[1]).toBe(imageEnv().PULLCACHE_CONFIG);
    const named = [...compose.matchAll(/\bconfig\/[\w.-]+\.ya?ml\b/g)].map((m) => m[0]);
    expect(named).toContain('config/image.yaml');
    for (const file of named) expect(existsSync(file), file).toBe(true);
  });
});
