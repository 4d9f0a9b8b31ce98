/**
 * What went wrong lately, for the status page and `pullcache status`: the last upstream failures
 * and the last refused client requests, each with its reason. Bounded: a burst of the same
 * failure is one entry with a count, and the oldest entries go first.
 */

export interface UpstreamFailure {
  /** ISO 8601, of the latest occurrence. */
  at: string;
  upstream: string;
  /** What was asked: `GET /v2/library/alpine/manifests/3.20`, `a token for repository:...`. */
  what: string;
  reason: string;
  /** The repositories it was asked for: who may pull them may see it (status.ts, visibleTo). */
  repositories: string[];
  /** Occurrences in a row. */
  count: number;
}

export interface RefusedRequest {
  at: string;
  /** The client's address. */
  client: string;
  method: string;
  /** Cut at 200 characters. */
  path: string;
  status: number;
  /** The OCI error code sent. */
  code: string;
  reason: string;
  count: number;
}

const KEEP = 50;
const PATH_SHOWN = 200;

export class RecentEvents {
  private readonly failures: UpstreamFailure[] = [];
  private readonly refusals: RefusedRequest[] = [];

  upstreamFailed(
    upstream: string,
    what: string,
    reason: string,
    repositories: readonly string[],
    now = new Date(),
  ): void {
    const last = this.failures.at(-1);
    if (last && last.upstream === upstream && last.what === what && last.reason === reason) {
      last.count++;
      last.at = now.toISOString();
      return;
    }
    push(this.failures, {
      at: now.toISOString(),
      upstream,
      what,
      reason,
      repositories: [...repositories],
      count: 1,
    });
  }

  refused(entry: Omit<RefusedRequest, 'at' | 'count'>, now = new Date()): void {
    const path =
      entry.path.length > PATH_SHOWN ? `${entry.path.slice(0, PATH_SHOWN)}...` : entry.path;
    const last = this.refusals.at(-1);
    if (
      last &&
      last.client === entry.client &&
      last.method === entry.method &&
      last.path === path &&
      last.code === entry.code
    ) {
      last.count++;
      last.at = now.toISOString();
      return;
    }
    push(this.refusals, { ...entry, path, at: now.toISOString(), count: 1 });
  }

  /** Newest first. */
  upstreamFailures(): UpstreamFailure[] {
    return this.failures.map((f) => ({ ...f })).reverse();
  }

  /** Newest first. */
  refusedRequests(): RefusedRequest[] {
    return this.refusals.map((r) => ({ ...r })).reverse();
  }
}

function push<T>(list: T[], entry: T): void {
  list.push(entry);
  if (list.length > KEEP) list.shift();
}
