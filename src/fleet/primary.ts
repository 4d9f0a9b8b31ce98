/**
 * `server.workers`: the primary process of a host serving with several workers (node:cluster).
 * It only supervises: it forks the workers, which all accept connections on the one port (the
 * primary hands connections to them in turn), keeps the host's leases on digests (lease-table.ts)
 * so that a cold blob is fetched by one worker and followed by the others, passes on to the
 * others what a worker removed from storage (forget.ts), replaces a worker that dies (its clients
 * are cut, the others' are not), gathers the workers' metrics and status for a scrape or the
 * status page (cluster-metrics.ts, cluster-status.ts) and keeps the counts of the workers that
 * died in them (kept-counts.ts: the host's counters never go down while it lives), and on
 * SIGTERM or SIGINT stops every worker gracefully, then itself.
 *
 * A worker that exits before it ever listened (storage that takes no write, a port in use) is
 * not replaced: every worker would fail the same way, so the primary stops them all and exits
 * with that worker's code.
 */
import cluster, { type Worker } from 'node:cluster';
import { availableParallelism } from 'node:os';
import type { Logger } from '../log/logger.js';
import { serveClusterMetrics } from './cluster-metrics.js';
import { serveClusterStatus } from './cluster-status.js';
import { LeaseTable } from './lease-table.js';
import { isForgetMessage } from './forget-transports.js';
import { isLeaseMessage, type ToPrimary } from './messages.js';

/** Deaths within this long are counted: the more, the longer a replacement waits. */
const RESPAWN_WINDOW_MS = 60_000;
/** From this many deaths within the window, each is an error: something is wrong for good. */
const CRASH_LOOP = 5;
/** How long the primary waits for its workers to stop, past their drain, before it kills them. */
const STOP_TIMEOUT_MS = 15_000;

/** The number of workers `server.workers` asks for (0: one per core). */
export function workerCount(configured: number): number {
  return configured === 0 ? availableParallelism() : configured;
}

/**
 * Runs the primary until it is told to stop; resolves to the exit code. Call only in the
 * primary (`cluster.isPrimary`); the workers run the same program and serve.
 */
export function runPrimary(
  count: number,
  log: Logger,
  { drainTimeout = 0 }: { drainTimeout?: number } = {},
): Promise<number> {
  const plog = log.child({ module: 'primary' });
  const leases = new LeaseTable((id, message) => {
    const worker = cluster.workers?.[id];
    if (worker?.isConnected()) worker.send(message, undefined, () => {});
  });
  const listened = new Set<number>();
  let everListened = false;
  let stopping = false;
  let recentDeaths: number[] = [];
  let settle!: (code: number) => void;
  const result = new Promise<number>((resolve) => (settle = resolve));

  const fork = (): Worker => {
    const worker = cluster.fork();
    worker.on('message', (message: unknown) => {
      if (isLeaseMessage(message)) leases.receive(worker.id, message as ToPrimary);
      // A worker removed something from storage: every other worker drops it from memory.
      else if (isForgetMessage(message))
        for (const other of Object.values(cluster.workers ?? {}))
          if (other && other !== worker && other.isConnected())
            other.send(message, undefined, () => {});
    });
    worker.on('listening', () => {
      listened.add(worker.id);
      everListened = true;
    });
    return worker;
  };

  const killAll = (signal: NodeJS.Signals) => {
    for (const worker of Object.values(cluster.workers ?? {})) worker?.process.kill(signal);
  };
  /** Set when the workers had to be killed: the stop did not end cleanly. */
  let forced = false;
  const stop = (signal: string, code = 0) => {
    if (stopping) {
      // A second ^C: the workers stop now, their transfers cut.
      if (signal === 'SIGINT') {
        forced = true;
        killAll('SIGKILL');
      }
      return;
    }
    stopping = true;
    plog.info({ signal }, 'stopping the workers');
    // Each drains its transfers in flight (server.drainTimeout), then closes.
    killAll('SIGTERM');
    const force = setTimeout(() => {
      plog.error('workers did not stop in time: killing them');
      forced = true;
      killAll('SIGKILL');
    }, drainTimeout + STOP_TIMEOUT_MS);
    force.unref();
    const check = () => {
      if (Object.keys(cluster.workers ?? {}).length === 0) settle(forced && code === 0 ? 1 : code);
    };
    cluster.on('exit', check);
    check();
  };

  cluster.on('exit', (worker, code, signal) => {
    leases.workerGone(worker.id);
    const hadListened = listened.delete(worker.id);
    if (stopping) return;
    if (!hadListened && !everListened) {
      plog.error({ worker: worker.id, code, signal }, 'worker failed to start: stopping');
      stop('worker failed', code || 1);
      return;
    }
    const now = Date.now();
    recentDeaths = recentDeaths.filter((t) => now - t < RESPAWN_WINDOW_MS);
    recentDeaths.push(now);
    const death = { worker: worker.id, pid: worker.process.pid, code, signal };
    if (recentDeaths.length >= CRASH_LOOP)
      plog.error(
        { ...death, deathsInLastMinute: recentDeaths.length },
        'workers keep dying: replacing it, more slowly (see the worker logs above)',
      );
    else plog.warn(death, 'worker died: replacing it');
    // A worker that keeps dying is replaced more and more slowly (up to 5 s), never given up on.
    const delay = Math.min(5000, 100 * 2 ** (recentDeaths.length - 1));
    setTimeout(
      () => {
        if (!stopping) fork();
      },
      recentDeaths.length > 1 ? delay : 0,
    );
  });

  serveClusterMetrics();
  serveClusterStatus();
  process.on('SIGTERM', () => stop('SIGTERM'));
  process.on('SIGINT', () => stop('SIGINT'));
  for (let i = 0; i < count; i++) fork();
  plog.info({ workers: count }, 'workers started');
  return result;
}
