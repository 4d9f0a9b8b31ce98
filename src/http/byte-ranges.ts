/**
 * A blob's answer to a Range of several ranges: `206` with a `multipart/byteranges` body (RFC 9110
 * section 14.6), one part per satisfiable range in the order asked, framed as Go's
 * `http.ServeContent` (distribution's blob server) frames it. containers/image asks this way for
 * the pieces of a zstd:chunked layer it lacks, and expects exactly one part per range it asked
 * for: a `200` makes it read (and the network carry) the whole layer.
 *
 * The parts are read from one stream over the range that covers them all: a stored file seeks
 * from part to part; a blob still being fetched, or an object of the bucket, is read on and the
 * gaps skipped, which asks the parts in ascending order (blobs.ts serves the whole blob when they
 * are not).
 */
import { randomBytes } from 'node:crypto';
import type { Readable, Writable } from 'node:stream';
import { canReadInto, sendFilled, type RangeStream } from '../storage/file-range.js';
import { ObjectRange } from '../storage/object-range.js';
import type { RangeRequest } from './range.js';

/** Inclusive byte offsets of a part. */
export interface Part {
  start: number;
  end: number;
}

/** Each part's bytes sent at once; a small read keeps a busy server's turns short. */
const SEND_CHUNK = 256 * 1024;

/**
 * The parts `ranges` ask of a blob of `size` bytes: a range starting past its end (or a suffix of
 * zero bytes) is dropped, an end past it clipped, as Go does. Empty: none is satisfiable (416).
 */
export function resolveParts(ranges: readonly RangeRequest[], size: number): Part[] {
  const parts: Part[] = [];
  for (const range of ranges) {
    if ('suffix' in range) {
      if (range.suffix > 0 && size > 0)
        parts.push({ start: Math.max(0, size - range.suffix), end: size - 1 });
    } else if (range.start < size) {
      parts.push({ start: range.start, end: Math.min(range.end ?? size - 1, size - 1) });
    }
  }
  return parts;
}

/** Bytes the parts ask for in all (overlaps counted twice). */
export function partBytes(parts: readonly Part[]): number {
  return parts.reduce((sum, p) => sum + p.end - p.start + 1, 0);
}

/** Each part starts after the one before it ends: one pass over the blob reads them all. */
export function ascending(parts: readonly Part[]): boolean {
  return parts.every((p, i) => i === 0 || p.start > parts[i - 1]!.end);
}

/** The range that covers every part. */
export function covering(parts: readonly Part[]): Part {
  return {
    start: Math.min(...parts.map((p) => p.start)),
    end: Math.max(...parts.map((p) => p.end)),
  };
}

/** The framing of the parts of a blob of `size` bytes: its type, length and delimiters. */
export class MultipartFrame {
  readonly boundary = randomBytes(15).toString('hex');
  readonly contentType = `multipart/byteranges; boundary=${this.boundary}`;
  readonly contentLength: number;

  constructor(
    readonly parts: readonly Part[],
    private readonly size: number,
    private readonly partType = 'application/octet-stream',
  ) {
    let length = Buffer.byteLength(this.closing());
    parts.forEach((p, i) => (length += Buffer.byteLength(this.head(i)) + p.end - p.start + 1));
    this.contentLength = length;
  }

  /** What precedes part `i`'s bytes. */
  head(i: number): string {
    const p = this.parts[i]!;
    return (
      `${i === 0 ? '' : '\r\n'}--${this.boundary}\r\n` +
      `Content-Range: bytes ${p.start}-${p.end}/${this.size}\r\n` +
      `Content-Type: ${this.partType}\r\n\r\n`
    );
  }

  closing(): string {
    return `\r\n--${this.boundary}--\r\n`;
  }
}

/**
 * Writes the parts to `dest` (leaving it open) from `stream`, a range of the blob that starts at
 * `origin` and covers every part; parts out of order need a stream that can seek. The stream is
 * destroyed afterwards either way.
 */
export async function sendParts(
  dest: Writable,
  stream: Readable,
  origin: number,
  frame: MultipartFrame,
): Promise<void> {
  const source: RangeStream = canReadInto(stream) ? stream : new ObjectRange(stream);
  const seek = source.seek?.bind(source);
  if (!seek && !ascending(frame.parts))
    throw new Error('parts out of order from a stream that cannot seek');
  let pos = origin;
  let part = -1;
  let text: Buffer | undefined = undefined;
  let left = 0;
  let scratch: Buffer | undefined = undefined;
  /** Reads `length` bytes of the source, at `pos`, into `into`; fails at an early end. */
  const read = async (into: Buffer, length: number): Promise<number> => {
    const n = await source.readInto(into, length);
    if (n === 0) throw new Error(`the blob ended at ${pos}, before the range asked`);
    pos += n;
    return n;
  };
  const moveTo = async (start: number): Promise<void> => {
    if (seek) {
      seek(start);
      pos = start;
      return;
    }
    scratch ??= Buffer.allocUnsafe(SEND_CHUNK);
    while (pos < start) await read(scratch, Math.min(scratch.length, start - pos));
  };
  let watching = false;
  const fill = async (buffer: Buffer, gone: AbortSignal): Promise<number> => {
    if (!watching) {
      // A read waiting for a fetch's next bytes ends when the client has gone.
      gone.addEventListener('abort', () => stream.destroy(), { once: true });
      watching = true;
    }
    let n = 0;
    while (n < buffer.length) {
      if (text) {
        const copied = text.copy(buffer, n);
        n += copied;
        text = copied < text.length ? text.subarray(copied) : undefined;
      } else if (left > 0) {
        const got = await read(buffer.subarray(n), Math.min(left, buffer.length - n));
        n += got;
        left -= got;
      } else if (++part < frame.parts.length) {
        const p = frame.parts[part]!;
        await moveTo(p.start);
        text = Buffer.from(frame.head(part));
        left = p.end - p.start + 1;
      } else if (part === frame.parts.length) {
        text = Buffer.from(frame.closing());
      } else {
        break;
      }
    }
    return n;
  };
  try {
    await sendFilled(dest, SEND_CHUNK, fill);
  } finally {
    source.destroy();
    stream.destroy();
  }
}
