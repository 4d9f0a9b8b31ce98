/**
 * `/metrics` with `server.workers`: a scrape reaches one worker, and must show the host. The
 * worker asks the primary (`collect`); the primary asks every worker for its registry (`ask`,
 * answered by `own`) and answers (`text`) with their sum, made by prom-client's
 * AggregatorRegistry (gauges of the storage and the upstreams, which every worker sees alike, by
 * their own aggregator: the highest, or the lowest for what is left of a pull limit).
 *
 * The host's counters must never go down while the primary lives (kept-counts.ts): so the
 * primary keeps each worker's last registry, from each scrape and from a `report` every worker
 * sends every few seconds unasked, and when a worker is gone adds its counters and histograms
 * to those kept for every worker gone. The reports are what a worker killed with SIGKILL leaves:
 * it says nothing as it dies, and without them its counts since the last scrape (or since its
 * start, on a host nobody scrapes) would be lost. A worker that does not answer in time is
 * counted by its last registry, too.
 */
import cluster, { type Worker } from 'node:cluster';
import { AggregatorRegistry, type Registry } from 'prom-client';
import { askPrimary } from './ask-primary.js';
import { keepCounters, type MetricJson } from './kept-counts.js';

type Message =
  | { pullcache: 'metrics'; t: 'collect'; token: number }
  | { pullcache: 'metrics'; t: 'ask'; id: number }
  /** `n`: the worker's count of the registries it made, so that an older one is told apart. */
  | { pullcache: 'metrics'; t: 'own'; id: number; n: number; metrics: MetricJson[] }
  | { pullcache: 'metrics'; t: 'report'; n: number; metrics: MetricJson[] }
  | { pullcache: 'metrics'; t: 'text'; token: number; text?: string; error?: string };
type Answer = Extract<Message, { t: 'text' }>;

const isMetricsMessage = (m: unknown): m is Message =>
  typeof m === 'object' && m !== null && (m as { pullcache?: unknown }).pullcache === 'metrics';

/** How long a worker waits for the host's metrics before it answers with its own. */
const COLLECT_TIMEOUT_MS = 6000;
/** How long the primary waits for the workers' registries; the others count by their last. */
const ASK_TIMEOUT_MS = 3000;
/**
 * How often a worker sends its registry unasked: what a worker killed loses of the host's counts.
 * A registry is some tens of kB, made in a millisecond or two.
 */
const REPORT_INTERVAL_MS = 5000;

/** In the primary: answers each worker's ask with every worker's metrics, aggregated. */
export function serveClusterMetrics(): void {
  /** Each live worker's last registry, by worker id. */
  const last = new Map<number, { n: number; metrics: MetricJson[] }>();
  /** The counters and histograms of the workers gone, summed. */
  let kept: MetricJson[] = [];
  /** Workers whose registry went to `kept`: anything they still said would count twice. */
  const gone = new WeakSet<Worker>();
  const asks = new Map<number, { pending: Set<number>; done: () => void }>();
  let next = 0;

  const answered = (id: number, ask: { pending: Set<number>; done: () => void } | undefined) => {
    if (ask?.pending.delete(id) && ask.pending.size === 0) ask.done();
  };

  cluster.on('message', (worker: Worker, message: unknown) => {
    if (!isMetricsMessage(message)) return;
    if (message.t === 'own' || message.t === 'report') {
      // Two registries made at once may come in either order: the older says less.
      if (!gone.has(worker) && message.n > (last.get(worker.id)?.n ?? 0))
        last.set(worker.id, { n: message.n, metrics: message.metrics });
      if (message.t === 'own') answered(worker.id, asks.get(message.id));
      return;
    }
    if (message.t !== 'collect') return;
    const reply = (a: Omit<Answer, 'pullcache' | 't' | 'token'>) => {
      if (worker.isConnected())
        worker.send(
          { pullcache: 'metrics', t: 'text', token: message.token, ...a },
          undefined,
          () => {},
        );
    };
    const id = ++next;
    const workers = Object.values(cluster.workers ?? {}).filter((w) => w?.isConnected());
    const ask = { pending: new Set(workers.map((w) => w!.id)), done: () => {} };
    const timer = setTimeout(() => ask.done(), ASK_TIMEOUT_MS);
    ask.done = () => {
      clearTimeout(timer);
      asks.delete(id);
      // Every live worker by its answer (or its last report), and the workers gone.
      let registry;
      try {
        registry = AggregatorRegistry.aggregate([
          ...[...last.values()].map((l) => l.metrics),
          kept,
        ]);
      } catch (err) {
        return reply({ error: (err as Error).message });
      }
      registry.metrics().then(
        (text) => reply({ text }),
        (err: Error) => reply({ error: err.message }),
      );
    };
    asks.set(id, ask);
    if (ask.pending.size === 0) return ask.done();
    for (const w of workers) w!.send({ pullcache: 'metrics', t: 'ask', id }, undefined, () => {});
  });

  // A worker's last message comes before its channel closes: its registry is complete here.
  cluster.on('disconnect', (worker: Worker) => {
    gone.add(worker);
    const its = last.get(worker.id);
    last.delete(worker.id);
    if (its) kept = keepCounters(kept, its.metrics);
    for (const ask of asks.values()) answered(worker.id, ask);
  });
}

/**
 * In a worker: answers the primary's asks with `registry`, reports it every few seconds, and
 * gives the host's metrics as text (this worker's own when the primary cannot answer: a scrape
 * is never left hanging).
 */
export function workerMetrics(registry: Registry): () => Promise<string> {
  const send = (message: Message) => {
    if (process.connected) process.send?.(message, undefined, {}, () => {});
  };
  let made = 0;
  const tell = (answer: { t: 'own'; id: number } | { t: 'report' }) => {
    const n = ++made;
    void registry.getMetricsAsJSON().then(
      (metrics) => send({ pullcache: 'metrics', ...answer, n, metrics }),
      () => {},
    );
  };
  process.on('message', (message: unknown) => {
    if (isMetricsMessage(message) && message.t === 'ask') tell({ t: 'own', id: message.id });
  });
  const report = setInterval(() => {
    if (process.connected) tell({ t: 'report' });
  }, REPORT_INTERVAL_MS);
  report.unref();
  const ask = askPrimary<Answer>('metrics', 'text', COLLECT_TIMEOUT_MS);
  return async () => (await ask())?.text ?? registry.metrics();
}
