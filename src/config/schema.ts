/**
 * The one config schema: every key, its default and its unit live here. `config/default.yaml`
 * documents the same keys with comments; a test keeps the two in step.
 */
import { z } from 'zod';
import { parseDuration, parseSize } from './units.js';

const duration = (fallback: string) =>
  z
    .union([z.string(), z.number()])
    .default(fallback)
    .transform((value, ctx) => {
      const ms = parseDuration(value);
      if (ms === undefined) {
        ctx.addIssue({
          code: 'custom',
          message: `expected a duration like "30s" or "5m", got ${JSON.stringify(value)}`,
        });
        return z.NEVER;
      }
      return ms;
    });

const size = (fallback: string) =>
  z
    .union([z.string(), z.number()])
    .default(fallback)
    .transform((value, ctx) => {
      const bytes = parseSize(value);
      if (bytes === undefined) {
        ctx.addIssue({
          code: 'custom',
          message: `expected a size like "4MiB" or "50GiB", got ${JSON.stringify(value)}`,
        });
        return z.NEVER;
      }
      return bytes;
    });

// Environment variables are strings; booleans accept "true"/"false" wherever they come from.
const bool = (fallback: boolean) =>
  z
    .preprocess((v) => (v === 'true' ? true : v === 'false' ? false : v), z.boolean())
    .default(fallback);

const hostPort = z.string().refine(
  (v) => {
    const m = /^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]*):(\d{1,5})$/.exec(v);
    return m !== null && Number(m[2]) <= 65535;
  },
  { error: (issue) => `expected host:port, got ${JSON.stringify(issue.input)}` },
);

const httpUrl = z.string().refine(
  (v) => {
    try {
      const u = new URL(v);
      return (
        (u.protocol === 'http:' || u.protocol === 'https:') && u.username === '' && u.search === ''
      );
    } catch {
      return false;
    }
  },
  {
    error: (issue) =>
      `expected an http(s) URL without credentials or query, got ${JSON.stringify(issue.input)}`,
  },
);

/** Upstream names are how clients address an upstream (`/v2/ghcr.io/...`, `?ns=ghcr.io`). */
export const UPSTREAM_NAME = /^[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?(?::\d{1,5})?$/;

export const upstreamSchema = z.strictObject({
  url: httpUrl,
  /** cache: pull-through with local storage; passthrough: proxied unchanged, nothing kept. */
  mode: z.enum(['cache', 'passthrough']).default('cache'),
  username: z.string().optional(),
  password: z.string().optional(),
  passwordEnv: z.string().optional(),
  tagTTL: duration('5m'),
  /** Serve a cached tag when the upstream answers 404 for it. */
  staleOnNotFound: bool(false),
  /** Never dial this upstream: serve only what is cached. */
  offline: bool(false),
  /** Token realms (URL prefixes) that may receive credentials besides the upstream's own domain. */
  authRealms: z.array(httpUrl).default([]),
  maxManifestSize: size('4MiB'),
  timeouts: z
    .strictObject({
      connect: duration('10s'),
      headers: duration('30s'),
      bodyIdle: duration('30s'),
    })
    .prefault({}),
  retries: z.coerce.number().int().min(0).max(10).default(3),
});

export const DEFAULT_UPSTREAMS = { 'docker.io': { url: 'https://registry-1.docker.io' } };

export const configSchema = z
  .strictObject({
    server: z
      .strictObject({
        listen: hostPort.default('127.0.0.1:5000'),
        /** Extra time a blob fetch may go on after every client has left, to finish the cache write. */
        cacheWriteTimeout: duration('10m'),
      })
      .prefault({}),
    storage: z
      .strictObject({
        driver: z.literal('filesystem').default('filesystem'),
        filesystem: z.strictObject({ root: z.string().min(1).default('./data') }).prefault({}),
        delete: z.strictObject({ enabled: bool(false) }).prefault({}),
        uploads: z
          .strictObject({
            purgeAge: duration('24h'),
            purgeInterval: duration('1h'),
          })
          .prefault({}),
      })
      .prefault({}),
    cache: z
      .strictObject({
        store: z.enum(['memory', 'redis']).default('memory'),
        redis: z
          .strictObject({
            url: z
              .string()
              .regex(/^rediss?:\/\//, 'expected a redis:// or rediss:// URL')
              .default('redis://127.0.0.1:6379'),
          })
          .prefault({}),
        /** Entries kept in the in-process LRU in front of keyv (descriptors, manifests, tags). */
        memoryEntries: z.coerce.number().int().min(0).default(10_000),
      })
      .prefault({}),
    upstreams: z
      .record(
        z
          .string()
          .regex(
            UPSTREAM_NAME,
            'expected an upstream name like "docker.io" or "registry.local:5000"',
          ),
        upstreamSchema,
      )
      .prefault(DEFAULT_UPSTREAMS),
    routing: z.strictObject({ default: z.string().optional() }).prefault({}),
    log: z
      .strictObject({
        level: z
          .enum(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'])
          .default('info'),
        format: z.enum(['json', 'pretty']).default('json'),
      })
      .prefault({}),
  })
  .superRefine((config, ctx) => {
    const names = Object.keys(config.upstreams);
    if (config.routing.default !== undefined && !names.includes(config.routing.default)) {
      ctx.addIssue({
        code: 'custom',
        path: ['routing', 'default'],
        message: `expected one of the configured upstreams (${names.join(', ') || 'none'}), got ${JSON.stringify(config.routing.default)}`,
      });
    }
    for (const [name, upstream] of Object.entries(config.upstreams)) {
      if (upstream.password !== undefined && upstream.passwordEnv !== undefined) {
        ctx.addIssue({
          code: 'custom',
          path: ['upstreams', name, 'password'],
          message: 'give password or passwordEnv, not both',
        });
      }
      if (
        (upstream.password !== undefined || upstream.passwordEnv !== undefined) &&
        upstream.username === undefined
      ) {
        ctx.addIssue({
          code: 'custom',
          path: ['upstreams', name, 'username'],
          message: 'a password needs a username',
        });
      }
    }
  });

export type Config = z.output<typeof configSchema>;
export type UpstreamConfig = z.output<typeof upstreamSchema>;
export type RawConfig = z.input<typeof configSchema>;
