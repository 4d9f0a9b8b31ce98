/**
 * The status page with `server.workers`: its polls reach a different worker each time, so each
 * must show the host, not itself (the chart would jump between workers' figures). The worker
 * asked sends `collect` to the primary, which asks every other worker for its own status (`ask`,
 * `own`) and hands the set back (`all`); the worker asked merges them with its own, which it
 * makes meanwhile (`mergeStatuses`).
 *
 * The primary holds no status of its own, only each worker's traffic as it last heard of it: the
 * host's traffic and its history must not go down when a worker dies (kept-counts.ts). It hears
 * of it in each `own`, in a `traffic` report every worker sends every few seconds unasked (a
 * worker killed with SIGKILL says nothing as it dies), and in the one the worker asked sends
 * right before its `collect`, with the traffic it then shows: the primary's figures for a worker
 * are never older than those a client was shown (the asker's own answer is not asked for, and a
 * worker killed right after it showed the host's totals would have taken the counts since its
 * last report with it). It hands back, with the set, the traffic of the workers gone and of those
 * that did not answer in time (`kept`).
 */
import cluster, { type Worker } from 'node:cluster';
import type { Status, UpstreamState } from '../status/status.js';
import type { TrafficTotals } from '../metrics.js';
import type { FetchProgress } from '../proxy/inflight.js';
import { HISTORY_INTERVAL_MS, type TrafficPoint } from '../status/history.js';
import { askPrimary } from './ask-primary.js';
import {
  keepTraffic,
  keptTimes,
  keptTotals,
  trafficAt,
  type KeptTraffic,
  type WorkerTraffic,
} from './kept-counts.js';

type Message =
  | { pullcache: 'status'; t: 'collect'; token: number }
  | { pullcache: 'status'; t: 'ask'; id: number }
  | { pullcache: 'status'; t: 'own'; id: number; status: Status }
  /** The history points since the last report (and the one of now, last). */
  | { pullcache: 'status'; t: 'traffic'; startedAt: string; points: TrafficPoint[] }
  | { pullcache: 'status'; t: 'all'; token: number; statuses: Status[]; kept?: KeptTraffic };

const isStatusMessage = (m: unknown): m is Message =>
  typeof m === 'object' && m !== null && (m as { pullcache?: unknown }).pullcache === 'status';

/** How long the primary waits for the workers' answers; the others count by their last report. */
const ASK_TIMEOUT_MS = 2000;
/** How long a worker waits for the primary before it answers with its own status. */
const COLLECT_TIMEOUT_MS = 4000;
/** How often a worker reports its traffic unasked: what a worker killed loses of the host's. */
const REPORT_INTERVAL_MS = 5000;
/** The points of a worker's history: an hour of samples, and now. */
const HISTORY_LENGTH = 362;

/** A `collect` under way: the workers asked, their answers by worker id. */
interface Ask {
  asked: Worker[];
  statuses: Map<number, Status>;
  done: () => void;
}

/** In the primary: relays a worker's `collect` to the other workers, hands back their answers. */
export function serveClusterStatus(): void {
  let next = 0;
  const asks = new Map<number, Ask>();
  /** Each live worker's traffic as it last told it, by worker id. */
  const traffic = new Map<number, WorkerTraffic>();
  /** The traffic of the workers gone, summed. */
  let kept: KeptTraffic | undefined;
  /** Workers whose traffic went to `kept`: anything they still said would count twice. */
  const gone = new WeakSet<Worker>();

  /** Takes what `worker` tells of its traffic: its whole history, or the points since. */
  const heard = (worker: Worker, startedAt: string, points: TrafficPoint[], whole: boolean) => {
    const seen = traffic.get(worker.id)?.points;
    // Two of its statuses made at once may come in either order: the older says less.
    if (gone.has(worker) || points.length === 0 || points.at(-1)!.t < (seen?.at(-1)?.t ?? 0))
      return;
    // Its last point was then's `now`, not a sample: the next says more.
    const before = whole ? [] : (seen?.slice(0, -1) ?? []);
    const since = before.at(-1)?.t ?? -Infinity;
    traffic.set(worker.id, {
      startedAt,
      points: [...before, ...points.filter((p) => p.t > since)].slice(-HISTORY_LENGTH),
    });
  };

  /** Whether every worker asked has answered or is gone. */
  const complete = (ask: Ask) => ask.asked.every((w) => ask.statuses.has(w.id) || gone.has(w));

  cluster.on('message', (worker: Worker, message: unknown) => {
    if (!isStatusMessage(message)) return;
    if (message.t === 'traffic') {
      heard(worker, message.startedAt, message.points, false);
      return;
    }
    if (message.t === 'own') {
      heard(worker, message.status.startedAt, message.status.history.points, true);
      const ask = asks.get(message.id);
      if (!ask || gone.has(worker)) return;
      ask.statuses.set(worker.id, message.status);
      if (complete(ask)) ask.done();
      return;
    }
    if (message.t !== 'collect') return;
    const id = ++next;
    // The worker asking makes its own status itself, meanwhile.
    const others = Object.values(cluster.workers ?? {}).filter(
      (w): w is Worker => w !== undefined && w !== worker && w.isConnected(),
    );
    const ask: Ask = { asked: others, statuses: new Map(), done: () => {} };
    const timer = setTimeout(() => ask.done(), ASK_TIMEOUT_MS);
    ask.done = () => {
      clearTimeout(timer);
      asks.delete(id);
      // A worker gone meanwhile counts in `kept`, by its answer or a later report: not twice.
      const statuses = [...ask.statuses].filter(([w]) => traffic.has(w)).map(([, s]) => s);
      // A live worker that did not answer counts by what it last said.
      let counted = kept;
      for (const w of ask.asked) {
        const its = traffic.get(w.id);
        if (its && !ask.statuses.has(w.id)) counted = keepTraffic(counted, its);
      }
      if (worker.isConnected())
        worker.send(
          {
            pullcache: 'status',
            t: 'all',
            token: message.token,
            statuses,
            ...(counted ? { kept: counted } : {}),
          },
          undefined,
          () => {},
        );
    };
    asks.set(id, ask);
    if (complete(ask)) return ask.done();
    for (const w of others) w.send({ pullcache: 'status', t: 'ask', id }, undefined, () => {});
  });

  // A worker's last message comes before its channel closes: its traffic is complete here.
  cluster.on('disconnect', (worker: Worker) => {
    gone.add(worker);
    const its = traffic.get(worker.id);
    traffic.delete(worker.id);
    if (its) kept = keepTraffic(kept, its);
    for (const ask of asks.values()) if (complete(ask)) ask.done();
  });
}

/**
 * In a worker: answers the primary's asks with `own()`, reports its traffic (`traffic()`, which
 * counts no storage) every few seconds, and gives the host's status (this worker's own when the
 * primary does not answer in time).
 */
export function workerStatus(
  own: (viewer: { admin: boolean }, traffic?: WorkerTraffic) => Promise<Status>,
  traffic: () => WorkerTraffic,
): (viewer: { admin: boolean }) => Promise<Status> {
  const send = (message: Message) => {
    if (process.connected) process.send?.(message, undefined, {}, () => {});
  };
  process.on('message', (message: unknown) => {
    if (!isStatusMessage(message) || message.t !== 'ask') return;
    void own({ admin: false }).then(
      (status) => send({ pullcache: 'status', t: 'own', id: message.id, status }),
      () => {},
    );
  });
  // The samples told so far: each report tells those after, and now.
  let told = -Infinity;
  const report = ({ startedAt, points }: WorkerTraffic) => {
    if (!process.connected) return;
    send({
      pullcache: 'status',
      t: 'traffic',
      startedAt,
      points: points.filter((p) => p.t > told),
    });
    told = points.at(-2)?.t ?? told;
  };
  const reports = setInterval(() => report(traffic()), REPORT_INTERVAL_MS);
  reports.unref();
  const ask = askPrimary<Extract<Message, { t: 'all' }>>('status', 'all', COLLECT_TIMEOUT_MS);
  return async (viewer) => {
    // The traffic shown is told first (the channel keeps the order: the primary hears it before
    // the collect), so the primary never holds less of this worker than a client was shown: a
    // worker killed right after it showed the host's totals leaves them whole.
    const now = traffic();
    report(now);
    // The primary's answer holds the others' statuses: this worker's is made here, meanwhile.
    const [mine, all] = await Promise.all([own(viewer, now), ask()]);
    return all ? mergeStatuses(mine, [mine, ...all.statuses], all.kept) : mine;
  };
}

/**
 * The host's status from each worker's: traffic and its history summed (the history point by
 * point from now back: the workers sample every 10 s, started within moments of each other),
 * with the traffic of the workers gone (`kept`: by time, as they had it then), storage as the
 * worker that knows most of it counts it (the owner, which scanned it all), upstreams by their
 * latest news, fetches once per digest, recent events newest first. The rest (version, viewer,
 * now) is `base`'s: the answering worker's.
 */
export function mergeStatuses(base: Status, all: Status[], kept?: KeptTraffic): Status {
  const last = kept ? keptTotals(kept) : undefined;
  const sum = (key: keyof TrafficTotals) =>
    all.reduce((n, s) => n + s.traffic[key], last?.[key] ?? 0);
  const hits = sum('hits');
  const misses = sum('misses');
  const hitBytes = sum('hitBytes');
  const missBytes = sum('missBytes');
  const upstreamBytes = sum('upstreamBytes');
  const served = hitBytes + missBytes;
  const now = base.history.points.at(-1)!.t;
  // The times of the longest history (the oldest live worker's), now last; before it, those of
  // the workers gone within the hour, if they started earlier.
  const longest = all.reduce(
    (a, s) => (s.history.points.length > a.length ? s.history.points : a),
    base.history.points,
  );
  const times = [
    // (Half an interval apart at least: the chart's steps stay even.)
    ...(kept ? keptTimes(kept, now - 3_600_000, longest[0]!.t - HISTORY_INTERVAL_MS / 2) : []),
    ...longest.map((p) => p.t),
  ].slice(-HISTORY_LENGTH);
  const history = times.map((t, i) => {
    const back = times.length - i;
    const at = (s: Status) => s.history.points[s.history.points.length - back];
    const keptThen = back === 1 ? last : kept && trafficAt(kept, t);
    const total = (key: keyof TrafficTotals) =>
      all.reduce((n, s) => n + (at(s)?.[key] ?? 0), keptThen?.[key] ?? 0);
    return {
      t: back === 1 ? now : t,
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
    startedAt:
      [...all.map((s) => s.startedAt), ...(kept ? [kept.startedAt] : [])].sort()[0] ??
      base.startedAt,
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
