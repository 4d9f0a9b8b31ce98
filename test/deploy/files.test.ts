/** No Docker engine runs here, so the deployment files are validated as files. */
import { execFile, execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { promisify } from 'node:util';
import { expect, test } from 'vitest';
import { loadConfig } from '../../src/config/load.js';

const run = promisify(execFile);

test('docker-compose.yml is valid and runs pullcache with Redis as its metadata cache', async () => {
  const { stdout } = await run('docker-compose', ['-f', 'docker-compose.yml', 'config']);
  expect(stdout).toContain('PULLCACHE_CACHE_STORE: redis');
  expect(stdout).toMatch(/redis:\n/);
  expect(stdout).toContain('/var/lib/pullcache');
});

test('the Dockerfile is multi-stage, runs as a non-root user, with a data volume and a health check', () => {
  const dockerfile = readFileSync('Dockerfile', 'utf8');
  expect(dockerfile.match(/^FROM /gm)).toHaveLength(2);
  expect(dockerfile).toMatch(/^USER pullcache$/m);
  expect(dockerfile).toMatch(/^VOLUME \["\/var\/lib\/pullcache"\]$/m);
  expect(dockerfile).toMatch(/^HEALTHCHECK /m);
  // The env vars the image sets are a valid config (an unknown name would be an error).
  const env = Object.fromEntries(
    [...dockerfile.matchAll(/(PULLCACHE_[A-Z_]+)=(\S+)/g)].map((m) => [m[1]!, m[2]!]),
  );
  expect(Object.keys(env)).toHaveLength(2);
  const config = loadConfig({ env });
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
  expect(config.server.listen).toBe('0.0.0.0:5000');
  expect(config.storage.filesystem.root).toBe('/var/lib/pullcache');
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
