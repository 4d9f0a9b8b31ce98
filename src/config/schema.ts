/**
 * The one config schema: every key, its default and its unit live here. `config/default.yaml`
 * documents the same keys with comments; a test keeps the two in step. What a key is beyond its
 * type (a duration, a size, a secret) comes from the key types it is built of (key-types.ts),
 * marked in `configMeta`, so that printing the config (`pullcache config`) and its errors follow
 * the schema without a second list of keys.
 */
import { z } from 'zod';
import {
  bool,
  DAY,
  duration,
  hostPort,
  httpUrl,
  integer,
  registryUrl,
  repositoryGlob,
  secret,
  SECOND,
  share,
  size,
  TIMER_MAX,
  upstreamUrl,
} from './key-types.js';
import { show } from './redact.js';

/** Upstream names are how clients address an upstream (`/v2/ghcr.io/...`, `?ns=ghcr.io`). */
export const UPSTREAM_NAME = /^[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?(?::\d{1,5})?$/;

export const upstreamSchema = z
  .strictObject({
    url: upstreamUrl,
    /** cache: pull-through with local storage; passthrough: proxied unchanged, nothing kept. */
    mode: z.enum(['cache', 'passthrough']).default('cache'),
    username: z.string().optional(),
    password: secret().optional(),
    passwordEnv: z.string().optional(),
    /** 0: a tag is asked again at every pull. Not a timer (proxy-tag-service.ts compares it). */
    tagTTL: duration('5m'),
    /** Serve a cached tag when the upstream answers 404 for it. */
    staleOnNotFound: bool(false),
    /** Never dial this upstream: serve only what is cached. */
    offline: bool(false),
    /**
     * Token realms that may receive credentials besides the upstream's own host: an origin and a
     * path each, matched by origin and whole path segments (upstream/auth.ts).
     */
    authRealms: z.array(registryUrl).default([]),
    /** The largest manifest taken from the upstream; a referrers answer and a tags page too. */
    maxManifestSize: size('4MiB'),
    /**
     * 0: off. Each is a timer, and a token request's deadline is the three added up (at least a
     * minute, upstream/auth.ts), a timer too: 8d each keeps that within TIMER_MAX.
     */
    timeouts: z
      .strictObject({
        connect: duration('10s', { max: 8 * DAY }),
        headers: duration('30s', { max: 8 * DAY }),
        bodyIdle: duration('30s', { max: 8 * DAY }),
      })
      .prefault({}),
    retries: integer(3, 0, 10),
    /** Which repositories may be proxied at all, whoever asks (src/access/repositories.ts). */
    repositories: z
      .strictObject({
        /** Globs on the repository name; non-empty: only these. */
        allow: z.array(repositoryGlob).default([]),
        /** Globs on the repository name; they win over allow. */
        deny: z.array(repositoryGlob).default([]),
      })
      .prefault({}),
  })
  .superRefine((upstream, ctx) => {
    // http/passthrough.ts forwards each request's own path to the URL's origin.
    if (upstream.mode === 'passthrough' && new URL(upstream.url).pathname !== '/')
      ctx.addIssue({
        code: 'custom',
        path: ['url'],
        message: `expected a URL without a path for mode: passthrough (requests are forwarded to its origin as they are), got ${show(upstream.url)}`,
      });
  });

/** One access rule (src/access/rules.ts): who may do what, where. First match wins. */
export const ruleSchema = z.strictObject({
  /** User names; "*" any authenticated user; "anonymous" a request without credentials. */
  users: z.array(z.string().min(1)).min(1),
  /** Upstream names; omitted: every upstream. */
  upstreams: z.array(z.string().min(1)).min(1).optional(),
  /** Globs on the repository name (`library/*`, `team/**`); omitted: every repository. */
  repositories: z.array(z.string().min(1)).min(1).optional(),
  /** What the rule allows; empty: nothing (a rule that refuses). */
  actions: z.array(z.enum(['pull', 'admin'])),
});

export const authSchema = z
  .strictObject({
    /** An htpasswd file with bcrypt entries; empty: no client authentication. */
    htpasswd: z.string().default(''),
    /** Requests without credentials get what the rules give "anonymous". */
    anonymous: bool(false),
    rules: z.array(ruleSchema).default([]),
  })
  .prefault({});

export const DEFAULT_UPSTREAMS = { 'docker.io': { url: 'https://registry-1.docker.io' } };

/**
 * The keys that the checks across keys (configSchema's superRefine) read. Those checks run unless
 * one of these failed, or a section holding one, so that a mistake elsewhere (log.level) does not
 * hold them back for a second round; a value that failed cannot be checked against another.
 */
const CROSS_CHECKED: readonly (readonly string[])[] = [
  ['upstreams'],
  ['routing'],
  ['auth'],
  ['server', 'advertise'],
  ['server', 'peerSecret'],
  ['server', 'peerSecretEnv'],
  ['cache', 'store'],
];

function crossCheckable(payload: z.core.ParsePayload): boolean {
  return payload.issues.every(
    (issue) =>
      // An unknown key leaves the values of its section as they are.
      issue.code === 'unrecognized_keys' ||
      !CROSS_CHECKED.some((keys) => {
        const path = issue.path ?? [];
        // Either holds the other: the issue is at one of the keys, above it or beneath it.
        return keys.every((key, i) => i >= path.length || path[i] === key);
      }),
  );
}

export const configSchema = z
  .strictObject({
    server: z
      .strictObject({
        listen: hostPort.default('127.0.0.1:5000'),
        /** HTTPS: a PEM certificate chain and its key; with both set, HTTPS only. */
        tls: z
          .strictObject({
            cert: z.string().default(''),
            key: z.string().default(''),
            /** How often the two files are looked at for a renewed certificate. */
            reloadInterval: duration('10s', { max: TIMER_MAX }),
          })
          .superRefine((tls, ctx) => {
            if ((tls.cert === '') !== (tls.key === ''))
              ctx.addIssue({
                code: 'custom',
                path: [tls.cert === '' ? 'cert' : 'key'],
                message: `expected a path: server.tls.${tls.cert === '' ? 'key' : 'cert'} is set, and HTTPS needs both`,
              });
            if (tls.reloadInterval < 100)
              ctx.addIssue({
                code: 'custom',
                path: ['reloadInterval'],
                message: 'expected a duration of 100ms or more',
              });
          })
          .prefault({}),
        /** Extra time a blob fetch may go on after every client has left, to finish the cache write. */
        cacheWriteTimeout: duration('10m', { max: TIMER_MAX }), // 0: abandoned at once
        /**
         * On SIGTERM or SIGINT: how long the transfers in flight may go on, with new connections
         * refused, before they are cut and the process stops.
         */
        drainTimeout: duration('20s', { max: TIMER_MAX }), // 0: cut at once
        /**
         * A request body (a push through a passthrough upstream) that brings no byte for this
         * long is cut, its connection closed; a whole request has no time limit.
         */
        bodyIdleTimeout: duration('60s', { max: TIMER_MAX }), // 0: never cut
        /** Take the client's address from X-Forwarded-For (behind a load balancer), for the logs. */
        trustProxy: bool(false),
        /** Serving processes on this host, sharing the port and storage; 0: one per core. */
        workers: integer(1, 0, 256),
        /**
         * How other replicas reach this one (http://10.0.0.5:5000), to follow a fetch it holds;
         * empty: one fetch per digest on this host only.
         */
        advertise: z
          .string()
          .regex(/^(https?:\/\/[^/?#@]+\/?)?$/, 'expected "" or an http(s) URL of a host and port')
          .transform((v) => v.replace(/\/$/, ''))
          .default(''),
        /** Authenticates replica-to-replica requests; or the name of an environment variable. */
        peerSecret: secret().default(''),
        peerSecretEnv: z.string().default(''),
      })
      .prefault({}),
    storage: z
      .strictObject({
        driver: z.enum(['filesystem', 's3']).default('filesystem'),
        filesystem: z.strictObject({ root: z.string().min(1).default('./data') }).prefault({}),
        s3: z
          .strictObject({
            bucket: z.string().default('pullcache'),
            region: z.string().min(1).default('us-east-1'),
            /** Empty: AWS; else the S3 endpoint's URL. */
            endpoint: httpUrl('accessKeyEnv and secretKeyEnv', { orEmpty: true }).default(''),
            forcePathStyle: bool(false),
            /** Key prefix inside the bucket. */
            prefix: z
              .string()
              .regex(/^([^/].*\/)?$/, 'expected "" or a prefix ending in "/" (e.g. "cache/")')
              .default(''),
            /** Names of environment variables with the key; empty: the AWS default chain. */
            accessKeyEnv: z.string().default(''),
            secretKeyEnv: z.string().default(''),
            /**
             * Multipart part size for uploads: S3's minimum is 5MiB, its maximum 5GiB, and a
             * part is read into one Buffer (4GiB at most on Node 20).
             */
            partSize: size('16MiB')
              .refine((n) => n >= 5 * 1024 * 1024, 'expected at least 5MiB')
              .refine((n) => n <= 4 * 1024 ** 3, 'expected at most 4GiB'),
            /**
             * Where blobs being written are spooled until their upload completes; empty: the
             * system's temporary directory's pullcache-spool (os.tmpdir()).
             */
            spoolDir: z.string().default(''),
            /** Blob GETs answer 307 to a presigned URL of the object instead of streaming it. */
            redirect: bool(false),
            /**
             * A presigned URL's validity, in whole seconds (server.ts): the AWS presigner
             * refuses more than 7 days.
             */
            redirectTTL: duration('20m', { min: SECOND, max: 7 * DAY }),
          })
          .prefault({}),
        delete: z.strictObject({ enabled: bool(false) }).prefault({}),
        uploads: z
          .strictObject({
            purgeAge: duration('24h'),
            purgeInterval: duration('1h', { min: 1, max: TIMER_MAX }),
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
        memoryEntries: integer(10_000, 0),
      })
      .prefault({}),
    retention: z
      .strictObject({
        /** Most bytes of content kept (blobs and manifests); 0: no limit. */
        maxSize: size('0'),
        /** Bytes to keep free on the file system holding storage; 0: no such rule. */
        minFree: size('0'),
        /** An eviction frees down to this share of maxSize (and of minFree's room). */
        lowWater: share('90%'),
        /** Images not pulled for this long are removed by the sweep; 0: never. */
        unusedFor: duration('0'),
        sweepInterval: duration('10m', { min: 1, max: TIMER_MAX }),
        /** Images never evicted, as references (docker.io/library/node:20). */
        pins: z.array(z.string()).default([]),
      })
      .prefault({}),
    upstreams: z
      .record(
        z
          .string()
          // load.ts shows this message, not zod's "Invalid key in record" around it.
          .regex(UPSTREAM_NAME, {
            error: (issue) =>
              `expected an upstream name like "docker.io" or "registry.local:5000", got ${show(issue.input)}`,
          }),
        upstreamSchema,
      )
      .refine((upstreams) => Object.keys(upstreams).length > 0, {
        error:
          'expected at least one upstream, got none (leave "upstreams" out for the default, docker.io)',
      })
      .prefault(DEFAULT_UPSTREAMS),
    routing: z.strictObject({ default: z.string().optional() }).prefault({}),
    auth: authSchema,
    log: z
      .strictObject({
        level: z
          .enum(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'])
          .default('info'),
        format: z.enum(['json', 'pretty']).default('json'),
      })
      .prefault({}),
  })
  .superRefine(
    (config, ctx) => {
      const names = Object.keys(config.upstreams);
      if (config.routing.default !== undefined && !names.includes(config.routing.default)) {
        ctx.addIssue({
          code: 'custom',
          path: ['routing', 'default'],
          message: `expected one of the configured upstreams (${names.join(', ') || 'none'}), got ${show(config.routing.default)}`,
        });
      }
      if (config.auth.htpasswd === '' && (config.auth.anonymous || config.auth.rules.length > 0)) {
        ctx.addIssue({
          code: 'custom',
          path: ['auth', 'htpasswd'],
          message: 'auth.anonymous and auth.rules need an htpasswd file (client authentication)',
        });
      }
      config.auth.rules.forEach((rule, i) =>
        rule.upstreams?.forEach((name, j) => {
          if (!names.includes(name))
            ctx.addIssue({
              code: 'custom',
              path: ['auth', 'rules', i, 'upstreams', j],
              message: `expected one of the configured upstreams (${names.join(', ')}), got ${show(name)}`,
            });
        }),
      );
      const { advertise, peerSecret, peerSecretEnv } = config.server;
      if (peerSecret !== '' && peerSecretEnv !== '')
        ctx.addIssue({
          code: 'custom',
          path: ['server', 'peerSecret'],
          message: 'give peerSecret or peerSecretEnv, not both',
        });
      if (advertise !== '' && peerSecret === '' && peerSecretEnv === '')
        ctx.addIssue({
          code: 'custom',
          path: ['server', 'peerSecret'],
          message: 'server.advertise needs a peerSecret (or peerSecretEnv) shared by the replicas',
        });
      if (advertise !== '' && config.cache.store !== 'redis')
        ctx.addIssue({
          code: 'custom',
          path: ['server', 'advertise'],
          message:
            'server.advertise needs cache.store: redis (the replicas take their leases there)',
        });
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
    },
    { when: crossCheckable },
  );

export type Config = z.output<typeof configSchema>;
export type UpstreamConfig = z.output<typeof upstreamSchema>;
export type RawConfig = z.input<typeof configSchema>;
export type RuleConfig = z.output<typeof ruleSchema>;
