/**
 * The status page with `server.workers`: its polls reach a different worker each time, so each
 * must show the host, not itself (the chart would jump between workers' figures). The worker
 * asked sends `collect` to the primary, which asks every worker for its own status (`ask`, `own`)
 * and hands the set back (`all`); the worker asked merges them (`mergeStatuses`). The primary
 * only relays: it holds no status of its own.
 */
import cluster, { type Worker } from 'node:cluster';
import type { Status, UpstreamState } from '../status/status.js';
import type { FetchProgress } from '../proxy/inflight.js';
import { askPrimary } from './ask-primary.js';

type Message =
  | { pullcache: 'status'; t: 'collect'; token: number }
  | { pullcache: 'status'; t: 'ask'; id: number }
  | { pullcache: 'status'; t: 'own'; id: number; status: Status }
  | { pullcache: 'status'; t: 'all'; token: number; statuses: Status[] };

const isStatusMessage = (m: unknown): m is Message =>
  typeof m === 'object' && m !== null && (m as { pullcache?: unknown }).pullcache === 'status';

/** How long the primary waits for the workers' answers; those that have not answered are left out. */
const ASK_TIMEOUT_MS = 2000;
/** How long a worker waits for the primary before it answers with its own status. */
const COLLECT_TIMEOUT_MS = 4000;

/** In the primary: relays a worker's `collect` to every worker and hands back their answers. */
export function serveClusterStatus(): void {
  let next = 0;
  const asks = new Map<number, { statuses: Status[]; pending: number; done: () => void }>();
  cluster.on('message', (worker: Worker, message: unknown) => {
    if (!isStatusMessage(message)) return;
    if (message.t === 'own') {
      const ask = asks.get(message.id);
      if (!ask) return;
      ask.statuses.push(message.status);
      if (--ask.pending === 0) ask.done();
      return;
    }
    if (message.t !== 'collect') return;
    const id = ++next;
    const workers = Object.values(cluster.workers ?? {}).filter((w) => w?.isConnected());
    const ask = { statuses: [] as Status[], pending: workers.length, done: () => {} };
    const timer = setTimeout(() => ask.done(), ASK_TIMEOUT_MS);
    ask.done = () => {
      clearTimeout(timer);
      asks.delete(id);
      if (worker.isConnected())
        worker.send(
          { pullcache: 'status', t: 'all', token: message.token, statuses: ask.statuses },
          undefined,
          () => {},
        );
    };
    asks.set(id, ask);
    for (const w of workers) w!.send({ pullcache: 'status', t: 'ask', id }, undefined, () => {});
  });
}

/**
 * In a worker: answers the primary's asks with `own()`, and gives the host's status (this
 * worker's own when the primary does not answer in time).
 */
export function workerStatus(
  own: (viewer: { admin: boolean }) => Promise<Status>,
): (viewer: { admin: boolean }) => Promise<Status> {
  process.on('message', (message: unknown) => {
    if (!isStatusMessage(message) || message.t !== 'ask') return;
    void own({ admin: false }).then(
      (status) => process.send?.({ pullcache: 'status', t: 'own', id: message.id, status }),
      () => {},
    );
  });
  const ask = askPrimary<Extract<Message, { t: 'all' }>>('status', 'all', COLLECT_TIMEOUT_MS);
  return async (viewer) => {
    // The primary's answer holds this worker's own status too: it is not made twice.
    const all = await ask();
    const [first] = all?.statuses ?? [];
    return first ? mergeStatuses({ ...first, viewer }, all!.statuses) : own(viewer);
  };
}

/**
 * The host's status from each worker's: traffic and its history summed (the history point by
 * point from now back: the workers sample every 10 s, started within moments of each other),
 * storage as the worker that knows most of it counts it (the owner, which scanned it all),
 * upstreams by their latest news, fetches once per digest, recent events newest first. The
 * rest (version, viewer, now) is `base`'s: the answering worker's.
 */
export function mergeStatuses(base: Status, all: Status[]): Status {
  const sum = (pick: (s: Status) => number) => all.reduce((n, s) => n + pick(s), 0);
  const hits = sum((s) => s.traffic.hits);
  const misses = sum((s) => s.traffic.misses);
  const hitBytes = sum((s) => s.traffic.hitBytes);
  const missBytes = sum((s) => s.traffic.missBytes);
  const upstreamBytes = sum((s) => s.traffic.upstreamBytes);
  const served = hitBytes + missBytes;
  // The times of the longest history (the oldest worker's), now last.
  const points = all.reduce(
    (a, s) => (s.history.points.length > a.length ? s.history.points : a),
    base.history.points,
  );
  const history = points.map((p, i) => {
    const back = points.length - i;
    const at = (s: Status) => s.history.points[s.history.points.length - back];
    const total = (key: 'hits' | 'misses' | 'hitBytes' | 'missBytes' | 'upstreamBytes') =>
      all.reduce((n, s) => n + (at(s)?.[key] ?? 0), 0);
    return {
      t: back === 1 ? base.history.points.at(-1)!.t : p.t,
      hits: total('hits'),
      misses: total('misses'),
      hitBytes: total('hitBytes'),
      missBytes: total('missBytes'),
      upstreamBytes: total('upstreamBytes'),
    };
  });
  const newest = <T extends { at: string }>(xs: T[]) =>
    xs.sort((a, b) => (a.at < b.at ? 1 : a.at > b.at ? -1 : 0));
  return {
    ...base,
    startedAt: all.map((s) => s.startedAt).sort()[0] ?? base.startedAt,
    traffic: {
      hits,
      misses,
      hitBytes,
      missBytes,
      servedBytes: served,
      upstreamBytes,
      savedBytes: Math.max(0, served - upstreamBytes),
      hitRatio: {
        requests: hits + misses > 0 ? hits / (hits + misses) : null,
        bytes: served > 0 ? hitBytes / served : null,
      },
    },
    history: { intervalSeconds: base.history.intervalSeconds, points: history },
    storage: all.reduce(
      (best, s) => (s.storage.bytes > best.bytes ? s.storage : best),
      base.storage,
    ),
    upstreams: base.upstreams.map((u) =>
      mergeUpstream(
        u,
        all.flatMap((s) => s.upstreams.filter((o) => o.name === u.name)),
      ),
    ),
    fetches: mergeFetches(all.flatMap((s) => s.fetches)),
    recent: {
      upstreamFailures: newest(all.flatMap((s) => s.recent.upstreamFailures)).slice(
        0,
        Math.max(...all.map((s) => s.recent.upstreamFailures.length)),
      ),
      refused: newest(all.flatMap((s) => s.recent.refused)).slice(
        0,
        Math.max(...all.map((s) => s.recent.refused.length)),
      ),
    },
  };
}

/** An upstream as the worker that heard from it last saw it; down when any worker finds it so. */
function mergeUpstream(base: UpstreamState, views: UpstreamState[]): UpstreamState {
  const latest = <T>(pick: (u: UpstreamState) => T | null, at: (v: T) => string) =>
    views
      .map(pick)
      .filter((v): v is T => v !== null)
      .sort((a, b) => (at(a) < at(b) ? 1 : -1))[0] ?? null;
  const lastAnswer = latest(
    (u) => u.lastAnswer,
    (v) => v,
  );
  const answered = views.find((u) => u.lastAnswer === lastAnswer) ?? base;
  const state = views.some((u) => u.state === 'down')
    ? 'down'
    : views.some((u) => u.state === 'up')
      ? 'up'
      : base.state;
  return {
    ...base,
    state,
    auth: views.find((u) => u.auth !== null)?.auth ?? null,
    latencyMs: answered.latencyMs,
    lastAnswer,
    rateLimit: latest(
      (u) => u.rateLimit,
      (v) => v.at,
    ),
    lastFailure: latest(
      (u) => u.lastFailure,
      (v) => v.at,
    ),
  };
}

/**
 * A fetch is listed by the worker fetching it and by each worker following it: once, with the
 * most bytes any of them has seen and the clients of all of them.
 */
function mergeFetches(fetches: FetchProgress[]): FetchProgress[] {
  const byDigest = new Map<string, FetchProgress>();
  for (const f of fetches) {
    const seen = byDigest.get(f.digest);
    if (!seen) {
      byDigest.set(f.digest, { ...f });
      continue;
    }
    seen.clients += f.clients;
    seen.size ??= f.size;
    // A worker following another's fetch says `replica`; the one fetching says where from.
    if (f.from === 'upstream') seen.from = 'upstream';
    if (f.received > seen.received) {
      seen.received = f.received;
      seen.bytesPerSecond = f.bytesPerSecond;
    }
    seen.startedAt = Math.min(seen.startedAt, f.startedAt);
  }
  return [...byDigest.values()].sort((a, b) => a.startedAt - b.startedAt);
}
