/**
 * Repository allow and deny lists per upstream (`upstreams.X.repositories`): which repositories
 * may be proxied at all, whoever asks. A repository outside them is never fetched and never
 * served; the HTTP layer (every endpoint, the manifest fast path too), `_catalog`, `prefetch` and
 * `import` ask here. Globs are picomatch's, on the repository name as the upstream knows it
 * (`library/alpine` on docker.io): `*` stays within one path component, `**` crosses them.
 */
import picomatch from 'picomatch';
import type { Config } from '../config/schema.js';
import { DeniedError } from '../oci/errors.js';

/** Whether a repository may be proxied: `{ allowed: false, reason }` names the rule when not. */
export type RepositoryVerdict = { allowed: true } | { allowed: false; reason: string };

interface CompiledList {
  patterns: { glob: string; matches: (name: string) => boolean }[];
}

interface UpstreamLists {
  allow: CompiledList;
  deny: CompiledList;
}

/** Most patterns an allow-list refusal quotes; the rest are counted. */
const QUOTED_PATTERNS = 5;

export class RepositoryLists {
  private readonly upstreams = new Map<string, UpstreamLists>();

  constructor(upstreams: Config['upstreams']) {
    for (const [name, upstream] of Object.entries(upstreams)) {
      const { allow, deny } = upstream.repositories;
      if (allow.length === 0 && deny.length === 0) continue;
      this.upstreams.set(name, { allow: compile(allow), deny: compile(deny) });
    }
  }

  /** Whether `repository` of `upstream` may be proxied; deny wins over allow. */
  verdict(upstream: string, repository: string): RepositoryVerdict {
    const lists = this.upstreams.get(upstream);
    if (!lists) return { allowed: true };
    const denied = lists.deny.patterns.find((p) => p.matches(repository));
    if (denied)
      return {
        allowed: false,
        reason: `${denied.glob} is denied on ${upstream} by upstreams.${upstream}.repositories.deny`,
      };
    const { patterns } = lists.allow;
    if (patterns.length === 0 || patterns.some((p) => p.matches(repository)))
      return { allowed: true };
    const quoted = patterns.slice(0, QUOTED_PATTERNS).map((p) => p.glob);
    const more = patterns.length - quoted.length;
    return {
      allowed: false,
      reason: `only ${quoted.join(', ')}${more > 0 ? ` and ${more} more` : ''} ${patterns.length === 1 ? 'is' : 'are'} allowed on ${upstream} by upstreams.${upstream}.repositories.allow`,
    };
  }

  allows(upstream: string, repository: string): boolean {
    return this.verdict(upstream, repository).allowed;
  }

  /** Throws DeniedError (403 DENIED) naming the rule when the repository may not be proxied. */
  check(upstream: string, repository: string): void {
    const verdict = this.verdict(upstream, repository);
    if (!verdict.allowed) throw new RepositoryDeniedError(upstream, repository, verdict.reason);
  }
}

/** A repository outside its upstream's allow/deny lists. */
export class RepositoryDeniedError extends DeniedError {
  constructor(
    readonly upstream: string,
    readonly repository: string,
    readonly reason: string,
  ) {
    super(`${repository}: ${reason}`);
  }
}

function compile(globs: readonly string[]): CompiledList {
  return { patterns: globs.map((glob) => ({ glob, matches: picomatch(glob) })) };
}

const compiled = new WeakMap<Config, RepositoryLists>();

/** The lists of a configuration, compiled once per config object. */
export function repositoryLists(config: Config): RepositoryLists {
  let lists = compiled.get(config);
  if (!lists) compiled.set(config, (lists = new RepositoryLists(config.upstreams)));
  return lists;
}
