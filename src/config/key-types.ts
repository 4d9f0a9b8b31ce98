/**
 * The kinds of value a config key holds, for schema.ts to build the config tree from: durations,
 * sizes and shares in human units, secrets, integers and booleans as environment variables give
 * them, host:port, http(s) URLs and repository globs, each with its bounds and the message that
 * names what was expected. Each one that is more than its zod type (a duration, a size, a share,
 * a secret) marks itself in `configMeta`, which shape.ts reads.
 */
import { z } from 'zod';
import { show } from './redact.js';
import { formatDuration, parseDuration, parseShare, parseSize } from './units.js';

export interface KeyMeta {
  /** Parsed from human units to a number (ms, bytes, a share of 1); printed back in them. */
  unit?: 'duration' | 'size' | 'share';
  /** Never echoed, not even in an error. */
  secret?: boolean;
}
export const configMeta = z.registry<KeyMeta>();

export const SECOND = 1000;
export const DAY = 86_400_000;
/**
 * The longest duration that becomes a timer. Node fires a setTimeout or setInterval of more than
 * 2^31-1 ms (24.8 days) after 1 ms: a sweepInterval of "25d" swept without pause. 24d leaves room
 * for what the code adds to one (fleet/primary.ts waits drainTimeout and 15 s more).
 */
export const TIMER_MAX = 24 * DAY;
/** Any other duration: past a century it is a typo, and `now - unusedFor` is still a date. */
const DURATION_MAX = 36_500 * DAY;

/**
 * A duration in ms, `min` to `max` both included. One that becomes a timer has `max: TIMER_MAX`;
 * an interval also `min: 1`, as 0 would run its work without pause, unless 0 is documented as
 * "off" (and the code does not start the timer then).
 */
export const duration = (fallback: string, { min = 0, max = DURATION_MAX } = {}) =>
  z
    .union([z.string(), z.number()])
    .default(fallback)
    .transform((value, ctx) => {
      // A bare number other than 0 is refused: "unusedFor: 30" meant as days would remove every
      // image at each sweep, "timeouts.connect: 10" meant as seconds would fail every fetch.
      const bare =
        typeof value === 'number'
          ? value > 0 && Number.isFinite(value)
            ? String(value)
            : undefined
          : /^\s*(\d+(?:\.\d+)?)\s*$/.exec(value)?.[1];
      if (bare !== undefined && Number(bare) !== 0) {
        ctx.addIssue({
          code: 'custom',
          message: `expected a duration with its unit (${(/^[\d.]+$/.test(bare) ? ['ms', 's', 'm', 'h', 'd'].map((u) => `"${bare}${u}"`) : ['"30s"', '"5m"', '"7d"']).join(', ')}): a bare number could mean any, got ${show(value)}`,
        });
        return z.NEVER;
      }
      const ms = parseDuration(value);
      if (ms === undefined) {
        ctx.addIssue({
          code: 'custom',
          message: `expected a duration like "30s" or "5m", got ${show(value)}`,
        });
        return z.NEVER;
      }
      if (ms < min || ms > max) {
        const range =
          min === 0
            ? `of at most ${formatDuration(max)}`
            : `from ${formatDuration(min)} to ${formatDuration(max)}`;
        ctx.addIssue({
          code: 'custom',
          message: `expected a duration ${range}, got ${show(value)}`,
        });
        return z.NEVER;
      }
      return ms;
    })
    .register(configMeta, { unit: 'duration' });

export const size = (fallback: string) =>
  z
    .union([z.string(), z.number()])
    .default(fallback)
    .transform((value, ctx) => {
      const bytes = parseSize(value);
      if (bytes === undefined) {
        ctx.addIssue({
          code: 'custom',
          message: `expected a size like "4MiB" or "50GiB", got ${show(value)}`,
        });
        return z.NEVER;
      }
      // Past Number.MAX_SAFE_INTEGER (8192TiB less a byte), bytes no longer count one by one,
      // and `pullcache config` would print something that does not load back as the same.
      if (!Number.isSafeInteger(bytes)) {
        ctx.addIssue({
          code: 'custom',
          message: `expected a size below 8192TiB, got ${show(value)}`,
        });
        return z.NEVER;
      }
      return bytes;
    })
    .register(configMeta, { unit: 'size' });

/** A share of a whole, "90%" (or 0.9), as a number in (0, 1]. */
export const share = (fallback: string) =>
  z
    .union([z.string(), z.number()])
    .default(fallback)
    .transform((value, ctx) => {
      const n = parseShare(value) ?? NaN;
      if (!(n > 0 && n <= 1)) {
        ctx.addIssue({
          code: 'custom',
          message: `expected a share like "90%", above 0% and at most 100%, got ${show(value)}`,
        });
        return z.NEVER;
      }
      return n;
    })
    .register(configMeta, { unit: 'share' });

export const secret = () => z.string().register(configMeta, { secret: true });

// Environment variables are strings: a whole number in one is read as that number, and anything
// else is left for the error to show as given (z.coerce would report "abc" as NaN).
export const integer = (fallback: number, min: number, max = Number.MAX_SAFE_INTEGER) =>
  z
    .preprocess(
      (v) => (typeof v === 'string' && /^\s*-?\d+\s*$/.test(v) ? Number(v) : v),
      z.number().int().min(min).max(max),
    )
    .default(fallback);

// Environment variables are strings; booleans accept "true"/"false" wherever they come from.
export const bool = (fallback: boolean) =>
  z
    .preprocess((v) => (v === 'true' ? true : v === 'false' ? false : v), z.boolean())
    .default(fallback);

export const hostPort = z.string().refine(
  (v) => {
    const m = /^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]*):(\d{1,5})$/.exec(v);
    return m !== null && Number(m[2]) <= 65535;
  },
  { error: (issue) => `expected host:port, got ${show(issue.input)}` },
);

/**
 * An http(s) URL without credentials, which `pullcache config` and the start-up log would show
 * in clear: they go in the keys named by `credentialsIn`. `orEmpty`: "" is taken too.
 */
export const httpUrl = (credentialsIn: string, { orEmpty = false } = {}) =>
  z.string().superRefine((v, ctx) => {
    if (orEmpty && v === '') return;
    let u: URL | undefined;
    try {
      u = new URL(v);
    } catch {
      // not a URL: the message below says what is expected
    }
    const credentials = u ? u.username !== '' || u.password !== '' : /@/.test(v);
    const http = u?.protocol === 'http:' || u?.protocol === 'https:';
    if (u && http && !credentials && u.search === '') return;
    ctx.addIssue({
      code: 'custom',
      message: `expected ${orEmpty ? '"" or ' : ''}an http(s) URL without credentials or query${credentials ? ` (credentials go in ${credentialsIn})` : ''}, got ${show(v)}`,
    });
  });

export const registryUrl = httpUrl('username and passwordEnv');

/**
 * An upstream's base URL. A trailing `/v2` or `/v2/` is dropped: it is the API root, which the
 * client adds itself, and registries' own docs often show it as "the registry URL".
 */
export const upstreamUrl = registryUrl
  .transform((v) => v.replace(/\/v2\/?$/, ''))
  // A path is a prefix the API lives under (a registry behind a path); one with the API root in
  // it ("/v2/library") names repositories, which come from the references instead: every
  // request would go to /v2/library/v2/...
  .refine((v) => !new URL(v).pathname.split('/').includes('v2'), {
    error: (issue) =>
      `expected the registry's base URL: a path with /v2/ in it names repositories, which come from the image references, got ${show(issue.input)}`,
  });

/** A glob on repository names (`library/*`, `team/**`); names are lower case, without spaces. */
export const repositoryGlob = z.string().refine((v) => /^[^\sA-Z]+$/.test(v), {
  error: (issue) =>
    `expected a glob on repository names like "library/*" (lower case, no spaces), got ${show(issue.input)}`,
});
