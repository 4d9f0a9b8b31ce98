/**
 * The options every `pullcache` command takes (the config file, storage, cache and logging, plus
 * `--listen` for the commands that serve), and the configuration they make: the flags are its
 * highest-precedence layer. An invalid configuration is a usage error: one line per problem on
 * stderr, exit 2.
 */
import { Command, Help, Option } from 'commander';
import { ConfigError, loadConfig, type SecretsFor } from '../config/load.js';
import type { Config } from '../config/schema.js';

export interface CommonOptions {
  config?: string;
  listen?: string;
  storageRoot?: string;
  cache?: string;
  redisUrl?: string;
  logLevel?: string;
  logFormat?: string;
}

/** The options every command takes: the config, storage, cache and logging; listed apart in help. */
export function withCommonOptions(command: Command): Command {
  const common = [
    new Option('-c, --config <file>', 'YAML config file (or env PULLCACHE_CONFIG)'),
    new Option('--storage-root <dir>', 'storage directory (storage.filesystem.root)'),
    new Option('--cache <store>', 'metadata cache (cache.store)').choices(['memory', 'redis']),
    new Option('--redis-url <url>', 'Redis URL (cache.redis.url)'),
    new Option('--log-level <level>', 'log level (log.level)').choices([
      'fatal',
      'error',
      'warn',
      'info',
      'debug',
      'trace',
      'silent',
    ]),
    new Option('--log-format <format>', 'log format (log.format)').choices(['json', 'pretty']),
  ];
  for (const option of common) command.addOption(option.helpGroup('Common options:'));
  // The command's own options (the help option at least) come first in every help: commander
  // orders the groups by their first option, and the help option is none of them, so a command
  // with no option of its own listed the common ones first.
  return command.configureHelp({
    groupItems<T extends Command | Option>(
      unsorted: T[],
      visible: T[],
      group: (item: T) => string,
    ): Map<string, T[]> {
      const groups = new Help().groupItems(unsorted, visible, group);
      const own = groups.get('Options:');
      if (own === undefined) return groups;
      return new Map([['Options:', own], ...[...groups].filter(([name]) => name !== 'Options:')]);
    },
  });
}

/** `--listen`: only for the commands that serve, or show what a server would use. */
export function withListenOption(command: Command): Command {
  return command.option('--listen <host:port>', 'address to listen on (server.listen)');
}

/** Flags become the highest-precedence config layer. */
function flagOverrides(o: CommonOptions): Record<string, unknown> {
  const overrides: Record<string, Record<string, unknown>> = {};
  const set = (section: string, key: string, value: unknown) => {
    if (value !== undefined) (overrides[section] ??= {})[key] = value;
  };
  set('server', 'listen', o.listen);
  if (o.storageRoot !== undefined) overrides.storage = { filesystem: { root: o.storageRoot } };
  set('cache', 'store', o.cache);
  if (o.redisUrl !== undefined) (overrides.cache ??= {}).redis = { url: o.redisUrl };
  set('log', 'level', o.logLevel);
  set('log', 'format', o.logFormat);
  return overrides;
}

/**
 * The configuration of a command line; an invalid one exits 2, its problems on stderr.
 * `secrets`: what the command dials, whose secrets must be in the environment (LoadOptions).
 */
export function configFrom(o: CommonOptions, secrets: SecretsFor = 'serve'): Config {
  try {
    return loadConfig({
      ...(o.config !== undefined ? { file: o.config } : {}),
      overrides: flagOverrides(o),
      secrets,
    });
  } catch (err) {
    if (err instanceof ConfigError) {
      console.error('pullcache: invalid configuration');
      for (const problem of err.problems) console.error(`  ${problem}`);
      process.exit(2);
    }
    throw err;
  }
}
