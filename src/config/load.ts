/**
 * Loads the effective config. Sources, lowest to highest: the schema's defaults, the YAML file
 * (`--config FILE` or PULLCACHE_CONFIG), environment variables, command-line flags.
 *
 * Environment scheme: `PULLCACHE_` then the key path in upper case, one `_` between keys, a
 * camelCase key written without separators (`tagTTL` -> `TAGTTL`), and an upstream named by its
 * name with every non-alphanumeric character as `_`:
 *   PULLCACHE_SERVER_LISTEN=0.0.0.0:5000
 *   PULLCACHE_CACHE_STORE=redis
 *   PULLCACHE_UPSTREAMS_DOCKER_IO_TAGTTL=10m
 *   PULLCACHE_UPSTREAMS_GHCR_IO_PASSWORDENV=GHCR_TOKEN
 * Lists (authRealms) are comma-separated. An env var that names no key is an error, like a
 * typo in the YAML file; PULLCACHE_TEST_* and PULLCACHE_BENCH_* belong to the tests and the
 * benchmark and are left alone.
 */
import { readFileSync } from 'node:fs';
import { parse as parseYaml, YAMLParseError } from 'yaml';
import type { z } from 'zod';
import { configSchema, DEFAULT_UPSTREAMS, type Config } from './schema.js';

export const ENV_PREFIX = 'PULLCACHE_';

/** A config that cannot be used; each problem names its key path. Start-up exits with code 2. */
export class ConfigError extends Error {
  constructor(readonly problems: string[]) {
    super(problems.join('\n'));
    this.name = 'ConfigError';
  }
}

export interface LoadOptions {
  /** Path of the YAML file; falls back to env PULLCACHE_CONFIG. */
  file?: string;
  env?: NodeJS.ProcessEnv;
  /** Highest precedence: values from command-line flags, as a partial config tree. */
  overrides?: Record<string, unknown>;
}

export function loadConfig(options: LoadOptions = {}): Config {
  const env = options.env ?? process.env;
  const file = options.file ?? env.PULLCACHE_CONFIG;
  let raw: Record<string, unknown> = {};
  if (file) raw = readYaml(file);
  // Env and flags refine the default upstream map unless the file replaced it.
  if (raw.upstreams === undefined) raw.upstreams = structuredClone(DEFAULT_UPSTREAMS);
  const problems: string[] = [];
  raw = deepMerge(raw, envLayer(env, raw, problems));
  if (options.overrides) raw = deepMerge(raw, options.overrides);
  try {
    const config = parseConfig(raw);
    if (problems.length > 0) throw new ConfigError(problems);
    return config;
  } catch (err) {
    if (err instanceof ConfigError && problems.length > 0 && err.problems !== problems) {
      throw new ConfigError([...problems, ...err.problems]);
    }
    throw err;
  }
}

/** Validates a raw config tree (as from YAML) and applies the defaults. */
export function parseConfig(raw: unknown): Config {
  const result = configSchema.safeParse(raw ?? {}, { reportInput: true });
  if (!result.success) throw new ConfigError(formatIssues(result.error.issues));
  const config = result.data;
  // The default upstream: as configured, else docker.io when it is configured, else the only one.
  if (config.routing.default === undefined) {
    const names = Object.keys(config.upstreams);
    if (names.includes('docker.io')) config.routing.default = 'docker.io';
    else if (names.length === 1) config.routing.default = names[0];
  }
  return config;
}

function readYaml(file: string): Record<string, unknown> {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (err) {
    throw new ConfigError([
      `${file}: cannot read config file (${(err as NodeJS.ErrnoException).code ?? String(err)})`,
    ]);
  }
  let doc: unknown;
  try {
    doc = parseYaml(text, { prettyErrors: true });
  } catch (err) {
    const message = err instanceof YAMLParseError ? err.message.split('\n')[0] : String(err);
    throw new ConfigError([`${file}: invalid YAML: ${message}`]);
  }
  if (doc === null || doc === undefined) return {};
  if (typeof doc !== 'object' || Array.isArray(doc)) {
    throw new ConfigError([`${file}: expected a mapping at the top level`]);
  }
  return doc as Record<string, unknown>;
}

export function formatIssues(issues: readonly z.core.$ZodIssue[]): string[] {
  const lines: string[] = [];
  for (const issue of issues) {
    const path = issue.path.map(String).join('.');
    if (issue.code === 'unrecognized_keys') {
      for (const key of issue.keys) lines.push(`${path ? `${path}.` : ''}${key}: unknown key`);
      continue;
    }
    let message = issue.message;
    if (issue.code === 'invalid_type') {
      const got = (issue as { input?: unknown }).input;
      message = `expected ${issue.expected}, got ${got === undefined ? 'nothing' : JSON.stringify(got)}`;
    } else if (issue.code === 'invalid_value') {
      const got = (issue as { input?: unknown }).input;
      message = `expected one of ${issue.values.map((v) => JSON.stringify(v)).join(', ')}, got ${JSON.stringify(got)}`;
    }
    lines.push(`${path || '(config)'}: ${message}`);
  }
  return lines;
}

// ---- environment ------------------------------------------------------------------------

type KeyTree =
  | { kind: 'object'; children: Map<string, KeyTree> }
  | { kind: 'record'; item: KeyTree }
  | { kind: 'leaf'; list: boolean };

/** The shape of the config keys, read off the zod schema so that env names follow it. */
function keyTree(schema: unknown): KeyTree {
  let def = (schema as { _zod: { def: Record<string, unknown> } })._zod.def;
  // Unwrap defaults, optionals and transforms down to the structural type.
  for (;;) {
    if (def.innerType) def = (def.innerType as { _zod: { def: Record<string, unknown> } })._zod.def;
    else if (def.type === 'pipe')
      def = (def.in as { _zod: { def: Record<string, unknown> } })._zod.def;
    else break;
  }
  if (def.type === 'object') {
    const children = new Map<string, KeyTree>();
    for (const [key, value] of Object.entries(def.shape as Record<string, unknown>))
      children.set(key, keyTree(value));
    return { kind: 'object', children };
  }
  if (def.type === 'record') return { kind: 'record', item: keyTree(def.valueType) };
  return { kind: 'leaf', list: def.type === 'array' };
}

let cachedTree: KeyTree | undefined;
const envName = (key: string) => key.toUpperCase().replace(/[^A-Z0-9]/g, '_');

function envLayer(
  env: NodeJS.ProcessEnv,
  fileLayer: Record<string, unknown>,
  problems: string[],
): Record<string, unknown> {
  cachedTree ??= keyTree(configSchema);
  const out: Record<string, unknown> = {};
  const fileUpstreams = Object.keys(
    (fileLayer.upstreams as Record<string, unknown> | undefined) ?? {},
  );
  for (const [name, value] of Object.entries(env)) {
    if (!name.startsWith(ENV_PREFIX) || value === undefined) continue;
    if (name === 'PULLCACHE_CONFIG' || name === 'PULLCACHE_NODE_FLAGS') continue; // the file; bin/pullcache's node flags
    if (name.startsWith('PULLCACHE_TEST_') || name.startsWith('PULLCACHE_BENCH_')) continue; // the test suite's and benchmark's own knobs
    const path = resolveEnvPath(name.slice(ENV_PREFIX.length), cachedTree, fileUpstreams);
    if (!path) {
      problems.push(`${name}: names no config key`);
      continue;
    }
    setPath(
      out,
      path.keys,
      path.list
        ? value
            .split(',')
            .map((s) => s.trim())
            .filter(Boolean)
        : value,
    );
  }
  return out;
}

function resolveEnvPath(
  rest: string,
  tree: KeyTree,
  upstreams: string[],
): { keys: string[]; list: boolean } | undefined {
  if (tree.kind === 'leaf') return rest === '' ? { keys: [], list: tree.list } : undefined;
  if (rest === '') return undefined;
  const candidates: [string, KeyTree][] =
    tree.kind === 'object'
      ? [...tree.children].map(([key, sub]) => [key, sub])
      : upstreams.map((key) => [key, tree.item]);
  // Longest names first, so that DOCKER_IO wins over a hypothetical DOCKER.
  candidates.sort((a, b) => b[0].length - a[0].length);
  for (const [key, sub] of candidates) {
    const token = tree.kind === 'object' ? key.toUpperCase() : envName(key);
    if (rest === token || rest.startsWith(`${token}_`)) {
      const found = resolveEnvPath(rest.slice(token.length + 1), sub, upstreams);
      if (found) return { keys: [key, ...found.keys], list: found.list };
    }
  }
  return undefined;
}

function setPath(target: Record<string, unknown>, keys: string[], value: unknown): void {
  let node = target;
  keys.forEach((key, i) => {
    if (i === keys.length - 1) node[key] = value;
    else node = (node[key] ??= {}) as Record<string, unknown>;
  });
}

export function deepMerge(
  base: Record<string, unknown>,
  over: Record<string, unknown>,
): Record<string, unknown> {
  const out: Record<string, unknown> = { ...base };
  for (const [key, value] of Object.entries(over)) {
    const prev = out[key];
    out[key] = isPlainObject(prev) && isPlainObject(value) ? deepMerge(prev, value) : value;
  }
  return out;
}

function isPlainObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** The config with every secret replaced, for `pullcache config` and logs. */
export function redactConfig(config: Config): Config {
  const copy = structuredClone(config);
  for (const upstream of Object.values(copy.upstreams)) {
    if (upstream.password !== undefined) upstream.password = '[redacted]';
  }
  copy.cache.redis.url = redactUrl(copy.cache.redis.url);
  return copy;
}

function redactUrl(value: string): string {
  try {
    const u = new URL(value);
    if (u.password) u.password = 'redacted';
    return u.toString();
  } catch {
    return value;
  }
}
