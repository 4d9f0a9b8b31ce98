/**
 * GET and HEAD of a blob (distribution spec "pull"): from storage, or followed as it is fetched
 * from the upstream; ranges, ETag revalidation, and a redirect to the object store when
 * `storage.s3.redirect` is set. A body that breaks off after the headers cuts the connection.
 */
import { pipeline } from 'node:stream/promises';
import type { Request, Response } from 'express';
import { parseDigest, type Digest } from '../oci/digest.js';
import { BlobUnknownError, RangeInvalidError } from '../oci/errors.js';
import { isSendable } from '../storage/file-range.js';
import type { ByteRange, OpenResult, RepositoryKey } from '../storage/types.js';
import type { BlobService } from '../storage/services.js';
import { ifRangeHolds, noneMatchHolds } from './manifests.js';
import { coveringSpan, PartsFrame, resolveParts, sendParts, servable } from './byte-ranges.js';
import { parseRanges, type RangeRequest } from './range.js';

type Opened = Extract<OpenResult, { found: true }>;

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
  // Under an If-Range that is not this blob's ETag, the client wants it whole (RFC 9110).
  const requested = ifRangeHolds(req.headers['if-range'], etag)
    ? parseRanges(req.headers.range)
    : undefined;
  // Redirect mode: the client fetches a stored blob (and a range of it) from the storage, which
  // serves one range per GET (S3): several are served here.
  const location =
    requested && requested.length > 1 ? undefined : await blobs.locate?.(repo, digest);
  if (location) {
    res.locals.cache = 'hit';
    res.setHeader('Docker-Content-Digest', digest);
    res.redirect(307, location);
    return;
  }
  let opened: Opened;
  if (requested && requested.length > 1) {
    const whole = await serveParts(req, res, blobs, repo, digest, requested, blobHeaders);
    if (!whole) return;
    opened = whole;
  } else {
    let range: ByteRange | undefined;
    const only = requested?.[0];
    if (only && 'suffix' in only) {
      const stat = await blobs.stat(repo, digest);
      if (!stat.found) throw new BlobUnknownError(digest);
      const [part] = resolveParts([only], stat.descriptor.size);
      if (!part) throw new RangeInvalidError(stat.descriptor.size);
      range = { start: part.start };
    } else {
      range = only;
    }
    const one = await blobs.open(repo, digest, range);
    if (!one.found) throw new BlobUnknownError(digest);
    opened = one;
  }
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
  const stream = opened.stream;
  await sendBody(req, res, digest, () =>
    isSendable(stream) ? stream.sendTo(res) : pipeline(stream, res),
  );
}

/**
 * Several ranges: the parts (byte-ranges.ts) from one open of the range covering them, or of the
 * whole blob, whose size says which are satisfiable. Returns that open when it is to be served
 * whole instead (ranges whose bytes add up to more than the blob, out of order from a stream that
 * cannot seek), undefined when the parts were sent.
 */
async function serveParts(
  req: Request,
  res: Response,
  blobs: BlobService,
  repo: RepositoryKey,
  digest: Digest,
  requested: RangeRequest[],
  blobHeaders: (size: number) => void,
): Promise<Opened | undefined> {
  const span = coveringSpan(requested);
  if (!span) {
    // The whole blob: its size first (a HEAD on a miss), so that ranges all past its end
    // download nothing.
    const stat = await blobs.stat(repo, digest);
    if (!stat.found) throw new BlobUnknownError(digest);
    const { size } = stat.descriptor;
    if (resolveParts(requested, size).length === 0) throw new RangeInvalidError(size);
  }
  const opened = await blobs.open(repo, digest, span);
  if (!opened.found) throw new BlobUnknownError(digest);
  const { size } = opened.descriptor;
  const parts = resolveParts(requested, size);
  if (parts.length === 0) {
    opened.stream.destroy();
    throw new RangeInvalidError(size);
  }
  // Not servable only from an open of the whole blob: parts listed in order are ascending and
  // within their span.
  if (!servable(parts, size, opened.stream)) return opened;
  const frame = new PartsFrame(parts, size);
  res.locals.cache = opened.fromUpstream ? 'miss' : 'hit';
  blobHeaders(frame.contentLength);
  res.setHeader('Content-Type', frame.contentType);
  if (frame.contentRange) res.setHeader('Content-Range', frame.contentRange);
  res.status(206);
  res.locals.bytes = frame.contentLength;
  if (opened.fromUpstream) res.flushHeaders();
  const { stream, fromUpstream } = opened;
  await sendBody(req, res, digest, () =>
    sendParts(res, stream, span?.start ?? 0, frame, { verified: fromUpstream }),
  );
  return undefined;
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
