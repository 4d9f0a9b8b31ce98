/**
 * A worker's question to its primary over the cluster's IPC channel, answered by a message of the
 * same `pullcache` kind carrying the question's token (cluster-metrics.ts, cluster-status.ts).
 */

/**
 * Returns the asking: it sends `{pullcache: kind, t: 'collect', token}` and resolves to the
 * answer (`{pullcache: kind, t: answer, token, ...}`), or to undefined without a primary or
 * after `timeoutMs`.
 */
export function askPrimary<A extends { token: number }>(
  kind: string,
  answer: string,
  timeoutMs: number,
): () => Promise<A | undefined> {
  let next = 0;
  const waiting = new Map<number, (a: A) => void>();
  process.on('message', (message: unknown) => {
    const m = message as Partial<{ pullcache: unknown; t: unknown; token: number }> | null;
    if (typeof m !== 'object' || m === null || m.pullcache !== kind || m.t !== answer) return;
    waiting.get(m.token!)?.(m as A);
  });
  return async () => {
    if (!process.connected) return undefined;
    const token = ++next;
    try {
      return await new Promise<A | undefined>((resolve) => {
        const timer = setTimeout(() => resolve(undefined), timeoutMs);
        waiting.set(token, (a) => {
          clearTimeout(timer);
          resolve(a);
        });
        process.send?.({ pullcache: kind, t: 'collect', token });
      });
    } finally {
      waiting.delete(token);
    }
  };
}
