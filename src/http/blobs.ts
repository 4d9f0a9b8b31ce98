/**
 * GET and HEAD of a blob (distribution spec "pull"): from storage, or followed as it is fetched
 * from the upstream; ranges, ETag revalidation, and a redirect to the object store when
 * `storage.s3.redirect` is set. A body that breaks off after the headers cuts the connection.
 */
import type { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import type { Request, Response } from 'express';
import { parseDigest, type Digest } from '../oci/digest.js';
import { BlobUnknownError, RangeInvalidError } from '../oci/errors.js';
import { canReadInto, isSendable } from '../storage/file-range.js';
import type { BlobService, ByteRange, RepositoryKey } from '../storage/types.js';
import { ifRangeHolds, noneMatchHolds } from './manifests.js';
import {
  ascending,
  covering,
  MultipartFrame,
  partBytes,
  resolveParts,
  sendParts,
  type Part,
} from './byte-ranges.js';
import { parseRanges } from './range.js';

export async function serveBlob(
  req: Request,
  res: Response,
  blobs: BlobService,
  repo: RepositoryKey,
  reference: string,
): Promise<void> {
  const digest = parseDigest(reference).digest;
  const etag = `"${digest}"`;
  const blobHeaders = (size: number) => {
    res.setHeader('Content-Type', 'application/octet-stream');
    res.setHeader('Docker-Content-Digest', digest);
    res.setHeader('ETag', etag);
    res.setHeader('Accept-Ranges', 'bytes');
    res.setHeader('Cache-Control', 'max-age=31536000');
    res.setHeader('Content-Length', size);
  };
  // A client that has the blob (GET or HEAD) learns it still exists, without its bytes.
  if (noneMatchHolds(req.headers['if-none-match'], etag)) {
    const stat = await blobs.stat(repo, digest);
    if (!stat.found) throw new BlobUnknownError(digest);
    res.setHeader('ETag', etag);
    res.setHeader('Docker-Content-Digest', digest);
    res.status(304).end();
    return;
  }
  if (req.method === 'HEAD') {
    const stat = await blobs.stat(repo, digest);
    if (!stat.found) throw new BlobUnknownError(digest);
    blobHeaders(stat.descriptor.size);
    res.status(200).end();
    return;
  }
  // Redirect mode: the client fetches a stored blob (and any range of it) from the storage.
  const location = await blobs.locate?.(repo, digest);
  if (location) {
    res.locals.cache = 'hit';
    res.setHeader('Docker-Content-Digest', digest);
    res.redirect(307, location);
    return;
  }
  // Under an If-Range that is not this blob's ETag, the client wants it whole (RFC 9110).
  const requested = ifRangeHolds(req.headers['if-range'], etag)
    ? parseRanges(req.headers.range)
    : undefined;
  let range: ByteRange | undefined;
  if (requested && requested.length > 1) {
    const stat = await blobs.stat(repo, digest);
    if (!stat.found) throw new BlobUnknownError(digest);
    const size = stat.descriptor.size;
    const parts = resolveParts(requested, size);
    if (parts.length === 0) throw new RangeInvalidError(size);
    if (parts.length === 1) {
      range = parts[0];
    } else if (partBytes(parts) <= size) {
      // More bytes than the blob (overlapping ranges) would make a small request a big answer:
      // such a Range is ignored, as Go's server does.
      const whole = await serveParts(req, res, blobs, repo, digest, parts, blobHeaders);
      if (!whole) return;
    }
  } else if (requested) {
    const [only] = requested;
    if (only && 'suffix' in only) {
      const stat = await blobs.stat(repo, digest);
      if (!stat.found) throw new BlobUnknownError(digest);
      if (only.suffix === 0) throw new RangeInvalidError(stat.descriptor.size);
      range = { start: Math.max(0, stat.descriptor.size - only.suffix) };
    } else {
      range = only;
    }
  }
  const opened = await blobs.open(repo, digest, range);
  if (!opened.found) throw new BlobUnknownError(digest);
  const { size } = opened.descriptor;
  res.locals.cache = opened.fromUpstream ? 'miss' : 'hit';
  if (opened.range) {
    blobHeaders(opened.range.end - opened.range.start + 1);
    res.setHeader('Content-Range', `bytes ${opened.range.start}-${opened.range.end}/${size}`);
    res.status(206);
  } else {
    blobHeaders(size);
    res.status(200);
  }
  res.locals.bytes = Number(res.getHeader('Content-Length'));
  // From the upstream, the first bytes wait for the upload session to open: let the client see
  // the response start as soon as the upstream has answered.
  if (opened.fromUpstream) res.flushHeaders();
  await sendBody(req, res, digest, () =>
    isSendable(opened.stream) ? opened.stream.sendTo(res) : pipeline(opened.stream, res),
  );
}

/**
 * Several ranges as multipart/byteranges (byte-ranges.ts), from one open of the range covering
 * them. Returns true when they must be served as the whole blob instead: out of order from a
 * stream that cannot seek (a fetch under way, an object of the bucket).
 */
async function serveParts(
  req: Request,
  res: Response,
  blobs: BlobService,
  repo: RepositoryKey,
  digest: Digest,
  parts: Part[],
  blobHeaders: (size: number) => void,
): Promise<boolean> {
  const span = covering(parts);
  const opened = await blobs.open(repo, digest, span);
  if (!opened.found) throw new BlobUnknownError(digest);
  if (!ascending(parts) && !canSeek(opened.stream)) {
    opened.stream.destroy();
    return true;
  }
  const frame = new MultipartFrame(parts, opened.descriptor.size);
  res.locals.cache = opened.fromUpstream ? 'miss' : 'hit';
  blobHeaders(frame.contentLength);
  res.setHeader('Content-Type', frame.contentType);
  res.status(206);
  res.locals.bytes = frame.contentLength;
  if (opened.fromUpstream) res.flushHeaders();
  await sendBody(req, res, digest, () => sendParts(res, opened.stream, span.start, frame));
  return false;
}

/** Runs `send` (the body after the headers) and ends the answer, or cuts it when it breaks. */
async function sendBody(
  req: Request,
  res: Response,
  digest: Digest,
  send: () => Promise<void>,
): Promise<void> {
  try {
    await send();
    if (!res.writableEnded) res.end();
  } catch (err) {
    // Headers are out: a broken source (or a bad digest upstream) must cut the connection so the
    // client never takes a short body for the blob. A client that went away is no news.
    const code = (err as NodeJS.ErrnoException).code;
    const clientLeft =
      code === 'ERR_STREAM_PREMATURE_CLOSE' || code === 'ECONNRESET' || code === 'EPIPE';
    if (!clientLeft) req.log.warn({ digest, err: (err as Error).message }, 'blob stream broke off');
    // Its request line then says the client left (request-log.ts), not a socket error's code.
    if (!res.destroyed) res.destroy(clientLeft ? undefined : (err as Error));
  }
}

function canSeek(stream: Readable): boolean {
  return canReadInto(stream) && typeof stream.seek === 'function';
}
