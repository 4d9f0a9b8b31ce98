/**
 * What a passthrough upstream is sent for one OCI API request (passthrough.ts sends it): the
 * path after the name, each segment validated and decoded; the query, with a cross-repository
 * mount's source routed and checked as a pull of it would be; and, with client authentication
 * on, what the client is told instead of the upstream's 401.
 */
import type { Request } from 'express';
import type { Config } from '../config/schema.js';
import {
  BlobUploadUnknownError,
  DeniedError,
  DigestInvalidError,
  ManifestUnknownError,
  NameInvalidError,
  type RegistryError,
} from '../oci/errors.js';
import { parseDigest } from '../oci/digest.js';
import { isTag, parseManifestReference } from '../oci/reference.js';
import { routeRequest, type Route } from '../routing.js';
import type { RepositoryLists } from '../access/repositories.js';
import { AuthenticationRequiredError } from '../access/errors.js';
import type { AccessControl, Identity } from '../access/types.js';
import { decodeSegment, undecodableDigest } from './manifests.js';

/** What a mount's source is checked against: the routing and lists, and who asks. */
export interface MountChecks {
  config: Config;
  lists: RepositoryLists;
  access: AccessControl;
  /** The caller, as the identity middleware found it. */
  identity: Identity;
}

/**
 * A cross-repository mount's source (`?mount=<digest>&from=<name>` on a passthrough upload):
 * routed like the name, refused as a pull of it would be (lists, `pull`), and named to the
 * upstream as the upstream knows it. The query as the client sent it when there is none.
 */
export function passthroughQuery(
  req: Request,
  route: Route,
  action: string,
  checks: MountChecks,
): string {
  const { config, lists, access, identity } = checks;
  const at = req.originalUrl.indexOf('?');
  const search = at >= 0 ? req.originalUrl.slice(at) : '';
  if (!action.startsWith('blobs/uploads')) return search;
  const params = new URLSearchParams(search);
  if (!params.has('mount') && !params.has('from')) return search;
  const [mount, ...moreMounts] = params.getAll('mount');
  const [from, ...moreFroms] = params.getAll('from');
  if (moreMounts.length > 0) throw new DigestInvalidError('mount must be given once');
  if (moreFroms.length > 0) throw new NameInvalidError('from must be given once');
  if (mount !== undefined) parseDigest(mount);
  const source = from === undefined ? undefined : routeRequest(config, from, req.query.ns);
  if (source === undefined || source.upstream !== route.upstream) {
    // Nothing to check the upstream's choice against (a mount from wherever the credentials
    // reach), or another upstream's repository: an upload instead, as a registry that does
    // not mount answers.
    params.delete('mount');
    params.delete('from');
  } else {
    lists.check(source.upstream, source.repository);
    access.authorize(identity, 'pull', source);
    params.set('from', source.repository);
  }
  const rest = params.toString();
  return rest === '' ? '' : `?${rest}`;
}

/**
 * The answer to a passthrough upstream's 401 with client authentication on, whose credentials
 * pullcache does not forward. A caller without any credential is challenged as on any endpoint
 * (pullcache's realm: it may hold credentials for pullcache, and clients send them only when
 * challenged). A caller with one (a user, a token, an anonymous one too) is refused: a challenge
 * it already met would only send it round the token realm again to the same 401.
 */
export function upstreamUnauthorized(identity: Identity, route: Route): RegistryError {
  if (!identity.credentialed) return new AuthenticationRequiredError('authentication required');
  return new DeniedError(
    `upstream ${route.upstream} requires authentication for ${route.repository}, and pullcache ` +
      'forwards no client credentials to it (client authentication is on)',
  );
}

/** An upload session's id as registries make them (distribution's route takes these). */
const UPLOAD_ID = /^[A-Za-z0-9_.=~+-]{1,1024}$/;

/**
 * What follows the name on a passthrough request, each segment validated and sent decoded: the
 * upstream decodes them too, and a `..%2F` there would leave the repository that was checked
 * (`/v2/public/app/manifests/..%2F..%2Fsecret%2Fapp%2Fmanifests%2Flatest`). A reference that is
 * neither a tag nor a digest is 404 MANIFEST_UNKNOWN, as on a cache upstream; a bad digest 400
 * DIGEST_INVALID; a bad upload id 404 BLOB_UPLOAD_UNKNOWN.
 */
export function passthroughAction(route: Route, action: string): string {
  const slash = action.indexOf('/');
  const kind = action.slice(0, slash);
  const rest = action.slice(slash + 1);
  if (kind === 'tags') return action; // tags/list
  if (kind === 'manifests') {
    const unknown = (value: string) =>
      new ManifestUnknownError(`${route.repository}:${value.slice(0, 140)}`);
    const value = decodeSegment(rest, () => unknown(rest));
    if (!value.includes(':') && !isTag(value)) throw unknown(value);
    parseManifestReference(value); // a malformed digest: 400
    return `manifests/${value}`;
  }
  if (kind === 'referrers') {
    return `referrers/${parseDigest(decodeSegment(rest, undecodableDigest)).digest}`;
  }
  if (rest === 'uploads' || rest === 'uploads/') return action;
  if (rest.startsWith('uploads/')) {
    const raw = rest.slice('uploads/'.length);
    const unknown = (value: string) => new BlobUploadUnknownError(value.slice(0, 140));
    const id = decodeSegment(raw, () => unknown(raw));
    if (!UPLOAD_ID.test(id) || /^\.+$/.test(id)) throw unknown(id);
    return `blobs/uploads/${id}`;
  }
  return `blobs/${parseDigest(decodeSegment(rest, undecodableDigest)).digest}`;
}
