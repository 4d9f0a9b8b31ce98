/**
 * The actions of `pullcache ls | du | pin | unpin | rm | gc | status` (their options are defined
 * in cli.ts): each runs on the runtime, through the cache's admin (cache.ts: the running server's
 * admin API when there is one, storage otherwise) or the running server's status (status.ts),
 * prints its answer on stdout (JSON with `--json`), and exits 1 when part of it failed.
 */
import {
  formatImages,
  formatReport,
  formatUsage,
  openCacheAdmin,
  sortImages,
  type SortKey,
} from './cache.js';
import type { CommonOptions } from './options.js';
import { referenceProblems, upstreamProblem } from './references.js';
import { withRuntime } from './run.js';
import { fetchStatus, formatStatus, runningServer } from './status.js';

/** `pullcache ls [--upstream NAME] [--sort KEY] [--json]` */
export async function runLs(
  o: CommonOptions & { upstream?: string; sort: SortKey; json?: boolean },
): Promise<void> {
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
}

/** `pullcache du [--json]` */
export async function runDu(o: CommonOptions & { json?: boolean }): Promise<void> {
  await withRuntime(o, async (runtime, config) => {
    const usage = await (await openCacheAdmin(runtime, config)).usage();
    process.stdout.write(o.json ? `${JSON.stringify(usage, null, 2)}\n` : formatUsage(usage));
    return 0;
  });
}

/** `pullcache pin <references...>` */
export async function runPin(references: string[], o: CommonOptions): Promise<void> {
  await withRuntime(
    o,
    async (runtime, config) => {
      const pins = await (await openCacheAdmin(runtime, config)).pin(references);
      process.stdout.write(`pinned: ${pins.join(', ')}\n`);
      return 0;
    },
    (config) => referenceProblems(config, references),
  );
}

/** `pullcache unpin <references...>` */
export async function runUnpin(references: string[], o: CommonOptions): Promise<void> {
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
}

/** `pullcache rm <references...> [--dry-run]` */
export async function runRm(
  references: string[],
  o: CommonOptions & { dryRun?: boolean },
): Promise<void> {
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
}

/** `pullcache gc [--dry-run]` */
export async function runGc(o: CommonOptions & { dryRun?: boolean }): Promise<void> {
  await withRuntime(o, async (runtime, config) => {
    const report = await (await openCacheAdmin(runtime, config)).gc(Boolean(o.dryRun));
    process.stdout.write(formatReport(report, 'gc'));
    return 0;
  });
}

/** `pullcache status [--url URL] [--json]` */
export async function runStatus(
  o: CommonOptions & { url?: string; json?: boolean },
): Promise<void> {
  await withRuntime(o, async (runtime, config) => {
    const url = o.url ?? (await runningServer(runtime));
    const status = await fetchStatus(url, config);
    process.stdout.write(
      o.json ? `${JSON.stringify(status, null, 2)}\n` : formatStatus(status, url),
    );
    return 0;
  });
}
