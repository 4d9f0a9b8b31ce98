#!/usr/bin/env node
/**
 * The `pullcache` command: one verb per command, each with its arguments and options; what each
 * does is in commands/ (serve.ts, image-actions.ts, cache-actions.ts). Exit codes: 0 done, 1
 * failed, 2 used wrongly (an unknown option or command, a missing argument, no command at all; an
 * invalid configuration; an image reference or upstream name that the config cannot use).
 * A failure is one line on stderr, `pullcache: <what went wrong>`, never a stack trace.
 *
 * A new command: `program.command(...)` through `withCommonOptions` (and `withListenOption` only if
 * it serves), and an action that throws what goes wrong, or `command.error(...)` for a usage
 * error; a command that works on the cache without serving does it in `withRuntime`
 * (commands/run.ts), whose `check` refuses what the config makes a usage error. Every error ends
 * in `fail`, the one error path.
 */
import { Command, Option } from 'commander';
import { printConfig } from './config/print.js';
import {
  runDu,
  runGc,
  runLs,
  runPin,
  runRm,
  runStatus,
  runUnpin,
} from './commands/cache-actions.js';
import { runExport, runImport, runPrefetch, upstreamMapping } from './commands/image-actions.js';
import {
  configFrom,
  withCommonOptions,
  withListenOption,
  type CommonOptions,
} from './commands/options.js';
import { fail } from './commands/run.js';
import { serve } from './commands/serve.js';

const program = new Command()
  .name('pullcache')
  .description('A pull-through caching proxy for OCI/Docker container registries')
  .version('0.1.0')
  .showHelpAfterError()
  // Commander's exits become errors for `fail` (set before the commands, which inherit it).
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
).action(runPrefetch);

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
).action(runExport);

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
).action(runImport);

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
).action(runLs);

withCommonOptions(
  program
    .command('du')
    .description('show the bytes cached, the budget, free space and what was evicted')
    .option('--json', 'print a JSON object (bytes, blobs, images, maxSize, free...)'),
).action(runDu);

withCommonOptions(
  program
    .command('pin')
    .description('never evict these images (kept in storage; retention.pins lists more)')
    .argument(...REFERENCES_ARGUMENT),
).action(runPin);

withCommonOptions(
  program
    .command('unpin')
    .description('let these images be evicted again (pins of the config file stay)')
    .argument(...REFERENCES_ARGUMENT),
).action(runUnpin);

withCommonOptions(
  program
    .command('rm')
    .description('remove images now, with the blobs no kept image holds')
    .argument(...REFERENCES_ARGUMENT)
    .option('--dry-run', 'say what would be removed, and remove nothing'),
).action(runRm);

withCommonOptions(
  program
    .command('gc')
    .description(
      'run the retention sweep (retention.unusedFor) and the garbage collection now, and say what was removed',
    )
    .option('--dry-run', 'say what would be removed, and remove nothing'),
).action(runGc);

withCommonOptions(
  program
    .command('status')
    .description(
      "show the running server's overview: hit ratio, bytes saved, storage, upstreams, fetches, what went wrong lately",
    )
    .option('--url <url>', 'the server to ask (default: the one managing this storage)')
    .option('--json', 'print the status JSON (GET /_pullcache/v1/status)'),
).action(runStatus);

try {
  await program.parseAsync(process.argv);
} catch (err) {
  fail(err);
}
