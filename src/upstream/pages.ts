/**
 * Paginated answers of an upstream (tags, referrers): the next page from a Link header, followed
 * within limits.
 */
import { UpstreamInvalidError } from './errors.js';

/**
 * Follows a paginated answer (tags, referrers) page by page: at most `max` pages, and never one
 * twice. A list cut short there would be served as if whole, and a Link back to a page already
 * read would be followed until the cap: both are the upstream's fault, and said so.
 */
export class PageLinks {
  private readonly seen = new Set<string>();

  constructor(
    private readonly upstream: string,
    private readonly what: string,
    private readonly max: number,
  ) {}

  /** The page after `current` (just read), from its Link header; undefined after the last. */
  after(current: string, link: string | undefined, repository: string): string | undefined {
    this.seen.add(current);
    const next = nextPage(link, repository);
    if (next === undefined) return undefined;
    if (this.seen.has(next))
      throw new UpstreamInvalidError(
        this.upstream,
        `${this.what}: a page links back to a page already read`,
      );
    if (this.seen.size >= this.max)
      throw new UpstreamInvalidError(this.upstream, `${this.what}: more than ${this.max} pages`);
    return next;
  }
}

/** The next page (tags, referrers) from a `Link: <...>; rel="next"` header, as a path under the repository. */
function nextPage(link: string | undefined, repository: string): string | undefined {
  if (!link) return undefined;
  const m = /<([^>]+)>\s*;\s*rel="?next"?/.exec(link);
  if (!m) return undefined;
  // Only the path and query are used: a Link never makes us dial another host.
  const target = new URL(m[1]!, 'http://upstream.invalid');
  const prefix = `/v2/${repository}/`;
  const at = target.pathname.indexOf(prefix);
  if (at < 0) return undefined;
  return `${target.pathname.slice(at + prefix.length)}${target.search}`;
}
