/**
 * The single-range subset of HTTP Range (RFC 9110 section 14.2): `bytes=a-b`, `bytes=a-` and the
 * suffix form `bytes=-n`. Anything else (several ranges, other units, bad syntax) is ignored
 * and the whole blob is served, as the RFC allows.
 */
export type RangeRequest = { start: number; end?: number } | { suffix: number };

export function parseRange(header: string | undefined): RangeRequest | undefined {
  if (!header) return undefined;
  const m = /^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$/i.exec(header);
  if (!m || (m[1] === '' && m[2] === '')) return undefined;
  if (m[1] === '') return { suffix: Number(m[2]) };
  const start = Number(m[1]);
  if (m[2] === '') return { start };
  const end = Number(m[2]);
  if (end < start) return undefined;
  return { start, end };
}
