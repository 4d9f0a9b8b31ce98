/**
 * A requested ByteRange (types.ts) resolved against the size of the blob it asks of, the same way
 * for every store that serves ranges: the local blob store, the proxy store and a peer's fetch.
 */
import { RangeInvalidError } from '../oci/errors.js';
import type { ByteRange } from './types.js';

/**
 * The inclusive [start, end] a range asks of a blob of `size` bytes (the whole blob without one);
 * an end past the blob is clipped. Throws RangeInvalidError for a range outside the blob.
 */
export function resolveRange(
  size: number,
  range: ByteRange | undefined,
): { start: number; end: number } {
  if (!range) return { start: 0, end: size - 1 };
  const end = Math.min(range.end ?? size - 1, size - 1);
  if (range.start >= size || range.start > end) throw new RangeInvalidError(size);
  return { start: range.start, end };
}
