/**
 * `/metrics` with `server.workers`: a scrape reaches one worker, and must show the host. The
 * worker asks the primary over IPC; the primary collects every worker's registry through
 * prom-client's AggregatorRegistry (its own messages to the workers) and answers with the sum
 * (gauges of the storage and the upstreams, which every worker sees alike, by their own
 * aggregator: the highest, or the lowest for what is left of a pull limit).
 */
import cluster from 'node:cluster';
import { AggregatorRegistry, type Registry } from 'prom-client';

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
  let next = 0;
  const waiting = new Map<number, (answer: Answer | undefined) => void>();
  process.on('message', (message: unknown) => {
    if (!isMetricsMessage(message) || message.t !== 'text') return;
    waiting.get(message.token)?.(message);
  });
  return async () => {
    if (!process.connected) return registry.metrics();
    const token = ++next;
    const answer = await new Promise<Answer | undefined>((resolve) => {
      const timer = setTimeout(() => resolve(undefined), COLLECT_TIMEOUT_MS);
      waiting.set(token, (a) => {
        clearTimeout(timer);
        resolve(a);
      });
      process.send?.({ pullcache: 'metrics', t: 'collect', token } satisfies Ask);
    });
    waiting.delete(token);
    return answer?.text ?? registry.metrics();
  };
}
