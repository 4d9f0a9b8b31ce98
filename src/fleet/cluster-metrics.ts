/**
 * `/metrics` with `server.workers`: a scrape reaches one worker, and must show the host. The
 * worker asks the primary over IPC; the primary collects every worker's registry through
 * prom-client's AggregatorRegistry (its own messages to the workers) and answers with the sum
 * (gauges of the storage and the upstreams, which every worker sees alike, by their own
 * aggregator: the highest, or the lowest for what is left of a pull limit).
 */
import cluster from 'node:cluster';
import { AggregatorRegistry, type Registry } from 'prom-client';
import { askPrimary } from './ask-primary.js';

type Ask = { pullcache: 'metrics'; t: 'collect'; token: number };
type Answer = { pullcache: 'metrics'; t: 'text'; token: number; text?: string; error?: string };

const isMetricsMessage = (m: unknown): m is Ask | Answer =>
  typeof m === 'object' && m !== null && (m as { pullcache?: unknown }).pullcache === 'metrics';

/** How long a worker waits for the host's metrics before it answers with its own. */
const COLLECT_TIMEOUT_MS = 6000;

/** In the primary: answers each worker's ask with every worker's metrics, aggregated. */
export function serveClusterMetrics(): void {
  const registry = new AggregatorRegistry();
  cluster.on('message', (worker, message: unknown) => {
    if (!isMetricsMessage(message) || message.t !== 'collect') return;
    const reply = (a: Omit<Answer, 'pullcache' | 't' | 'token'>) => {
      if (worker.isConnected())
        worker.send(
          { pullcache: 'metrics', t: 'text', token: message.token, ...a },
          undefined,
          () => {},
        );
    };
    registry.clusterMetrics().then(
      (text) => reply({ text }),
      (err: Error) => reply({ error: err.message }),
    );
  });
}

/**
 * In a worker: answers the primary's collections with `registry`, and gives the host's metrics
 * as text (this worker's own when the primary cannot answer: a scrape is never left hanging).
 */
export function workerMetrics(registry: Registry): () => Promise<string> {
  AggregatorRegistry.setRegistries([registry]);
  new AggregatorRegistry(); // adds the worker's listener for the primary's collections
  const ask = askPrimary<Answer>('metrics', 'text', COLLECT_TIMEOUT_MS);
  return async () => (await ask())?.text ?? registry.metrics();
}
