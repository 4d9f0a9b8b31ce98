/**
 * What the config refuses beyond its types: durations a timer cannot take, sizes past exact
 * bytes, credentials in the S3 endpoint; and what it must keep: `pullcache config` loading back
 * as the same config, config/default.yaml usable as a starting point, every problem in one round.
 */
import { readFileSync } from 'node:fs';
import { parse as parseYaml } from 'yaml';
import { describe, expect, test } from 'vitest';
import { loadConfig, parseConfig } from '../../src/config/load.js';
import { printConfig } from '../../src/config/print.js';
import { problems, yamlFile } from '../helpers/config.js';

const up = { 'docker.io': { url: 'https://registry-1.docker.io' } };
/** Node's longest timer: a longer delay fires after 1 ms. */
const TIMER_LIMIT = 2 ** 31 - 1;

const parsed = (raw: Record<string, unknown>) => parseConfig({ upstreams: up, ...raw });
const refused = (raw: Record<string, unknown>) => problems(() => parsed(raw));

describe('durations', () => {
  test('one that becomes a timer is at most 24d, an interval more than 0', () => {
    expect(
      refused({
        retention: { sweepInterval: '25d' },
        storage: { uploads: { purgeInterval: 0 } },
        server: {
          drainTimeout: '25d',
          cacheWriteTimeout: `${2 ** 31}ms`,
          tls: { reloadInterval: '30d' },
        },
      }),
    ).toEqual([
      'server.tls.reloadInterval: expected a duration of at most 24d, got "30d"',
      'server.cacheWriteTimeout: expected a duration of at most 24d, got "2147483648ms"',
      'server.drainTimeout: expected a duration of at most 24d, got "25d"',
      'storage.uploads.purgeInterval: expected a duration from 1ms to 24d, got 0',
      'retention.sweepInterval: expected a duration from 1ms to 24d, got "25d"',
    ]);
    expect(refused({ retention: { sweepInterval: '0s' } })).toEqual([
      'retention.sweepInterval: expected a duration from 1ms to 24d, got "0s"',
    ]);
    const longest = parsed({
      retention: { sweepInterval: '24d' },
      storage: { uploads: { purgeInterval: '24d' } },
      server: { drainTimeout: '24d', cacheWriteTimeout: '24d', tls: { reloadInterval: '24d' } },
    });
    expect(longest.retention.sweepInterval).toBe(24 * 86_400_000);
    // fleet/primary.ts gives the workers drainTimeout and 15 s more: still one timer.
    expect(longest.server.drainTimeout + 15_000).toBeLessThanOrEqual(TIMER_LIMIT);
  });

  test('upstream timeouts are at most 8d each: a token request waits their sum', () => {
    const timeouts = (t: Record<string, unknown>) => ({
      upstreams: { 'docker.io': { ...up['docker.io'], timeouts: t } },
    });
    expect(
      problems(() => parseConfig(timeouts({ connect: '9d', headers: '8d', bodyIdle: '25d' }))),
    ).toEqual([
      'upstreams.docker.io.timeouts.connect: expected a duration of at most 8d, got "9d"',
      'upstreams.docker.io.timeouts.bodyIdle: expected a duration of at most 8d, got "25d"',
    ]);
    const longest = parseConfig(timeouts({ connect: '8d', headers: '8d', bodyIdle: '8d' }));
    const t = longest.upstreams['docker.io']!.timeouts;
    expect(t.connect + t.headers + t.bodyIdle).toBeLessThanOrEqual(TIMER_LIMIT);
  });

  test('0 stays where it means off or never', () => {
    const config = parseConfig({
      upstreams: {
        'docker.io': { ...up['docker.io'], tagTTL: 0, timeouts: { connect: 0, headers: 0 } },
      },
      server: { drainTimeout: 0, cacheWriteTimeout: 0 },
      retention: { unusedFor: 0 },
    });
    expect(config.upstreams['docker.io']!.timeouts).toEqual({
      connect: 0,
      headers: 0,
      bodyIdle: 30_000,
    });
    expect([config.server.drainTimeout, config.retention.unusedFor]).toEqual([0, 0]);
    // Not timers: longer than 24d is fine.
    expect(parsed({ retention: { unusedFor: '90d' } }).retention.unusedFor).toBe(90 * 86_400_000);
  });

  test('storage.s3.redirectTTL is 1s to 7d, what the AWS presigner takes', () => {
    expect(parsed({ storage: { s3: { redirectTTL: '7d' } } }).storage.s3.redirectTTL).toBe(
      604_800_000,
    );
    expect(refused({ storage: { s3: { redirectTTL: '8d' } } })).toEqual([
      'storage.s3.redirectTTL: expected a duration from 1s to 7d, got "8d"',
    ]);
    expect(refused({ storage: { s3: { redirectTTL: 0 } } })).toEqual([
      'storage.s3.redirectTTL: expected a duration from 1s to 7d, got 0',
    ]);
  });

  test('a huge one is a clear error, not a number in exponent form', () => {
    const shown = refused({
      retention: { unusedFor: '99999999999999999999d' },
      storage: { uploads: { purgeAge: 1e30 } },
    });
    expect(shown).toEqual([
      'storage.uploads.purgeAge: expected a duration with its unit ("30s", "5m", "7d"): a bare number could mean any, got 1e+30',
      'retention.unusedFor: expected a duration of at most 36500d, got "99999999999999999999d"',
    ]);
  });
});

test('storage.s3.endpoint with credentials is refused without echoing them', () => {
  const shown = refused({
    storage: { s3: { endpoint: 'http://user:hunter2@ceph.internal:8000' } },
  });
  expect(shown).toEqual([
    'storage.s3.endpoint: expected "" or an http(s) URL without credentials or query (credentials go in accessKeyEnv and secretKeyEnv), got "http://[redacted]@ceph.internal:8000"',
  ]);
  expect(shown.join('\n')).not.toContain('hunter2');
  expect(refused({ storage: { s3: { endpoint: 'ftp://x' } } })).toEqual([
    'storage.s3.endpoint: expected "" or an http(s) URL without credentials or query, got "ftp://x"',
  ]);
  for (const endpoint of ['', 'http://ceph-rgw.internal:8000', 'https://s3.example/'])
    expect(parsed({ storage: { s3: { endpoint } } }).storage.s3.endpoint).toBe(endpoint);
});

test('an invalid upstream name says what an upstream name is', () => {
  expect(
    problems(() =>
      parseConfig({
        upstreams: { 'Docker.IO': { url: 'https://registry-1.docker.io' }, a_b: up['docker.io'] },
      }),
    ),
  ).toEqual([
    'upstreams.Docker.IO: expected an upstream name like "docker.io" or "registry.local:5000", got "Docker.IO"',
    'upstreams.a_b: expected an upstream name like "docker.io" or "registry.local:5000", got "a_b"',
  ]);
});

describe('pullcache config loads back as the same config', () => {
  const roundTrip = (raw: Record<string, unknown>) => {
    const config = parsed(raw);
    const printed = printConfig(config);
    expect(parseConfig(parseYaml(printed))).toEqual(config);
    return printed;
  };

  test('shares, exactly', () => {
    for (const lowWater of [0.3333, 1 / 3, 0.07, '12.5%', 0.123456789, 1e-9, 0.9]) {
      const printed = roundTrip({ retention: { lowWater } });
      expect(printed).not.toMatch(/e[+-]\d+%/);
    }
    expect(roundTrip({ retention: { lowWater: 0.3333 } })).toContain('lowWater: 33.33%');
    expect(roundTrip({})).toContain('lowWater: 90%');
  });

  test('durations given as a fraction of a millisecond', () => {
    expect(roundTrip({ server: { cacheWriteTimeout: '1.5ms' } })).toContain(
      'cacheWriteTimeout: 2ms',
    );
  });

  test('sizes past exact bytes are refused', () => {
    expect(refused({ retention: { maxSize: '99999999999TiB', minFree: 2 ** 53 } })).toEqual([
      'retention.maxSize: expected a size below 8192TiB, got "99999999999TiB"',
      'retention.minFree: expected a size below 8192TiB, got 9007199254740992',
    ]);
    expect(roundTrip({ retention: { maxSize: '8191TiB' } })).toContain('maxSize: 8191TiB');
  });
});

describe('config/default.yaml', () => {
  const text = readFileSync('config/default.yaml', 'utf8');

  test('copied with other upstreams, it loads', () => {
    const start = text.indexOf('\nupstreams:\n');
    const end = text.indexOf('\n', text.indexOf('\n      deny: []', start) + 1);
    expect(start).toBeGreaterThan(0);
    const upstreams = 'upstreams:\n  ghcr.io:\n    url: https://ghcr.io\n';
    const copy = `${text.slice(0, start)}\n${upstreams}${text.slice(end)}`;
    const config = loadConfig({ file: yamlFile(copy), env: {} });
    expect(Object.keys(config.upstreams)).toEqual(['ghcr.io']);
    expect(config.routing.default).toBe('ghcr.io');
  });

  test('its environment examples load', () => {
    const env = Object.fromEntries(
      [...text.matchAll(/^#\s+(PULLCACHE_\w+)=(\S+)/gm)].map((m) => [m[1]!, m[2]!]),
    );
    expect(Object.keys(env).length).toBeGreaterThanOrEqual(8);
    // The variable PULLCACHE_UPSTREAMS_DOCKER_IO_PASSWORDENV names must be set too.
    const config = loadConfig({ env: { ...env, DOCKERHUB_TOKEN: 'stand-in' } });
    expect(config.upstreams['docker.io']).toMatchObject({
      username: 'someone',
      passwordEnv: 'DOCKERHUB_TOKEN',
    });
    expect(config.upstreams['quay.io']!.tagTTL).toBe(60_000);
  });
});

test('checks across keys are reported with the other problems, in one round', () => {
  expect(
    problems(() =>
      parseConfig({
        upstreams: { 'docker.io': { url: 'https://x', password: 'p' } },
        routing: { default: 'quay.io' },
        log: { level: 'loud' },
        retention: { sweepInterval: '25d' },
        storage: { s3: { partSize: '1MiB' } },
        server: { listen: 'nowhere', tls: { cert: '/c.pem' }, advertise: 'http://10.0.0.5:5000' },
        logs: {},
      }),
    ),
  ).toEqual([
    'server.listen: expected host:port, got "nowhere"',
    'server.tls.key: expected a path: server.tls.cert is set, and HTTPS needs both',
    'storage.s3.partSize: expected at least 5MiB',
    'retention.sweepInterval: expected a duration from 1ms to 24d, got "25d"',
    'log.level: expected one of "fatal", "error", "warn", "info", "debug", "trace", "silent", got "loud"',
    'logs: unknown key',
    'routing.default: expected one of the configured upstreams (docker.io), got "quay.io"',
    'server.peerSecret: server.advertise needs a peerSecret (or peerSecretEnv) shared by the replicas',
    'server.advertise: server.advertise needs cache.store: redis (the replicas take their leases there)',
    'upstreams.docker.io.username: a password needs a username',
  ]);
  // A key that a check reads and that failed is not checked against others.
  expect(
    problems(() =>
      parseConfig({ upstreams: { 'docker.io': { url: 'ftp://x' } }, routing: { default: 'q' } }),
    ),
  ).toEqual([
    'upstreams.docker.io.url: expected an http(s) URL without credentials or query, got "ftp://x"',
  ]);
});
