/**
 * How a `pullcache` command runs and ends. A command that works on the cache without serving
 * does it in `withRuntime`, whose `check` refuses what the config makes a usage error; every
 * error ends in `fail`, the one error path: exit 0 for help and version, 2 for a usage error
 * (commander's, or a UsageError), 1 for any other failure, told as one line on stderr,
 * `pullcache: <what went wrong>`, never a stack trace. An interruptible command stopped by ^C or
 * SIGTERM cleans up what it leaves, then says `pullcache: interrupted` and exits 130.
 */
import { CommanderError } from 'commander';
import type { Config } from '../config/schema.js';
import { createLogger } from '../log/logger.js';
import { createRuntime, type Runtime } from '../runtime.js';
import { configFrom, type CommonOptions } from './options.js';

/**
 * The command used wrongly in a way commander cannot see (a reference that cannot be used, an
 * upstream not configured): exit 2, one line per problem, before any work.
 */
class UsageError extends Error {
  constructor(readonly problems: string[]) {
    super(problems.join('; '));
  }
}

/** The exit code of a command stopped by ^C or SIGTERM, after its cleanup (128 + SIGINT). */
const INTERRUPTED = 130;

/** Throws UsageError when there are problems. */
function refuse(problems: string[]): void {
  if (problems.length > 0) throw new UsageError(problems);
}

/**
 * Runs a command on the runtime (storage, cache, clients) without serving; closes it after, and
 * exits with the code `work` gives. What `work` throws goes on to `fail` (through cli.ts), after
 * the runtime is closed; so does any error that escapes it (a stream error, a promise no one
 * waited for).
 * `check` comes first, before the runtime opens anything: its problems are usage errors.
 * `interruptible`: ^C (SIGINT) and SIGTERM abort the `signal` given to `work` instead of killing
 * the process, so that it can remove what it leaves (a partial bundle, upload sessions); when
 * `work` then fails, the command says `pullcache: interrupted` and exits 130, after the runtime
 * is closed. A second signal exits at once. Otherwise the signals end the process as usual.
 * `upstreams`: the command dials upstreams (prefetch): their secrets named by the config must be
 * in the environment (config/load.ts). No command is a replica others follow: none needs the
 * peers' secret, and none takes a fetch lease others would follow at `server.advertise`.
 */
export async function withRuntime(
  o: CommonOptions,
  work: (runtime: Runtime, config: Config, signal: AbortSignal) => Promise<number>,
  /** What is wrong with the command line given the config: refused before any work. */
  check: (config: Config) => string[] = () => [],
  options: { interruptible?: boolean; upstreams?: boolean } = {},
): Promise<void> {
  process.on('uncaughtException', fail);
  process.on('unhandledRejection', fail);
  const config = configFrom(o, options.upstreams ? 'upstreams' : 'storage');
  refuse(check(config));
  const interrupt = new AbortController();
  // The command talks to people on stderr; the logger only says what goes wrong.
  const log = createLogger({ level: o.logLevel ?? 'error', format: config.log.format });
  const runtime = await createRuntime(config, log);
  // Only once the runtime is open: before, ^C ends the process at once (nothing to clean up),
  // rather than waiting for a slow Redis or object store to answer first.
  if (options.interruptible) {
    const onSignal = (name: NodeJS.Signals) => {
      if (interrupt.signal.aborted) process.exit(INTERRUPTED);
      interrupt.abort(new Error(`interrupted (${name})`));
    };
    process.on('SIGINT', onSignal);
    process.on('SIGTERM', onSignal);
  }
  let code: number;
  try {
    code = await work(runtime, config, interrupt.signal);
  } catch (err) {
    // Whatever stopped the work once it was interrupted, the interruption is what happened.
    if (!interrupt.signal.aborted) throw err;
    code = INTERRUPTED;
  } finally {
    await runtime.close().catch(() => {});
    await new Promise<void>((resolve) => log.flush(() => resolve()));
  }
  if (code === INTERRUPTED && interrupt.signal.aborted) console.error('pullcache: interrupted');
  process.exit(code);
}

/** The one error path: commander's own exits (usage, help, version), then every failure. */
export function fail(err: unknown): never {
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
