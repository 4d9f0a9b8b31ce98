/**
 * `pullcache serve`: the process around the server. With `server.workers` the primary only
 * supervises the workers (fleet/primary.ts), which run this same command. A serving process
 * installs its signal handlers before it starts (a pod may be stopped as it comes up), drains on
 * SIGTERM or ^C for `server.drainTimeout`, and exits 0 once closed; a second ^C, or a closing
 * that outlasts the drain by 10 s, exits 1. A start that fails exits 2 for a configuration
 * problem, 1 otherwise, with one line on stderr.
 */
import cluster from 'node:cluster';
import { ConfigError } from '../config/load.js';
import type { Config } from '../config/schema.js';
import { formatDuration } from '../config/units.js';
import { runPrimary, workerCount } from '../fleet/primary.js';
import { createLogger } from '../log/logger.js';
import { startServer, type RunningServer } from '../server.js';

export async function serve(config: Config): Promise<void> {
  const base = createLogger({ level: config.log.level, format: config.log.format });
  // `server.workers`: each worker's lines say which one it is (its pid).
  const log = cluster.isWorker ? base.child({ worker: process.pid }) : base;
  if (cluster.isPrimary && workerCount(config.server.workers) > 1) {
    // `server.workers`: this process supervises; the workers run this same command and serve.
    const code = await runPrimary(workerCount(config.server.workers), log, {
      drainTimeout: config.server.drainTimeout,
    });
    // The last line of a stop: the supervisor knows the whole fleet has gone.
    if (code === 0) log.info('stopped');
    log.flush(() => process.exit(code));
    return;
  }
  let running: RunningServer | undefined;
  let stopping = false;
  // Logs go out asynchronously: flush them before the process ends, or the last lines are lost.
  const exit = (code: number) => log.flush(() => process.exit(code));
  const drain = config.server.drainTimeout;
  const close = (server: RunningServer) =>
    void server.close({ drain }).then(
      () => {
        // The last line of a stop, so that a log says the server is gone, not only going.
        log.info('stopped');
        exit(0);
      },
      (err: unknown) => {
        log.error({ err }, 'shutdown failed');
        exit(1);
      },
    );
  const stop = (signal: string) => {
    if (stopping) {
      // A second ^C: stop now. A second SIGTERM changes nothing: a service manager may send
      // one to every process of the group, and a worker hears one from the primary too.
      if (signal === 'SIGINT') exit(1);
      return;
    }
    stopping = true;
    // In the config's own form ("20s"), not milliseconds under the config's name.
    log.info({ signal, drainTimeout: formatDuration(drain) }, 'shutting down');
    // The transfers in flight get `drain`; the rest of the closing (storage, Redis) 10 s more.
    const force = setTimeout(() => {
      log.error({ signal }, 'shutdown did not finish in time: exiting anyway');
      exit(1);
    }, drain + 10_000);
    force.unref();
    // Still starting: it stops as soon as it has started (below).
    if (running) close(running);
  };
  // From the start: a signal while it starts (a pod stopped as it comes up) stops it cleanly too.
  if (cluster.isWorker) {
    // The primary stops the workers (SIGTERM); a terminal's ^C reaches them through it. A
    // worker whose primary is gone stops too.
    process.on('SIGINT', () => {});
    process.on('disconnect', () => stop('disconnect'));
  } else process.on('SIGINT', () => stop('SIGINT'));
  process.on('SIGTERM', () => stop('SIGTERM'));
  try {
    running = await startServer(config, log);
  } catch (err) {
    if (err instanceof ConfigError) {
      // What start-up found (storage that takes no write): a config problem, one line.
      console.error(`pullcache: cannot start: ${err.problems.join('; ')}`);
      process.exit(2);
    }
    const e = err as NodeJS.ErrnoException;
    // An address that is not this host's, or a name that does not resolve: the config's.
    const foreign: Record<string, string> = {
      EADDRNOTAVAIL: 'not an address of this host',
      ENOTFOUND: 'no such host',
      EAI_AGAIN: 'the host name does not resolve now',
    };
    const listenHost = config.server.listen.slice(0, config.server.listen.lastIndexOf(':'));
    const ofListen =
      e.syscall === 'listen' ||
      (e.syscall === 'getaddrinfo' && (e as { hostname?: string }).hostname === listenHost);
    if (ofListen && e.code !== undefined && foreign[e.code] !== undefined) {
      console.error(
        `pullcache: cannot start: server.listen: cannot listen on ${config.server.listen}: ${foreign[e.code]} (${e.code})`,
      );
      process.exit(2);
    }
    console.error(
      `pullcache: cannot start: ${e.code === 'EADDRINUSE' ? `${config.server.listen} is already in use` : e.code === 'EACCES' ? `no permission to listen on ${config.server.listen} or to use ${config.storage.filesystem.root}` : e.message}`,
    );
    process.exit(1);
  }
  if (stopping) close(running);
  if (process.env.PULLCACHE_TEST_FOLLOWERS) {
    // Diagnosis of stuck transfers: SIGUSR2 logs every client following an upstream fetch.
    const { liveFollowers } = await import('../proxy/blob-follower.js');
    process.on('SIGUSR2', () => {
      for (const f of liveFollowers) log.warn({ follower: f.describe() }, 'follower');
      log.warn({ count: liveFollowers.size }, 'followers listed');
    });
  }
}
