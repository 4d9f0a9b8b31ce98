/**
 * HTTP Range (RFC 9110 section 14.2) as clients send it for blobs: `bytes=a-b`, `bytes=a-`, the
 * suffix form `bytes=-n`, and lists of them (`bytes=0-99,500-599`: containers/image asks for the
 * pieces of a zstd:chunked layer it lacks this way, up to 1024 in one request). Anything else
 * (other units, bad syntax, a header longer than MAX_RANGE_HEADER) is no range, and the whole blob
 * is served, as the RFC allows.
 */
export type RangeRequest = { start: number; end?: number } | { suffix: number };

/**
 * One whitespace quantifier on each side of a literal: with `\s*(\d*)\s*` an empty number lets
 * two runs split the same spaces every way, and a header of spaces took seconds (cubic). The
 * list is split on commas and each piece trimmed, so no regex sees more than one range.
 */
const UNIT = /^\s*bytes\s*=/i;
const SPEC = /^(\d*)[ \t]*-[ \t]*(\d*)$/;
/** 1024 ranges of two 10-digit offsets fit, with room to spare (see MAX_HEADER_BYTES). */
export const MAX_RANGE_HEADER = 32 * 1024;

/** The ranges a Range header asks for, in its order; undefined when it asks for none. */
export function parseRanges(header: string | undefined): RangeRequest[] | undefined {
  if (!header || header.length > MAX_RANGE_HEADER) return undefined;
  const unit = UNIT.exec(header);
  if (!unit) return undefined;
  const ranges: RangeRequest[] = [];
  for (const item of header.slice(unit[0].length).split(',')) {
    const text = item.trim();
    if (text === '') continue; // the RFC's list syntax allows empty elements
    const m = SPEC.exec(text);
    const first = m?.[1] ?? '';
    const last = m?.[2] ?? '';
    if (!m || (first === '' && last === '')) return undefined;
    if (first === '') {
      ranges.push({ suffix: Number(last) });
      continue;
    }
    const start = Number(first);
    if (last === '') {
      ranges.push({ start });
      continue;
    }
    const end = Number(last);
    if (end < start) return undefined;
    ranges.push({ start, end });
  }
  return ranges.length > 0 ? ranges : undefined;
}
