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
 * Lists (authRealms) are comma-separated.
 *
 * The environment adds an upstream with its URL: `PULLCACHE_UPSTREAMS_<X>_URL` where no
 * configured upstream is called X. `_` stands for any of `.`, `-` and `:`, so the name cannot
 * be read back from X; it is the URL's host (with its port, if any) when that host is spelled X,
 * and `PULLCACHE_UPSTREAMS_<X>_NAME` otherwise:
 *   PULLCACHE_UPSTREAMS_QUAY_IO_URL=https://quay.io                 -> upstream "quay.io"
 *   PULLCACHE_UPSTREAMS_HUB_URL=https://registry-1.docker.io
 *   PULLCACHE_UPSTREAMS_HUB_NAME=docker.io                          -> upstream "docker.io"
 * Its other keys follow with the same X (`PULLCACHE_UPSTREAMS_QUAY_IO_TAGTTL=1m`).
 *
 * An env var that names no key is an error, like a typo in the YAML file; PULLCACHE_TEST_* and
 * PULLCACHE_BENCH_* belong to the tests and the benchmark and are left alone.
 */
import { readFileSync } from 'node:fs';
import { parse as parseYaml, YAMLParseError } from 'yaml';
import type { z } from 'zod';
import { show } from './redact.js';
import { configSchema, DEFAULT_UPSTREAMS, type Config } from './schema.js';
import { configShape, shapeAt, type KeyTree } from './shape.js';

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
  /**
   * Which secrets named by `*Env` keys must be in the environment, by what the process does:
   * `serve` (the default; also `config`, which checks a config for serving) dials upstreams and
   * peers (`passwordEnv`, `peerSecretEnv`); `upstreams` (`prefetch`) dials upstreams but is no
   * replica others follow; `storage` (`ls`, `rm`, `export`...), run from a shell that may not hold
   * the service's secrets, only reads and writes the cache. The storage's keys are needed by all.
   */
  secrets?: SecretsFor;
}

/** What a process dials, and so which secrets it needs (LoadOptions.secrets). */
export type SecretsFor = 'serve' | 'upstreams' | 'storage';

export function loadConfig(options: LoadOptions = {}): Config {
  const env = options.env ?? process.env;
  // `--config "$FILE"` with FILE unset: refused, not served with the defaults. An empty
  // PULLCACHE_CONFIG is taken as unset, as variables usually are.
  if (options.file === '') throw new ConfigError(['--config: expected a file, got an empty path']);
  const file = options.file ?? env.PULLCACHE_CONFIG;
  let raw: Record<string, unknown> = {};
  if (file) raw = withoutEmptySections(readYaml(file), configShape()) as Record<string, unknown>;
  // Env and flags refine the default upstream map unless the file replaced it.
  if (raw.upstreams === undefined) raw.upstreams = structuredClone(DEFAULT_UPSTREAMS);
  const problems: string[] = [];
  raw = deepMerge(raw, envLayer(env, raw, problems));
  if (options.overrides) raw = deepMerge(raw, options.overrides);
  try {
    const config = parseConfig(raw);
    problems.push(...unsetVariables(config, env, options.secrets ?? 'serve'));
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

/**
 * The keys naming an environment variable (`passwordEnv`, `peerSecretEnv`, `accessKeyEnv`,
 * `secretKeyEnv`) whose variable is unset or empty where the config would read it: a secret
 * forgotten in a deployment stops start-up naming the key, instead of pulling anonymously
 * (Docker Hub's lower limit, a private registry's 401s) or failing later. Only where the secret is
 * used: not for a passthrough or offline upstream, nor peerSecretEnv without server.advertise or
 * outside `serve`, nor the S3 keys with the filesystem driver.
 */
function unsetVariables(config: Config, env: NodeJS.ProcessEnv, secrets: SecretsFor): string[] {
  const problems: string[] = [];
  const check = (key: string, name: string) => {
    const value = env[name];
    if (value === undefined) problems.push(`${key}: the environment variable ${name} is not set`);
    else if (value === '') problems.push(`${key}: the environment variable ${name} is empty`);
  };
  const { server, storage } = config;
  if (secrets !== 'storage') {
    for (const [name, upstream] of Object.entries(config.upstreams)) {
      if (upstream.passwordEnv && upstream.mode === 'cache' && !upstream.offline)
        check(`upstreams.${name}.passwordEnv`, upstream.passwordEnv);
    }
  }
  if (secrets === 'serve' && server.advertise !== '' && server.peerSecretEnv !== '')
    check('server.peerSecretEnv', server.peerSecretEnv);
  if (storage.driver === 's3') {
    const { accessKeyEnv, secretKeyEnv } = storage.s3;
    if ((accessKeyEnv === '') !== (secretKeyEnv === ''))
      problems.push(
        `storage.s3.${accessKeyEnv === '' ? 'accessKeyEnv' : 'secretKeyEnv'}: expected the name of a variable: storage.s3.${accessKeyEnv === '' ? 'secretKeyEnv' : 'accessKeyEnv'} is set, and the key needs both`,
      );
    if (accessKeyEnv !== '') check('storage.s3.accessKeyEnv', accessKeyEnv);
    if (secretKeyEnv !== '') check('storage.s3.secretKeyEnv', secretKeyEnv);
  }
  return problems;
}

/**
 * A section left empty (`server:` with every key under it commented out) is YAML's null: taken
 * as absent, as the user meant, rather than refused as "expected object, got null". Only
 * sections: an empty leaf (`htpasswd:`) is still refused, not read as its
 * default (for some keys the default turns a protection off).
 */
function withoutEmptySections(value: unknown, shape: KeyTree | undefined): unknown {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) return value;
  if (shape?.kind !== 'object' && shape?.kind !== 'record') return value;
  const out: Record<string, unknown> = {};
  for (const [key, child] of Object.entries(value)) {
    const childShape = shape.kind === 'object' ? shape.children.get(key) : shape.item;
    // Not an entry of a map (an upstream with nothing under it is refused for its missing url).
    if (child === null && shape.kind === 'object' && childShape?.kind === 'object') continue;
    out[key] = withoutEmptySections(child, childShape);
  }
  return out;
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
    // A map key that fails its schema (an upstream name): zod wraps what that schema says in
    // a bare "Invalid key in record", so its own issues are shown, at the key's path.
    if (issue.code === 'invalid_key') {
      const inner = issue.issues.map((i) => ({ ...i, path: [...issue.path, ...i.path] }));
      lines.push(...formatIssues(inner));
      continue;
    }
    // A secret is never echoed, not even when it is the wrong type.
    const leaf = shapeAt(issue.path);
    const secret = leaf?.kind === 'leaf' && leaf.meta.secret === true;
    const input = (issue as { input?: unknown }).input;
    const got = secret ? `a ${typeof input}` : show(input);
    let message = issue.message;
    if (issue.code === 'invalid_type') {
      message = `expected ${issue.expected}, got ${got}`;
    } else if (issue.code === 'invalid_value') {
      message = `expected one of ${issue.values.map((v) => JSON.stringify(v)).join(', ')}, got ${got}`;
    } else if (
      (issue.code === 'too_small' || issue.code === 'too_big') &&
      issue.origin === 'number'
    ) {
      const bound = issue.code === 'too_small' ? issue.minimum : issue.maximum;
      message = `expected a number ${issue.code === 'too_small' ? 'at least' : 'at most'} ${String(bound)}, got ${got}`;
    }
    lines.push(`${path || '(config)'}: ${message}`);
  }
  return lines;
}

// ---- environment ------------------------------------------------------------------------

const envName = (key: string) => key.toUpperCase().replace(/[^A-Z0-9]/g, '_');
const UPSTREAMS_PREFIX = `${ENV_PREFIX}UPSTREAMS_`;
const ADDED_URL = new RegExp(`^${UPSTREAMS_PREFIX}(.+)_URL$`);

/** An upstream as the environment spells it (X in PULLCACHE_UPSTREAMS_X_...) and its name. */
interface UpstreamToken {
  token: string;
  name: string;
}

function envLayer(
  env: NodeJS.ProcessEnv,
  fileLayer: Record<string, unknown>,
  problems: string[],
): Record<string, unknown> {
  const tree = configShape();
  const out: Record<string, unknown> = {};
  const upstreams: UpstreamToken[] = Object.keys(
    (fileLayer.upstreams as Record<string, unknown> | undefined) ?? {},
  ).map((name) => ({ token: envName(name), name }));
  const consumed = new Set<string>();
  for (const added of addedUpstreams(env, upstreams, problems, consumed)) upstreams.push(added);
  for (const [name, value] of Object.entries(env)) {
    if (!name.startsWith(ENV_PREFIX) || value === undefined || consumed.has(name)) continue;
    if (name === 'PULLCACHE_CONFIG' || name === 'PULLCACHE_NODE_FLAGS') continue; // the file; bin/pullcache's node flags
    if (name.startsWith('PULLCACHE_TEST_') || name.startsWith('PULLCACHE_BENCH_')) continue; // the test suite's and benchmark's own knobs
    const path = resolveEnvPath(name.slice(ENV_PREFIX.length), tree, upstreams);
    if (!path) {
      problems.push(
        name.startsWith(UPSTREAMS_PREFIX)
          ? `${name}: names no config key (upstreams: ${upstreams.map((u) => u.token).join(', ') || 'none'}; PULLCACHE_UPSTREAMS_<X>_URL adds one)`
          : `${name}: names no config key`,
      );
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

/**
 * The upstreams the environment adds: a PULLCACHE_UPSTREAMS_<X>_URL whose X is no configured
 * upstream. The name is PULLCACHE_UPSTREAMS_<X>_NAME, else the URL's host when it is spelled X.
 */
function addedUpstreams(
  env: NodeJS.ProcessEnv,
  configured: readonly UpstreamToken[],
  problems: string[],
  consumed: Set<string>,
): UpstreamToken[] {
  const added: UpstreamToken[] = [];
  for (const [variable, value] of Object.entries(env)) {
    const token = ADDED_URL.exec(variable)?.[1];
    if (token === undefined || value === undefined) continue;
    if (configured.some((u) => u.token === token)) continue; // that upstream's url, set as any key
    const nameVariable = `${UPSTREAMS_PREFIX}${token}_NAME`;
    let name = env[nameVariable];
    if (name !== undefined) {
      consumed.add(nameVariable);
    } else {
      let host: string | undefined;
      try {
        host = new URL(value).host;
      } catch {
        problems.push(`${variable}: expected an http(s) URL, got ${show(value)}`);
        consumed.add(variable);
        continue;
      }
      if (envName(host) !== token) {
        problems.push(
          `${variable}: adds an upstream whose name cannot be read from ${token} or from the URL's host (${show(host)}): set ${nameVariable} to its name`,
        );
        consumed.add(variable);
        continue;
      }
      name = host;
    }
    added.push({ token, name });
  }
  return added;
}

function resolveEnvPath(
  rest: string,
  tree: KeyTree,
  upstreams: readonly UpstreamToken[],
): { keys: string[]; list: boolean } | undefined {
  if (tree.kind === 'leaf') return rest === '' ? { keys: [], list: tree.list } : undefined;
  if (rest === '') return undefined;
  const candidates: [string, string, KeyTree][] =
    tree.kind === 'object'
      ? [...tree.children].map(([key, sub]) => [key.toUpperCase(), key, sub])
      : upstreams.map((u) => [u.token, u.name, tree.item]);
  // Longest tokens first, so that DOCKER_IO wins over a hypothetical DOCKER.
  candidates.sort((a, b) => b[0].length - a[0].length);
  for (const [token, key, sub] of candidates) {
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
