/**
 * `GET /v2/<name>/referrers/<digest>[?artifactType=<type>]`: the manifests that name a subject
 * (https://github.com/opencontainers/distribution-spec/blob/main/spec.md#listing-referrers).
 * Always an image index, empty when there are none; a malformed digest is 400.
 */
import type { Request, Response } from 'express';
import { parseDigest } from '../oci/digest.js';
import { MediaType } from '../oci/media-types.js';
import type { RepositoryKey } from '../storage/types.js';
import type { ReferrersService } from '../storage/services.js';
import { decodeSegment, STALE_WARNING, undecodableDigest } from './manifests.js';

export async function serveReferrers(
  req: Request,
  res: Response,
  referrers: ReferrersService,
  repo: RepositoryKey,
  /** As it appears in the path, maybe percent-encoded. */
  reference: string,
): Promise<void> {
  const subject = parseDigest(decodeSegment(reference, undecodableDigest)).digest;
  const answer = await referrers.list(repo, subject, artifactTypes(req.query.artifactType));
  res.setHeader('Content-Type', MediaType.OciIndex);
  res.setHeader('Content-Length', answer.index.length);
  if (answer.filtersApplied.length > 0)
    res.setHeader('OCI-Filters-Applied', answer.filtersApplied.join(','));
  if (answer.stale) res.setHeader('Warning', STALE_WARNING);
  res.status(200);
  if (req.method === 'HEAD') {
    res.end();
  } else {
    res.locals.bytes = answer.index.length;
    res.end(answer.index);
  }
}

/**
 * The `artifactType` values asked for: one, or several (kept by any of them, as zot does); an
 * empty value asks for no filter.
 */
function artifactTypes(value: unknown): string[] {
  const values = Array.isArray(value) ? value : value === undefined ? [] : [value];
  return values.filter((v): v is string => typeof v === 'string' && v !== '');
}
