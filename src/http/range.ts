/**
 * The single-range subset of HTTP Range (RFC 9110 section 14.2): `bytes=a-b`, `bytes=a-` and the
 * suffix form `bytes=-n`. Anything else (several ranges, other units, bad syntax) is ignored
 * and the whole blob is served, as the RFC allows.
 */
export type RangeRequest = { start: number; end?: number } | { suffix: number };

/**
 * Each run of whitespace belongs to one quantifier only: with `\s*(\d*)\s*` an empty number
 * lets two runs split the same spaces every way, and a header of spaces took seconds (cubic).
 */
const SINGLE_RANGE = /^\s*bytes\s*=\s*(?:(\d+)\s*)?-\s*(?:(\d+)\s*)?$/i;
/** Longer than any single range of two 16-digit offsets can be: not one, ignored unread. */
const MAX_RANGE_HEADER = 200;

export function parseRange(header: string | undefined): RangeRequest | undefined {
  if (!header || header.length > MAX_RANGE_HEADER) return undefined;
  const m = SINGLE_RANGE.exec(header);
  const first = m?.[1] ?? '';
  const last = m?.[2] ?? '';
  if (!m || (first === '' && last === '')) return undefined;
  if (first === '') return { suffix: Number(last) };
  const start = Number(first);
  if (last === '') return { start };
  const end = Number(last);
  if (end < start) return undefined;
  return { start, end };
}
