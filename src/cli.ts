#!/usr/bin/env node
/** The `pullcache` command. */
import { Command, Option } from 'commander';
import { stringify } from 'yaml';
import { ConfigError, loadConfig, redactConfig } from './config/load.js';
import type { Config } from './config/schema.js';
import { createLogger } from './log/logger.js';
import { startServer } from './server.js';

interface CommonOptions {
  config?: string;
  listen?: string;
  storageRoot?: string;
  cache?: string;
  redisUrl?: string;
  logLevel?: string;
  logFormat?: string;
}

function withConfigOptions(command: Command): Command {
  return command
    .option('-c, --config <file>', 'YAML config file (or env PULLCACHE_CONFIG)')
    .option('--listen <host:port>', 'address to listen on (server.listen)')
    .option('--storage-root <dir>', 'storage directory (storage.filesystem.root)')
    .addOption(
      new Option('--cache <store>', 'metadata cache (cache.store)').choices(['memory', 'redis']),
    )
    .option('--redis-url <url>', 'Redis URL (cache.redis.url)')
    .addOption(
      new Option('--log-level <level>', 'log level (log.level)').choices([
        'fatal',
        'error',
        'warn',
        'info',
        'debug',
        'trace',
        'silent',
      ]),
    )
    .addOption(
      new Option('--log-format <format>', 'log format (log.format)').choices(['json', 'pretty']),
    );
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

function configFrom(o: CommonOptions): Config {
  try {
    return loadConfig({ ...(o.config ? { file: o.config } : {}), overrides: flagOverrides(o) });
  } catch (err) {
    if (err instanceof ConfigError) {
      console.error('pullcache: invalid configuration');
      for (const problem of err.problems) console.error(`  ${problem}`);
      process.exit(2);
    }
    throw err;
  }
}

const program = new Command()
  .name('pullcache')
  .description('A pull-through caching proxy for OCI/Docker container registries')
  .version('0.1.0')
  .showHelpAfterError();

withConfigOptions(
  program
    .command('serve')
    .description('serve the registry API, pulling misses through from the upstreams'),
).action(async (o: CommonOptions) => {
  const config = configFrom(o);
  const log = createLogger({ level: config.log.level, format: config.log.format });
  let running;
  try {
    running = await startServer(config, log);
  } catch (err) {
    const e = err as NodeJS.ErrnoException;
    console.error(
      `pullcache: cannot start: ${e.code === 'EADDRINUSE' ? `${config.server.listen} is already in use` : e.code === 'EACCES' ? `no permission to listen on ${config.server.listen} or to use ${config.storage.filesystem.root}` : e.message}`,
    );
    process.exit(1);
  }
  let stopping = false;
  // Logs go out asynchronously: flush them before the process ends, or the last lines are lost.
  const exit = (code: number) => log.flush(() => process.exit(code));
  const stop = (signal: string) => {
    if (stopping) process.exit(1);
    stopping = true;
    log.info({ signal }, 'shutting down');
    const force = setTimeout(() => exit(0), 10_000);
    force.unref();
    void running.close().then(
      () => exit(0),
      (err: unknown) => {
        log.error({ err }, 'shutdown failed');
        exit(1);
      },
    );
  };
  process.on('SIGINT', () => stop('SIGINT'));
  process.on('SIGTERM', () => stop('SIGTERM'));
});

withConfigOptions(
  program
    .command('config')
    .description('print the effective configuration (secrets redacted) and exit'),
).action((o: CommonOptions) => {
  process.stdout.write(stringify(redactConfig(configFrom(o))));
});

await program.parseAsync(process.argv);
