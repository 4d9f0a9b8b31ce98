/**
 * The status of a running server in one JSON document, `GET /_pullcache/v1/status`: what the
 * status page shows and `pullcache status` prints (docs/admin-api.md describes every field).
 */
import { readFileSync } from 'node:fs';
import { repositoryLists } from '../access/repositories.js';
import type { Config } from '../config/schema.js';
import type { Lifecycle } from '../lifecycle/lifecycle.js';
import type { Usage } from '../lifecycle/types.js';
import type { Metrics } from '../metrics.js';
import type { FetchProgress, InflightFetches } from '../proxy/inflight.js';
import type { UpstreamClient } from '../upstream/types.js';
import type { RecentEvents, RefusedRequest, UpstreamFailure } from './events.js';
import {
  HISTORY_INTERVAL_MS,
  TrafficHistory,
  type OwnTraffic,
  type TrafficPoint,
} from './history.js';
import { UpstreamMonitor } from './upstream-monitor.js';

export interface UpstreamState {
  name: string;
  mode: 'cache' | 'passthrough';
  /**
   * up: it answered; down: failing fast, or no answer since start-up; offline: configured so;
   * unknown: not asked yet; passthrough: forwarded unchanged, not watched.
   */
  state: 'up' | 'down' | 'offline' | 'unknown' | 'passthrough';
  /** bearer, basic, none; null until learned. */
  auth: string | null;
  /** A running average of the time to an answer's headers; null before any. */
  latencyMs: number | null;
  /** ISO 8601. */
  lastAnswer: string | null;
  /** The last RateLimit figures it sent (Docker Hub's pull limit); null when it sent none. */
  rateLimit: {
    limit: number | null;
    remaining: number | null;
    windowSeconds: number | null;
    at: string;
  } | null;
  lastFailure: { at: string; what: string; reason: string; repositories: string[] } | null;
}

export interface Status {
  version: string;
  /** ISO 8601. */
  startedAt: string;
  now: string;
  /** Since start: manifests and blobs served (GETs with content) and their bytes. */
  traffic: {
    hits: number;
    misses: number;
    hitBytes: number;
    missBytes: number;
    servedBytes: number;
    /** Every byte received from the upstreams. */
    upstreamBytes: number;
    /** servedBytes - upstreamBytes: what clients got without it crossing the upstream link. */
    savedBytes: number;
    /** hits / (hits + misses), and hitBytes / servedBytes; null before anything was served. */
    hitRatio: { requests: number | null; bytes: number | null };
  };
  /** Traffic totals every `intervalSeconds` over the last hour, oldest first, now last. */
  history: { intervalSeconds: number; points: TrafficPoint[] };
  storage: Usage;
  upstreams: UpstreamState[];
  fetches: FetchProgress[];
  recent: { upstreamFailures: UpstreamFailure[]; refused: RefusedRequest[] };
  /** What the asking client may do: `admin` to pin, unpin and remove. */
  viewer: { admin: boolean };
}

/**
 * Who asks for the status: what it may do (`admin`, shown as `viewer`), and which repositories
 * it may pull (what it is shown of fetches and upstream failures).
 */
export interface StatusViewer {
  admin: boolean;
  mayPull(target: { upstream: string; repository: string }): boolean;
}

export interface StatusDeps {
  config: Config;
  metrics: Metrics;
  lifecycle: Lifecycle;
  clients: Map<string, UpstreamClient>;
  monitors: Map<string, UpstreamMonitor>;
  inflight: InflightFetches;
  events: RecentEvents;
}

const VERSION = (() => {
  try {
    const pkg = JSON.parse(
      readFileSync(new URL('../../package.json', import.meta.url), 'utf8'),
    ) as { version?: string };
    return pkg.version ?? 'unknown';
  } catch {
    return 'unknown';
  }
})();

/** Gathers the status; keeps the traffic history while started. */
export class StatusReporter {
  readonly events: RecentEvents;
  private readonly history: TrafficHistory;
  private readonly startedAt = new Date();
  private host: ((viewer: { admin: boolean }) => Promise<Status>) | undefined;

  constructor(private readonly d: StatusDeps) {
    this.events = d.events;
    this.history = new TrafficHistory(() => d.metrics.traffic());
  }

  start(): void {
    this.history.start();
  }

  stop(): void {
    this.history.stop();
  }

  /**
   * With `server.workers`: `gather` turns this worker's status into the host's (see
   * fleet/cluster-status.ts); `status` answers with that from then on. It is given `own`, this
   * worker's status (with the `traffic` given, or that of now), and `traffic`, this worker's
   * traffic alone: what it tells the primary, made without counting storage.
   */
  showHost(
    gather: (
      own: (viewer: { admin: boolean }, traffic?: OwnTraffic) => Promise<Status>,
      traffic: () => OwnTraffic,
    ) => (viewer: { admin: boolean }) => Promise<Status>,
  ): void {
    this.host = gather(
      (viewer, traffic) => this.own(viewer, traffic),
      () => this.traffic(),
    );
  }

  /** This process's traffic: its start, and its history with the totals of `now` last. */
  traffic(now = Date.now()): OwnTraffic {
    return { startedAt: this.startedAt.toISOString(), points: this.history.points(now) };
  }

  /**
   * The status as `viewer` may see it (`visibleTo`): the host's with `server.workers`, whose
   * workers each give all of theirs, so that it is narrowed once merged. Who is no admin of the
   * whole cache is shown only repositories the allow/deny lists serve.
   */
  async status(viewer: StatusViewer): Promise<Status> {
    const shown = { admin: viewer.admin };
    const whole = await (this.host ? this.host(shown) : this.own(shown));
    // Repositories outside the allow/deny lists are nobody's to pull (as in `_catalog`), whatever
    // the rules say; an admin of the whole cache sees all, as it does the refused requests.
    const lists = repositoryLists(this.d.config);
    return visibleTo(
      whole,
      viewer.admin
        ? viewer
        : {
            admin: false,
            mayPull: (t) => lists.allows(t.upstream, t.repository) && viewer.mayPull(t),
          },
    );
  }

  /** This process's status, its traffic `traffic` (that of now when not given). */
  private async own(viewer: { admin: boolean }, traffic = this.traffic()): Promise<Status> {
    const { startedAt, points } = traffic;
    const t = points.at(-1)!;
    const now = t.t;
    const served = t.hitBytes + t.missBytes;
    return {
      version: VERSION,
      startedAt,
      now: new Date(now).toISOString(),
      traffic: {
        hits: t.hits,
        misses: t.misses,
        hitBytes: t.hitBytes,
        missBytes: t.missBytes,
        servedBytes: served,
        upstreamBytes: t.upstreamBytes,
        savedBytes: Math.max(0, served - t.upstreamBytes),
        hitRatio: {
          requests: t.hits + t.misses > 0 ? t.hits / (t.hits + t.misses) : null,
          bytes: served > 0 ? t.hitBytes / served : null,
        },
      },
      history: { intervalSeconds: HISTORY_INTERVAL_MS / 1000, points },
      storage: await this.d.lifecycle.usage(),
      upstreams: Object.entries(this.d.config.upstreams).map(([name, u]) =>
        this.upstream(name, u.mode, u.offline),
      ),
      fetches: this.d.inflight.progress(now),
      recent: {
        upstreamFailures: this.d.events.upstreamFailures(),
        refused: this.d.events.refusedRequests(),
      },
      viewer,
    };
  }

  private upstream(name: string, mode: 'cache' | 'passthrough', offline: boolean): UpstreamState {
    const client = this.d.clients.get(name);
    const monitor = this.d.monitors.get(name);
    const iso = (ms: number | undefined) => (ms === undefined ? null : new Date(ms).toISOString());
    const state: UpstreamState['state'] =
      mode === 'passthrough'
        ? 'passthrough'
        : offline
          ? 'offline'
          : client?.isDown || monitor?.unreachable
            ? 'down'
            : monitor?.lastAnswerAt !== undefined
              ? 'up'
              : 'unknown';
    const rl = client?.rateLimit;
    const failure = monitor?.lastFailure;
    return {
      name,
      mode,
      state,
      auth: client?.authScheme ?? null,
      latencyMs: monitor?.latency === undefined ? null : Math.round(monitor.latency * 1000),
      lastAnswer: iso(monitor?.lastAnswerAt),
      rateLimit: rl
        ? {
            limit: rl.limit ?? null,
            remaining: rl.remaining ?? null,
            windowSeconds: rl.window ?? null,
            at: new Date(rl.at).toISOString(),
          }
        : null,
      lastFailure: failure
        ? {
            at: new Date(failure.at).toISOString(),
            what: failure.what,
            reason: failure.reason,
            repositories: [...failure.repositories],
          }
        : null,
    };
  }
}

/**
 * What `viewer` may see of `status`: the fetches and upstream failures of repositories it may
 * pull (and failures of no repository, such as the start-up greeting), and the refused requests
 * (other clients' addresses and paths) only when it is an admin. An upstream's `lastFailure` of
 * a repository it may not pull keeps its time and reason, not what was asked.
 */
export function visibleTo(status: Status, viewer: StatusViewer): Status {
  const visible = (upstream: string, repositories: readonly string[]) =>
    repositories.every((repository) => viewer.mayPull({ upstream, repository }));
  return {
    ...status,
    upstreams: status.upstreams.map((u) =>
      u.lastFailure && !visible(u.name, u.lastFailure.repositories)
        ? { ...u, lastFailure: { ...u.lastFailure, what: 'a request', repositories: [] } }
        : u,
    ),
    fetches: status.fetches.filter((f) => viewer.mayPull(f)),
    recent: {
      upstreamFailures: status.recent.upstreamFailures.filter((f) =>
        visible(f.upstream, f.repositories),
      ),
      refused: viewer.admin ? status.recent.refused : [],
    },
    viewer: { admin: viewer.admin },
  };
}
