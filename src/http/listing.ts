/**
 * Lists in pages (distribution spec "content discovery"): a repository's tags, and the catalog's
 * repositories, `n` at a time (at most PAGE_MAX) after `last`, with a `Link` to the next page.
 */
import type { Request, Response } from 'express';
import { RegistryError } from '../oci/errors.js';
import type { RepositoryKey } from '../storage/types.js';
import type { TagService } from '../storage/services.js';

/** Most names in one page. */
const PAGE_MAX = 10_000;

export async function listTags(
  req: Request,
  res: Response,
  tags: TagService,
  repo: RepositoryKey,
  name: string,
): Promise<void> {
  const { n, last } = pagination(req);
  const all = await tags.list(repo);
  const page = paginate(all, n, last);
  // The next page is of the same upstream: `ns` (which chose it, when given) goes along.
  const ns = typeof req.query.ns === 'string' ? `&ns=${encodeURIComponent(req.query.ns)}` : '';
  if (page.next !== undefined)
    res.setHeader(
      'Link',
      `</v2/${name}/tags/list?last=${encodeURIComponent(page.next)}&n=${n}${ns}>; rel="next"`,
    );
  res.json({ name, tags: page.items });
}

export function pagination(req: Request): { n: number; last: string | undefined } {
  const rawN = req.query.n;
  let n = PAGE_MAX;
  if (rawN !== undefined) {
    if (typeof rawN !== 'string' || !/^\d{1,9}$/.test(rawN))
      throw new RegistryError('PAGINATION_NUMBER_INVALID', 'n must be a whole number');
    n = Math.min(Number(rawN), PAGE_MAX);
  }
  const rawLast = req.query.last;
  if (rawLast !== undefined && typeof rawLast !== 'string')
    throw new RegistryError('PAGINATION_NUMBER_INVALID', 'last must be given once');
  return { n, last: rawLast };
}

export function paginate(
  sorted: string[],
  n: number,
  last: string | undefined,
): { items: string[]; next?: string } {
  const from = last === undefined ? sorted : sorted.filter((item) => item > last);
  const items = from.slice(0, n);
  return from.length > n && items.length > 0
    ? { items, next: items[items.length - 1]! }
    : { items };
}
