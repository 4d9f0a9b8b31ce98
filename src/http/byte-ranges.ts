/**
 * A blob's answer to a Range of several ranges: `206` with a `multipart/byteranges` body (RFC 9110
 * section 14.6), one part per satisfiable range in the order asked, framed as Go's
 * `http.ServeContent` (distribution's blob server) frames it. containers/image asks this way for
 * the pieces of a zstd:chunked layer it lacks, and takes the parts by position: exactly one part
 * per range it asked for, never merged (a `200` makes it read, and the network carry, the whole
 * layer).
 *
 * The parts are read from one open of the blob (blobs.ts): of the range that covers them when the
 * header lists them in order, else of the whole blob; either way a miss asks the upstream for the
 * blob's size first (one HEAD), so that ranges past its end download nothing. A stored file seeks
 * from part to part; a blob still being fetched, or an object of the bucket, is read on and the
 * gaps skipped, which needs the parts in ascending order: out of order, those serve the whole blob
 * instead. From a fetch under way the last part's last byte and the closing delimiter wait, as a
 * whole blob's last byte does, until the fetch has verified the blob's digest.
 */
import { randomBytes } from 'node:crypto';
import type { Readable, Writable } from 'node:stream';
import { canReadInto, sendFilled, type RangeStream } from '../storage/file-range.js';
import { ObjectRange } from '../storage/object-range.js';
import type { ByteRange } from '../storage/types.js';
import type { RangeRequest } from './range.js';

/** Inclusive byte offsets of a part. */
export interface Part {
  start: number;
  end: number;
}

/** What is sent at once; a small read keeps a busy server's turns short. */
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

/**
 * The range that covers what `ranges` ask for when they are listed in order (each after the one
 * before it, no suffix form); undefined (the whole blob) otherwise.
 */
export function coveringSpan(ranges: readonly RangeRequest[]): ByteRange | undefined {
  const first = ranges[0];
  if (!first || 'suffix' in first) return undefined;
  let last = -1;
  for (const [i, range] of ranges.entries()) {
    if ('suffix' in range || range.start <= last) return undefined;
    if (range.end === undefined)
      return i === ranges.length - 1 ? { start: first.start } : undefined;
    last = range.end;
  }
  return { start: first.start, end: last };
}

/**
 * Whether the parts can be served from `stream` (the whole blob, or a span that covers them): not
 * when they ask for more bytes than the blob has (overlaps: a small request would make a big
 * answer; Go ignores such a Range too), nor out of order from a stream that cannot seek.
 */
export function servable(parts: readonly Part[], size: number, stream: Readable): boolean {
  const bytes = parts.reduce((sum, p) => sum + p.end - p.start + 1, 0);
  if (bytes > size) return false;
  const ascending = parts.every((p, i) => i === 0 || p.start > parts[i - 1]!.end);
  return ascending || typeof (stream as Partial<RangeStream>).seek === 'function';
}

/**
 * How the parts of a blob of `size` bytes are framed: several as multipart/byteranges, one (the
 * others unsatisfiable) as a plain 206 with its Content-Range, as Go answers.
 */
export class PartsFrame {
  private readonly boundary = randomBytes(15).toString('hex');
  readonly contentType: string;
  readonly contentLength: number;
  /** The Content-Range of a single part; undefined for multipart. */
  readonly contentRange: string | undefined;

  constructor(
    readonly parts: readonly Part[],
    private readonly size: number,
    private readonly partType = 'application/octet-stream',
  ) {
    const single = parts.length === 1;
    this.contentType = single ? partType : `multipart/byteranges; boundary=${this.boundary}`;
    this.contentRange = single ? this.range(parts[0]!) : undefined;
    let length = Buffer.byteLength(this.closing());
    parts.forEach((p, i) => (length += Buffer.byteLength(this.head(i)) + p.end - p.start + 1));
    this.contentLength = length;
  }

  /** What precedes part `i`'s bytes. */
  head(i: number): string {
    if (this.contentRange) return '';
    return (
      `${i === 0 ? '' : '\r\n'}--${this.boundary}\r\n` +
      `Content-Range: ${this.range(this.parts[i]!)}\r\n` +
      `Content-Type: ${this.partType}\r\n\r\n`
    );
  }

  closing(): string {
    return this.contentRange ? '' : `\r\n--${this.boundary}--\r\n`;
  }

  private range(p: Part): string {
    return `bytes ${p.start}-${p.end}/${this.size}`;
  }
}

/**
 * Writes the framed parts to `dest` (leaving it open) from `stream`, the blob from byte `origin`,
 * which `servable` accepted. `verified`: the stream follows a fetch under way, read to its end
 * (which it holds until the fetch has verified the blob) before the answer's last bytes go out.
 * The stream is destroyed afterwards either way. Rejects as `sendFilled` does: a client that went
 * away is its ERR_STREAM_PREMATURE_CLOSE (or its socket's error), not what that did to a read.
 */
export async function sendParts(
  dest: Writable,
  stream: Readable,
  origin: number,
  frame: PartsFrame,
  options: { verified?: boolean } = {},
): Promise<void> {
  const source: RangeStream = canReadInto(stream) ? stream : new ObjectRange(stream);
  // A failed fetch (or bucket read) destroys the stream with its error, which the next read
  // throws; as an event nobody else would hear it, and an unheard 'error' stops the process.
  source.on('error', () => {});
  const seek = source.seek?.bind(source);
  let pos = origin;
  let written = 0;
  let part = -1;
  let text: Buffer | undefined = undefined;
  let left = 0;
  let scratch: Buffer | undefined = undefined;
  /** Reads up to `length` bytes of the source, at `pos`, into `into`; fails at an early end. */
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
    if (!watching && !seek) {
      // A read waiting for a fetch's next bytes (or the bucket's) ends when the client has gone;
      // a file's read ends by itself.
      gone.addEventListener('abort', () => stream.destroy(), { once: true });
      watching = true;
    }
    let n = 0;
    try {
      while (n < buffer.length) {
        if (text) {
          const copied = text.copy(buffer, n);
          n += copied;
          text = copied < text.length ? text.subarray(copied) : undefined;
        } else if (left > 0) {
          // From a fetch, the last part's last byte is read (and sent) with the closing, after
          // the digest check below: until then the answer lacks a byte of what it promised.
          const held = options.verified && part === frame.parts.length - 1 ? 1 : 0;
          const want = left > held ? left - held : left;
          const got = await read(buffer.subarray(n), Math.min(want, buffer.length - n));
          n += got;
          left -= got;
          // What a fetch under way has brought goes out now, not once the buffer is full.
          if (!seek && left > 0) break;
        } else if (!seek && n > 0 && part + 1 < frame.parts.length) {
          break; // sent before skipping a gap, which may wait for the fetch
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
      written += n;
      if (options.verified && written === frame.contentLength) {
        // Held until the stream's end: a fetch that fails its digest check cuts the answer.
        scratch ??= Buffer.allocUnsafe(SEND_CHUNK);
        while ((await source.readInto(scratch, scratch.length)) > 0);
      }
    } catch (err) {
      throw gone.aborted ? (gone.reason as Error) : err;
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
