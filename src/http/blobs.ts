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
import type { BlobService, ByteRange, OpenResult, RepositoryKey } from '../storage/types.js';
import { ifRangeHolds, noneMatchHolds } from './manifests.js';
import { coveringSpan, PartsFrame, resolveParts, sendParts, servable } from './byte-ranges.js';
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
  let opened: OpenResult;
  if (requested && requested.length > 1) {
    // The range covering the parts, or the whole blob (byte-ranges.ts); its size says which
    // parts are satisfiable.
    const span = coveringSpan(requested);
    if (!span) {
      // The whole blob: its size first (a HEAD on a miss), so that ranges all past its end
      // download nothing.
      const stat = await blobs.stat(repo, digest);
      if (!stat.found) throw new BlobUnknownError(digest);
      const { size } = stat.descriptor;
      if (resolveParts(requested, size).length === 0) throw new RangeInvalidError(size);
    }
    opened = await blobs.open(repo, digest, span);
    if (!opened.found) throw new BlobUnknownError(digest);
    const { size } = opened.descriptor;
    const parts = resolveParts(requested, size);
    if (parts.length === 0) {
      opened.stream.destroy();
      throw new RangeInvalidError(size);
    }
    if (servable(parts, size, opened.stream)) {
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
      return;
    }
    // Otherwise the whole blob, from this open (below): only an open of the whole blob gets here,
    // since parts listed in order are ascending and within their span.
  } else {
    let range: ByteRange | undefined;
    const only = requested?.[0];
    if (only && 'suffix' in only) {
      const stat = await blobs.stat(repo, digest);
      if (!stat.found) throw new BlobUnknownError(digest);
      if (only.suffix === 0) throw new RangeInvalidError(stat.descriptor.size);
      range = { start: Math.max(0, stat.descriptor.size - only.suffix) };
    } else {
      range = only;
    }
    opened = await blobs.open(repo, digest, range);
    if (!opened.found) throw new BlobUnknownError(digest);
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
