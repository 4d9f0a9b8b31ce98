/**
 * GET and HEAD of manifests, the requests a mirror answers most (every pull starts with one or two
 * per image, and CI fleets make thousands a second). They are answered on Node's own request and
 * response objects, before express: express's router and request decoration cost three times
 * what the answer itself does (about 13,000 requests/s for an empty express route on the 2-core
 * machine, 65,000 for a bare handler). Anything that is not such a request, or whose name does
 * not route to a cache-mode upstream, goes on to express unchanged, errors included.
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { Config } from '../config/schema.js';
import type { Logger } from '../log/logger.js';
import { DigestInvalidError, ManifestUnknownError, type RegistryError } from '../oci/errors.js';
import { isTag, parseManifestReference } from '../oci/reference.js';
import { isManifestMediaType } from '../oci/media-types.js';
import { parseManifest } from '../oci/manifest.js';
import type { Digest } from '../oci/digest.js';
import type { RepositoryKey } from '../storage/types.js';
import type { UpstreamServices } from './types.js';
import { sendError } from './errors.js';
import {
  acceptsManifest,
  assertChildAccepted,
  substituteForAccept,
  variesWithAccept,
} from './manifest-accept.js';
import { logRequest, type RequestNotes } from './request-log.js';
import { routeRequest, type Route } from '../routing.js';
import type { Metrics } from '../metrics.js';
import type { RecentEvents } from '../status/events.js';
import { RequestMetrics } from './request-metrics.js';
import { repositoryLists } from '../access/repositories.js';
import type { AccessControl } from '../access/types.js';
import { AuthenticationRequiredError } from '../access/errors.js';

/**
 * Said of an answer served past its freshness window because the upstream could not confirm it.
 * The distribution spec's form (warn-code 299, warn-agent `-`): clients show no other (skopeo and
 * podman log a `299 -` warning, oras keeps only those).
 */
export const STALE_WARNING = '299 - "pullcache: stale, the upstream did not confirm this answer"';

/**
 * Headers of every answer on the registry API (`/v2`, passthrough answers included). What it
 * serves comes from upstreams, on the origin of the status page and the admin API (where a
 * browser may hold Basic credentials): a browser must never run it as a page. `nosniff` keeps
 * a browser to the Content-Type given; the policy makes any document read from here a sandbox
 * that loads and runs nothing. Not on the status page, whose scripts must run.
 */
export const API_SECURITY_HEADERS: Readonly<Record<string, string>> = {
  'X-Content-Type-Options': 'nosniff',
  'Content-Security-Policy': "default-src 'none'; sandbox",
};

export function setSecurityHeaders(res: ServerResponse): void {
  for (const [name, value] of Object.entries(API_SECURITY_HEADERS)) res.setHeader(name, value);
}

/** The registry API version every answer names, as distribution's do. */
export const API_VERSION_HEADER = 'Docker-Distribution-API-Version';
export const API_VERSION = 'registry/2.0';

/**
 * A request scoped by `ns` (the spec's registry proxying) is told which namespace served it, as
 * the spec asks of a registry that uses `ns`.
 */
export function setNamespaceHeader(res: ServerResponse, route: Route): void {
  if (route.ns !== undefined) res.setHeader('OCI-Namespace', route.ns);
}

/** The headers of every /v2 answer, on one written outside express's middleware. */
export function setApiHeaders(res: ServerResponse): void {
  res.setHeader(API_VERSION_HEADER, API_VERSION);
  setSecurityHeaders(res);
}

/**
 * Path segments may be percent-encoded (`sha256%3A...`); a bad encoding is the client's mistake,
 * told as `invalid` makes it: what the segment could not be (a digest: DIGEST_INVALID, a tag:
 * MANIFEST_UNKNOWN...).
 */
export function decodeSegment(segment: string, invalid: () => RegistryError): string {
  try {
    return decodeURIComponent(segment);
  } catch {
    throw invalid();
  }
}

/** What a segment that should be a digest is, when it does not decode. */
export const undecodableDigest = () =>
  new DigestInvalidError('malformed percent-encoding in the digest');

/**
 * Whether `If-None-Match` names `etag` (RFC 9110 section 13.1.2): `*`, or a list of entity
 * tags compared weakly (`W/"x"` matches `"x"`). A bare digest, as distribution takes it, too.
 */
export function noneMatchHolds(header: string | undefined, etag: string): boolean {
  if (header === undefined) return false;
  const opaque = etag.slice(1, -1);
  // Element by element (an entity tag holds no comma here: ours are digests), each matched
  // anchored: a regex run over the whole header took quadratic time on a long run of spaces.
  for (const element of header.split(',')) {
    const m = ENTITY_TAG.exec(element.trim());
    if (!m) continue;
    const [, , quoted, bare] = m;
    if (bare === '*' || quoted === opaque || bare === opaque) return true;
  }
  return false;
}

/**
 * Whether a Range may be served under `If-Range` (RFC 9110 section 13.1.5): without one, or
 * when it is the resource's own entity tag, compared strongly. A weak tag or a date (there is
 * no Last-Modified to compare it with) asks for the whole content instead.
 */
export function ifRangeHolds(header: string | string[] | undefined, etag: string): boolean {
  return header === undefined || (typeof header === 'string' && header.trim() === etag);
}

/** One element of an If-None-Match list: `W/"..."` or `"..."` (2; 1 for W/), or bare (`*`, 3). */
const ENTITY_TAG = /^(?:(W\/)?"([^"]*)"|([^\s"]+))$/;

/**
 * Answers a GET or HEAD of a manifest by tag or digest: from storage, else from the upstream
 * through the services. The Accept header chooses as the reference registry's does
 * (manifest-accept.ts): what it takes is served as stored, an OCI type it does not take is 404
 * MANIFEST_UNKNOWN, a Docker list by tag may be answered with its linux/amd64 image. Throws the
 * RegistryError to answer (ManifestUnknownError...), for the one error renderer.
 */
export async function serveManifest(
  req: IncomingMessage,
  res: ServerResponse,
  services: UpstreamServices,
  repo: RepositoryKey,
  /** As it appears in the path, maybe percent-encoded. */
  reference: string,
  notes: RequestNotes,
): Promise<void> {
  const value = decodeSegment(
    reference,
    () => new ManifestUnknownError(`${repo.repository}:${reference.slice(0, 140)}`),
  );
  // A reference that can be neither a tag nor a digest names no manifest: 404, as the
  // conformance suite expects (a malformed digest stays 400 DIGEST_INVALID).
  if (!value.includes(':') && !isTag(value))
    throw new ManifestUnknownError(`${repo.repository}:${value.slice(0, 140)}`);
  const ref = parseManifestReference(value);
  let digest;
  // A miss when the manifest had to come from the upstream for this request, by tag or digest.
  let fromUpstream = false;
  if (ref.kind === 'tag') {
    const resolved = await services.tags.resolve(repo, ref.tag);
    if (!resolved.found) throw new ManifestUnknownError(`${repo.repository}:${ref.tag}`);
    digest = resolved.digest;
    fromUpstream = resolved.fromUpstream === true;
    if (resolved.stale) res.setHeader('Warning', STALE_WARNING);
  } else {
    digest = ref.digest;
  }
  const head = req.method === 'HEAD';
  const byTag = ref.kind === 'tag';
  // After a tag the upstream was asked for, the manifest is what that answer brought (or the
  // tag service fetched): counted with the tag's miss, not as a hit of its own.
  let served = await loadManifest(services, repo, digest, head, !fromUpstream);
  if (variesWithAccept(served.mediaType, byTag)) res.setHeader('Vary', 'Accept');
  const accept = req.headers.accept;
  if (!acceptsManifest(accept, served.mediaType)) {
    const list = served;
    const child = await substituteForAccept(accept, list.mediaType, byTag, () =>
      list.body ? Promise.resolve(list.body) : manifestBytes(services, repo, list.digest),
    );
    if (child !== undefined) {
      fromUpstream ||= list.fromUpstream;
      // Through the manifest service, as any manifest: fetched and kept when not stored yet.
      served = await loadManifest(services, repo, child, head, false);
      assertChildAccepted(accept, served.mediaType);
    }
  }
  fromUpstream ||= served.fromUpstream;
  notes.cache = fromUpstream ? 'miss' : 'hit';
  // The entity tag of what is served: a list's child is its own representation, with its own
  // digest (distribution compares If-None-Match with the list's digest before choosing).
  const etag = `"${served.digest}"`;
  res.setHeader('Content-Type', served.mediaType);
  res.setHeader('Docker-Content-Digest', served.digest);
  res.setHeader('Content-Length', served.size);
  res.setHeader('ETag', etag);
  if (noneMatchHolds(req.headers['if-none-match'], etag)) {
    res.statusCode = 304;
    res.end();
  } else if (served.body === undefined) {
    res.end();
  } else {
    notes.bytes = served.size;
    res.end(served.body);
  }
}

/** A manifest as it is served: its bytes only for a GET. */
interface ServedManifest {
  digest: Digest;
  mediaType: string;
  size: number;
  body?: Buffer;
  /** It was fetched from the upstream for this request. */
  fromUpstream: boolean;
}

/**
 * The manifest `digest` of the repository, its bytes too unless `head`: from storage, else from
 * the upstream through the manifest service. `counted`: a lookup of its own in the metrics.
 * Throws ManifestUnknownError when neither has it.
 */
async function loadManifest(
  services: UpstreamServices,
  repo: RepositoryKey,
  digest: Digest,
  head: boolean,
  counted: boolean,
): Promise<ServedManifest> {
  if (head) {
    const stat = await services.manifests.stat(repo, digest);
    if (!stat.found) throw new ManifestUnknownError(`${repo.repository}@${digest}`);
    let { mediaType } = stat.link;
    if (!isManifestMediaType(mediaType)) {
      // Stored by an earlier version with the upstream's Content-Type: what its bytes say.
      mediaType = servedMediaType(mediaType, await manifestBytes(services, repo, digest));
    }
    return { digest, mediaType, size: stat.link.size, fromUpstream: stat.fromUpstream === true };
  }
  const manifest = await services.manifests.get(repo, digest, { counted });
  if (!manifest.found) throw new ManifestUnknownError(`${repo.repository}@${digest}`);
  return {
    digest,
    mediaType: servedMediaType(manifest.link.mediaType, manifest.bytes),
    size: manifest.bytes.length,
    body: manifest.bytes,
    fromUpstream: manifest.fromUpstream === true,
  };
}

/** The bytes of a manifest a HEAD has stat'ed, read again without counting a lookup. */
async function manifestBytes(
  services: UpstreamServices,
  repo: RepositoryKey,
  digest: Digest,
): Promise<Buffer> {
  const manifest = await services.manifests.get(repo, digest, { counted: false });
  if (!manifest.found) throw new ManifestUnknownError(`${repo.repository}@${digest}`);
  return manifest.bytes;
}

/**
 * The Content-Type a manifest is served with: the media type stored with it when that is a
 * manifest type (as everything stored since the upstream's header is checked), else the one its
 * bytes name or show (`parseManifest`). Earlier versions stored any Content-Type an upstream
 * sent but JSON's and octet-stream's, `text/html` included, which would have been served as is.
 */
function servedMediaType(stored: string, bytes: Uint8Array): string {
  if (isManifestMediaType(stored)) return stored;
  try {
    return parseManifest(bytes).mediaType;
  } catch {
    return 'application/octet-stream'; // stored as a manifest, so never the case: nothing to run
  }
}

const MANIFEST_PATH = /^\/v2\/(.+)\/manifests\/([^/]+)$/;

export interface FastPathDeps {
  config: Config;
  log: Logger;
  services: Map<string, UpstreamServices>;
  access: AccessControl;
  metrics: Metrics;
  /** Where refused requests are told, for the status page. */
  status?: { events: RecentEvents };
}

/**
 * The manifest fast path: returns true when it has taken the request (and will answer it, errors
 * included), false to leave it to express.
 */
export function createManifestFastPath(
  deps: FastPathDeps,
): (req: IncomingMessage, res: ServerResponse) => boolean {
  const httpLog = deps.log.child({ module: 'http' });
  const logRequests = httpLog.isLevelEnabled('info');
  const lists = repositoryLists(deps.config);
  const { access } = deps;
  const observed = new RequestMetrics(deps.metrics, deps.status?.events, (r) =>
    access.clientAddress(r),
  );
  const cells = {
    GET: observed.cells('manifest', 'GET'),
    HEAD: observed.cells('manifest', 'HEAD'),
  };
  return (req, res) => {
    if (req.method !== 'GET' && req.method !== 'HEAD') return false;
    const url = req.url ?? '';
    const query = url.indexOf('?');
    const m = MANIFEST_PATH.exec(query < 0 ? url : url.slice(0, query));
    if (!m) return false;
    let route: Route;
    try {
      route = routeRequest(
        deps.config,
        m[1]!,
        query < 0 ? undefined : nsParameter(url.slice(query + 1)),
      );
    } catch {
      return false; // express answers the same error, through the same routing
    }
    const services = deps.services.get(route.upstream);
    if (!services) return false; // passthrough
    const started = performance.now();
    const notes: RequestNotes = { upstream: route.upstream, repository: route.repository };
    setApiHeaders(res);
    setNamespaceHeader(res, route);
    if (logRequests) logRequest(httpLog, req, res, notes, access);
    const repo = { upstream: route.upstream, repository: route.repository };
    const serve = async () => {
      lists.check(route.upstream, route.repository); // outside the allow/deny lists: 403
      if (access.enabled) {
        // A credential verified recently is known synchronously: no bcrypt, no extra tick.
        const identified = access.identify(req);
        const identity = 'then' in identified ? await identified : identified;
        notes.user = identity.user;
        access.authorize(identity, 'pull', repo);
      }
      await serveManifest(req, res, services, repo, m[2]!, notes);
    };
    const method = req.method === 'GET' ? cells.GET : cells.HEAD;
    serve().then(
      () => observed.record(req, res, method, 'manifest', started, notes),
      (err: unknown) => {
        if (err instanceof AuthenticationRequiredError)
          res.setHeader('WWW-Authenticate', access.challenge(req));
        notes.errorCode = sendError(err, req, res, httpLog);
        observed.record(req, res, method, 'manifest', started, notes);
      },
    );
    return true;
  };
}

/** `ns` as express's simple query parser gives it: absent, one string, or several. */
function nsParameter(search: string): string | string[] | undefined {
  if (!search.includes('ns=')) return undefined;
  const all = new URLSearchParams(search).getAll('ns');
  return all.length === 0 ? undefined : all.length === 1 ? all[0] : all;
}
