/** No Docker engine runs here, so the deployment files are validated as files. */
import { execFile } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { promisify } from 'node:util';
import { expect, test } from 'vitest';

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
  // Every env var the image sets names a real config key.
  for (const [, name] of dockerfile.matchAll(/(PULLCACHE_[A-Z_]+)=/g))
    expect(['PULLCACHE_SERVER_LISTEN', 'PULLCACHE_STORAGE_FILESYSTEM_ROOT']).toContain(name);
});
