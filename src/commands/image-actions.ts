/**
 * The actions of `pullcache prefetch | export | import` (their options are defined in cli.ts):
 * what each reads from its command line, the work it runs on the runtime (prefetch.ts,
 * bundle-export.ts, bundle-import.ts), and what it tells the user on stderr. A command line that
 * cannot be used is refused before any image is fetched or written.
 */
import { readFileSync } from 'node:fs';
import { InvalidArgumentError, type Command } from 'commander';
import { UPSTREAM_NAME } from '../config/schema.js';
import { formatBytes } from '../config/units.js';
import { exportBundle } from './bundle-export.js';
import { importBundle, type ImportOptions } from './bundle-import.js';
import { tellServer } from './cache.js';
import type { CommonOptions } from './options.js';
import { parsePlatforms, prefetch, type PlatformFilter } from './prefetch.js';
import { Progress } from './progress.js';
import { referenceProblems } from './references.js';
import { withRuntime } from './run.js';

/** `pullcache prefetch [references...] [--file FILE] [--platform LIST]` */
export async function runPrefetch(
  references: string[],
  o: CommonOptions & { file?: string; platform?: string },
  command: Command,
): Promise<void> {
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
    // It pulls: the upstreams' secrets must be in the environment.
    { upstreams: true },
  );
}

/** `pullcache export -o FILE|- [--all] [references...]` */
export async function runExport(
  references: string[],
  o: CommonOptions & { output: string; all?: boolean },
  command: Command,
): Promise<void> {
  if (!o.all && references.length === 0)
    command.error('error: nothing to export: give references or --all');
  const toStdout = o.output === '-';
  if (toStdout && process.stdout.isTTY)
    throw new Error(
      'refusing to write a bundle to a terminal: redirect standard output, or give -o FILE',
    );
  await withRuntime(
    o,
    async (runtime, config, signal) => {
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
            signal,
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
    // To a file: ^C removes the partial file. (Standard output has nothing to remove, and a
    // write to a pipe that is not read blocks the process, signal handlers and all.)
    { interruptible: !toStdout },
  );
}

/** `--upstream-map lab.local=registry.internal[,from=to...]`, repeatable: one map of them all. */
export function upstreamMapping(value: string, previous: Map<string, string> = new Map()) {
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

/** `pullcache import BUNDLE|- [--upstream-map FROM=TO...]` */
export async function runImport(
  bundle: string,
  o: CommonOptions & { upstreamMap?: Map<string, string> },
): Promise<void> {
  const fromStdin = bundle === '-';
  if (fromStdin && process.stdin.isTTY)
    throw new Error(
      'refusing to read a bundle from a terminal: redirect standard input, or give a file',
    );
  await withRuntime(
    o,
    async (runtime, _config, signal) => {
      const progress = new Progress();
      // The import stops and cancels its upload sessions when `signal` aborts (^C).
      const options: ImportOptions = {
        ...(o.upstreamMap ? { upstreamMap: o.upstreamMap } : {}),
        signal,
      };
      try {
        const result = await importBundle(
          runtime,
          fromStdin ? { stream: process.stdin, name: 'standard input' } : { path: bundle },
          progress,
          options,
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
    },
    undefined,
    { interruptible: true },
  );
}
