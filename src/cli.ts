#!/usr/bin/env node
/**
 * The `pullcache` command: one verb per command. Exit codes: 0 done, 1 failed, 2 used wrongly (an
 * unknown option or command, a missing argument, no command at all; an invalid configuration; an
 * image reference or upstream name that the config cannot use).
 * A failure is one line on stderr, `pullcache: <what went wrong>`, never a stack trace.
 *
 * A new command: `program.command(...)` through `withCommonOptions` (and `withListenOption` only if
 * it serves), and an action that throws what goes wrong, or `command.error(...)` for a usage
 * error; a command that works on the cache without serving does it in `withRuntime`, whose
 * `check` refuses what the config makes a usage error. Every error ends in `main`'s one error
 * path.
 */
import { Command, CommanderError, Help, InvalidArgumentError, Option } from 'commander';
import { ConfigError, loadConfig } from './config/load.js';
import { printConfig } from './config/print.js';
import type { Config } from './config/schema.js';
import { createLogger } from './log/logger.js';
import { readFileSync } from 'node:fs';
import { exportBundle } from './commands/bundle-export.js';
import { importBundle } from './commands/bundle-import.js';
import { UPSTREAM_NAME } from './config/schema.js';
import { parsePlatforms, prefetch, type PlatformFilter } from './commands/prefetch.js';
import { Progress } from './commands/progress.js';
import {
  formatImages,
  formatReport,
  formatUsage,
  openCacheAdmin,
  sortImages,
  tellServer,
  type SortKey,
} from './commands/cache.js';
import { formatBytes } from './config/units.js';
import { referenceProblems, upstreamProblem } from './commands/references.js';
import { fetchStatus, formatStatus, runningServer } from './commands/status.js';
import { createRuntime, type Runtime } from './runtime.js';
import { serve } from './commands/serve.js';

interface CommonOptions {
  config?: string;
  listen?: string;
  storageRoot?: string;
  cache?: string;
  redisUrl?: string;
  logLevel?: string;
  logFormat?: string;
}

/** The options every command takes: the config, storage, cache and logging; listed apart in help. */
function withCommonOptions(command: Command): Command {
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
function withListenOption(command: Command): Command {
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

/**
 * The command used wrongly in a way commander cannot see (a reference that cannot be used, an
 * upstream not configured): exit 2, one line per problem, before any work.
 */
class UsageError extends Error {
  constructor(readonly problems: string[]) {
    super(problems.join('; '));
  }
}

/** Throws UsageError when there are problems. */
function refuse(problems: string[]): void {
  if (problems.length > 0) throw new UsageError(problems);
}

const program = new Command()
  .name('pullcache')
  .description('A pull-through caching proxy for OCI/Docker container registries')
  .version('0.1.0')
  .showHelpAfterError()
  // Commander's exits become errors for `main` (set before the commands, which inherit it).
  .exitOverride();

withCommonOptions(
  withListenOption(
    program
      .command('serve')
      .description('serve the registry API, pulling misses through from the upstreams'),
  ),
).action(async (o: CommonOptions) => {
  await serve(configFrom(o));
});

withCommonOptions(
  withListenOption(
    program
      .command('config')
      .description('print the effective configuration (secrets redacted) and exit'),
  ),
).action((o: CommonOptions) => {
  process.stdout.write(printConfig(configFrom(o)));
});

/**
 * Runs a command on the runtime (storage, cache, clients) without serving; closes it after, and
 * exits with the code `work` gives. What `work` throws goes on to `main`, after the runtime is
 * closed; so does any error that escapes it (a stream error, a promise no one waited for).
 * `check` comes first, before the runtime opens anything: its problems are usage errors.
 */
async function withRuntime(
  o: CommonOptions,
  work: (runtime: Runtime, config: Config) => Promise<number>,
  /** What is wrong with the command line given the config: refused before any work. */
  check: (config: Config) => string[] = () => [],
): Promise<void> {
  process.on('uncaughtException', fail);
  process.on('unhandledRejection', fail);
  const config = configFrom(o);
  refuse(check(config));
  // The command talks to people on stderr; the logger only says what goes wrong.
  const log = createLogger({ level: o.logLevel ?? 'error', format: config.log.format });
  const runtime = await createRuntime(config, log);
  let code: number;
  try {
    code = await work(runtime, config);
  } finally {
    await runtime.close().catch(() => {});
    await new Promise<void>((resolve) => log.flush(() => resolve()));
  }
  process.exit(code);
}

withCommonOptions(
  program
    .command('prefetch')
    .description('pull images into the cache, as a client pull would, and report progress')
    .argument(
      '[references...]',
      'images as [upstream/]repository[:tag|@digest], e.g. alpine:3.20 or ghcr.io/org/app@sha256:...',
    )
    .option('-f, --file <file>', 'read references from a file, one per line (# starts a comment)')
    .option(
      '--platform <list>',
      'only these platforms of multi-platform images, e.g. linux/amd64,linux/arm64',
    ),
).action(
  async (
    references: string[],
    o: CommonOptions & { file?: string; platform?: string },
    command: Command,
  ) => {
    if (references.length === 0 && !o.file)
      command.error('error: nothing to prefetch: give references or --file');
    // The file's references are checked with the others, before any image is fetched.
    const refs = [...references];
    if (o.file) {
      for (const line of readFileSync(o.file, 'utf8').split('\n')) {
        const ref = line.replace(/#.*/, '').trim();
        if (ref) refs.push(ref);
      }
    }
    if (refs.length === 0) throw new Error(`nothing to prefetch: ${o.file} names no image`);
    await withRuntime(
      o,
      async (runtime, config) => {
        let platforms: PlatformFilter[] = [];
        if (o.platform) platforms = parsePlatforms(o.platform);
        const progress = new Progress();
        const results = await prefetch(runtime, config, refs, platforms, progress);
        progress.stop();
        await tellServer(runtime);
        const failed = results.filter((r) => !r.ok);
        console.error(
          `\n${results.length - failed.length} of ${results.length} images complete; fetched ${formatBytes(progress.bytes('fetched'))}, already cached ${formatBytes(progress.bytes('cached'))}`,
        );
        for (const f of failed) console.error(`  failed: ${f.reference}: ${f.error}`);
        return failed.length === 0 ? 0 : 1;
      },
      (config) => referenceProblems(config, refs),
    );
  },
);

withCommonOptions(
  program
    .command('export')
    .description('write cached images to an OCI image layout archive (needs no upstream)')
    .requiredOption(
      '-o, --output <file>',
      'the bundle to write (a tar archive); - writes it to standard output',
    )
    .option('--all', 'every tagged image in the cache')
    .argument('[references...]', 'images as [upstream/]repository[:tag|@digest]'),
).action(
  async (
    references: string[],
    o: CommonOptions & { output: string; all?: boolean },
    command: Command,
  ) => {
    if (!o.all && references.length === 0)
      command.error('error: nothing to export: give references or --all');
    const toStdout = o.output === '-';
    if (toStdout && process.stdout.isTTY)
      throw new Error(
        'refusing to write a bundle to a terminal: redirect standard output, or give -o FILE',
      );
    await withRuntime(
      o,
      async (runtime, config) => {
        const progress = new Progress();
        try {
          const result = await exportBundle(
            runtime,
            config,
            {
              references,
              all: Boolean(o.all),
              output: toStdout
                ? { stream: process.stdout, name: 'standard output' }
                : { path: o.output },
            },
            progress,
          );
          progress.stop();
          for (const warning of result.warnings) console.error(`  note: ${warning}`);
          console.error(
            `\nwrote ${toStdout ? 'the bundle to standard output' : o.output}: ${result.images} images, ${result.blobs} blobs, ${formatBytes(result.bytes)}`,
          );
          return 0;
        } finally {
          progress.stop();
        }
      },
      (config) => referenceProblems(config, references),
    );
  },
);

/** `--upstream-map lab.local=registry.internal[,from=to...]`, repeatable: one map of them all. */
function upstreamMapping(value: string, previous: Map<string, string> = new Map()) {
  const map = new Map(previous);
  for (const pair of value.split(',')) {
    const [from, to, extra] = pair.split('=').map((name) => name.trim());
    if (!from || !to || extra !== undefined || !UPSTREAM_NAME.test(from) || !UPSTREAM_NAME.test(to))
      throw new InvalidArgumentError(
        `Expected bundle-upstream=configured-upstream, e.g. lab.local=registry.internal.`,
      );
    if (map.has(from) && map.get(from) !== to)
      throw new InvalidArgumentError(`${from} is mapped twice.`);
    map.set(from, to);
  }
  return map;
}

withCommonOptions(
  program
    .command('import')
    .description(
      'read a bundle made by export into the cache; every blob is verified before it is kept',
    )
    .argument('<bundle>', 'the bundle (a tar archive); - reads it from standard input')
    .option(
      '--upstream-map <from=to>',
      "keep the bundle's images from upstream <from> under the configured upstream <to> (repeatable, or comma-separated)",
      upstreamMapping,
    ),
).action(async (bundle: string, o: CommonOptions & { upstreamMap?: Map<string, string> }) => {
  const fromStdin = bundle === '-';
  if (fromStdin && process.stdin.isTTY)
    throw new Error(
      'refusing to read a bundle from a terminal: redirect standard input, or give a file',
    );
  await withRuntime(o, async (runtime) => {
    const progress = new Progress();
    try {
      const result = await importBundle(
        runtime,
        fromStdin ? { stream: process.stdin, name: 'standard input' } : { path: bundle },
        progress,
        o.upstreamMap ? { upstreamMap: o.upstreamMap } : {},
      );
      progress.stop();
      await tellServer(runtime);
      for (const warning of result.warnings) console.error(`  note: ${warning}`);
      console.error(
        `\nimported ${fromStdin ? 'the bundle from standard input' : bundle}: ${result.images} images, ${result.blobs} blobs (${formatBytes(result.bytes)}): ${result.blobsAdded} added (${formatBytes(result.bytesAdded)}), ${result.blobsPresent} already present; ${result.tagsChanged} tags set`,
      );
      return 0;
    } finally {
      progress.stop();
    }
  });
});

// ---- the cache's lifecycle: through the running server's admin API when there is one ----------

const REFERENCES_ARGUMENT = [
  '<references...>',
  'images as [upstream/]repository[:tag|@digest]; a repository alone means all its images',
] as const;

withCommonOptions(
  program
    .command('ls')
    .description('list the cached images: references, digest, size, last pulled, pinned')
    .option('--upstream <name>', 'only the images of this upstream')
    .addOption(
      new Option('--sort <key>', 'order: most recently pulled, largest, or by name')
        .choices(['pulled', 'size', 'name'])
        .default('name'),
    )
    .option('--json', 'print a JSON array (references, digest, size, lastPulled, pinned...)'),
).action(async (o: CommonOptions & { upstream?: string; sort: SortKey; json?: boolean }) => {
  await withRuntime(
    o,
    async (runtime, config) => {
      const admin = await openCacheAdmin(runtime, config);
      const images = sortImages(
        (await admin.images()).filter((i) => o.upstream === undefined || i.upstream === o.upstream),
        o.sort,
      );
      process.stdout.write(o.json ? `${JSON.stringify(images, null, 2)}\n` : formatImages(images));
      return 0;
    },
    // A name not configured would list nothing, like an empty cache: a typo, told as one.
    (config) => {
      const problem = o.upstream === undefined ? undefined : upstreamProblem(config, o.upstream);
      return problem === undefined ? [] : [problem];
    },
  );
});

withCommonOptions(
  program
    .command('du')
    .description('show the bytes cached, the budget, free space and what was evicted')
    .option('--json', 'print a JSON object (bytes, blobs, images, maxSize, free...)'),
).action(async (o: CommonOptions & { json?: boolean }) => {
  await withRuntime(o, async (runtime, config) => {
    const usage = await (await openCacheAdmin(runtime, config)).usage();
    process.stdout.write(o.json ? `${JSON.stringify(usage, null, 2)}\n` : formatUsage(usage));
    return 0;
  });
});

withCommonOptions(
  program
    .command('pin')
    .description('never evict these images (kept in storage; retention.pins lists more)')
    .argument(...REFERENCES_ARGUMENT),
).action(async (references: string[], o: CommonOptions) => {
  await withRuntime(
    o,
    async (runtime, config) => {
      const pins = await (await openCacheAdmin(runtime, config)).pin(references);
      process.stdout.write(`pinned: ${pins.join(', ')}\n`);
      return 0;
    },
    (config) => referenceProblems(config, references),
  );
});

withCommonOptions(
  program
    .command('unpin')
    .description('let these images be evicted again (pins of the config file stay)')
    .argument(...REFERENCES_ARGUMENT),
).action(async (references: string[], o: CommonOptions) => {
  // Each once: a second `unpin a a` would find `a` gone, and call it not pinned.
  const unique = [...new Set(references)];
  await withRuntime(
    o,
    async (runtime, config) => {
      const notPinned = await (await openCacheAdmin(runtime, config)).unpin(unique);
      const unpinned = unique.filter((reference) => !notPinned.includes(reference));
      // As `pin` says what it did: silence after a change reads as nothing done.
      if (unpinned.length > 0) process.stdout.write(`unpinned: ${unpinned.join(', ')}\n`);
      for (const reference of notPinned)
        console.error(`pullcache: ${reference} was not pinned with pullcache pin`);
      return notPinned.length === 0 ? 0 : 1;
    },
    (config) => referenceProblems(config, unique),
  );
});

withCommonOptions(
  program
    .command('rm')
    .description('remove images now, with the blobs no kept image holds')
    .argument(...REFERENCES_ARGUMENT)
    .option('--dry-run', 'say what would be removed, and remove nothing'),
).action(async (references: string[], o: CommonOptions & { dryRun?: boolean }) => {
  await withRuntime(
    o,
    async (runtime, config) => {
      const report = await (
        await openCacheAdmin(runtime, config)
      ).remove(references, Boolean(o.dryRun));
      process.stdout.write(formatReport(report, 'rm'));
      for (const problem of report.problems) console.error(`pullcache: ${problem}`);
      return report.problems.length === 0 ? 0 : 1;
    },
    (config) => referenceProblems(config, references),
  );
});

withCommonOptions(
  program
    .command('gc')
    .description(
      'run the retention sweep (retention.unusedFor) and the garbage collection now, and say what was removed',
    )
    .option('--dry-run', 'say what would be removed, and remove nothing'),
).action(async (o: CommonOptions & { dryRun?: boolean }) => {
  await withRuntime(o, async (runtime, config) => {
    const report = await (await openCacheAdmin(runtime, config)).gc(Boolean(o.dryRun));
    process.stdout.write(formatReport(report, 'gc'));
    return 0;
  });
});

withCommonOptions(
  program
    .command('status')
    .description(
      "show the running server's overview: hit ratio, bytes saved, storage, upstreams, fetches, what went wrong lately",
    )
    .option('--url <url>', 'the server to ask (default: the one managing this storage)')
    .option('--json', 'print the status JSON (GET /_pullcache/v1/status)'),
).action(async (o: CommonOptions & { url?: string; json?: boolean }) => {
  await withRuntime(o, async (runtime, config) => {
    const url = o.url ?? (await runningServer(runtime));
    const status = await fetchStatus(url, config);
    process.stdout.write(
      o.json ? `${JSON.stringify(status, null, 2)}\n` : formatStatus(status, url),
    );
    return 0;
  });
});

/** The one error path: commander's own exits (usage, help, version), then every failure. */
function fail(err: unknown): never {
  if (err instanceof CommanderError) {
    // Commander has said what it had to say; a usage error exits 2, help and version 0.
    process.exit(err.exitCode === 0 ? 0 : 2);
  }
  if (err instanceof UsageError) {
    for (const problem of err.problems) console.error(`pullcache: ${problem}`);
    process.exit(2);
  }
  const message = err instanceof Error ? err.message : String(err);
  console.error(`pullcache: ${message.split('\n')[0]}`);
  process.exit(1);
}

try {
  await program.parseAsync(process.argv);
} catch (err) {
  fail(err);
}
