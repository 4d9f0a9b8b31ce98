/**
 * Routing: which upstream and repository a request or an image reference names. Used by the HTTP
 * layer and the commands alike, so it lives below both.
 *
 * Which upstream a request is for, and the repository name there. In order:
 *  1. the `ns` query parameter containerd adds when it uses a mirror (`?ns=docker.io`), which must
 *     name a configured upstream (a first path component equal to it is that upstream too);
 *  2. a first path component equal to an upstream name (`/v2/ghcr.io/org/image/...`);
 *  3. `routing.default`.
 * On an upstream named `docker.io`, a one-component name gets Docker Hub's `library/` prefix.
 * Only configured upstreams are ever chosen: no host is taken from a request.
 */
import type { Config } from './config/schema.js';
import type { ImageRef } from './lifecycle/types.js';
import { NameUnknownError, UpstreamUnknownError } from './oci/errors.js';
import type { Digest } from './oci/digest.js';
import {
  parseImageReference,
  parseRepository,
  type Repository,
  type Tag,
} from './oci/reference.js';

export interface Route {
  upstream: string;
  repository: Repository;
  /**
   * How the client addressed it: the name's upstream component (`ghcr.io/`, else empty) and the
   * `ns` query parameter when it gave one. Passthrough puts both back into the URLs of an
   * upstream's answer (Location, Link) that it points at pullcache.
   */
  prefix: string;
  ns: string | undefined;
}

export function routeRequest(config: Config, name: string, ns: unknown): Route {
  // Validate the whole name first: nothing unvalidated goes further, `..` and `%2e` included.
  parseRepository(name);
  let upstream: string | undefined;
  let rest = name;
  let prefix = '';
  if (ns !== undefined) {
    if (typeof ns !== 'string' || !Object.hasOwn(config.upstreams, ns))
      throw new UpstreamUnknownError(String(ns));
    upstream = ns;
    // A hosts.toml entry that addresses the upstream by path (`.../v2/ghcr.io`, override_path)
    // gets `ns` too: the path's upstream is the same one, not part of the name.
    if (name.startsWith(`${ns}/`)) {
      rest = name.slice(ns.length + 1);
      prefix = `${ns}/`;
    }
  } else {
    const slash = name.indexOf('/');
    const first = slash > 0 ? name.slice(0, slash) : undefined;
    if (first !== undefined && Object.hasOwn(config.upstreams, first)) {
      upstream = first;
      rest = name.slice(slash + 1);
      prefix = `${first}/`;
    } else {
      upstream = config.routing.default;
    }
  }
  if (upstream === undefined) throw new NameUnknownError(name);
  return {
    upstream,
    repository: withLibraryPrefix(upstream, rest),
    prefix,
    // The `ns` given (a configured upstream's name); always a field, so that routes share a shape.
    ns: ns !== undefined ? upstream : undefined,
  };
}

/** Docker Hub's official images: on the upstream named docker.io, `alpine` is `library/alpine`. */
function withLibraryPrefix(upstream: string, name: string): Repository {
  return parseRepository(
    upstream === 'docker.io' && !name.includes('/') ? `library/${name}` : name,
  );
}

/** How clients address a repository of an upstream: bare on the default upstream, else prefixed. */
export function clientName(config: Config, upstream: string, repository: string): string {
  return upstream === config.routing.default ? repository : `${upstream}/${repository}`;
}

export interface ImageLocation {
  upstream: string;
  repository: Repository;
  tag?: Tag;
  digest?: Digest;
}

/**
 * docker's reference grammar reads a first component with a `.` or a `:`, or `localhost`, as a
 * registry host: whoever types `quay.io/org/app` means that registry, never a repository
 * `quay.io/org/app` of the default upstream. (A request's path is read as distribution reads it:
 * a name is a name there.)
 */
export function looksLikeHost(component: string): boolean {
  return component.includes('.') || component.includes(':') || component === 'localhost';
}

/**
 * A reference as people write it on a command line, `[upstream/]repository[:tag|@digest]`, with
 * the routing rules of requests: a first component naming a configured upstream selects it,
 * else `routing.default` (so `alpine:3.20` is docker.io's `library/alpine:3.20`); a first
 * component that looks like a host and names no configured upstream is UpstreamUnknownError.
 */
export function parseLocation(config: Config, value: string): ImageLocation {
  const slash = value.indexOf('/');
  const first = slash > 0 ? value.slice(0, slash) : undefined;
  const named = first !== undefined && Object.hasOwn(config.upstreams, first);
  if (first !== undefined && !named && looksLikeHost(first)) throw new UpstreamUnknownError(first);
  const ref = parseImageReference(named ? value.slice(slash + 1) : value);
  let location: ImageLocation;
  if (named) {
    location = { upstream: first, repository: withLibraryPrefix(first, ref.repository) };
  } else {
    const route = routeRequest(config, ref.repository, undefined);
    location = { upstream: route.upstream, repository: route.repository };
  }
  if (ref.tag !== undefined) location.tag = ref.tag;
  if (ref.digest !== undefined) location.digest = ref.digest;
  return location;
}

/** The full reference of an image, as bundles name it: `docker.io/library/alpine:3.20`. */
export function formatLocation(location: ImageLocation): string {
  return `${location.upstream}/${location.repository}${location.tag ? `:${location.tag}` : ''}${location.digest && !location.tag ? `@${location.digest}` : ''}`;
}

/**
 * References as people write them (`alpine:3.20`, `ghcr.io/org/app@sha256:...`), validated, as
 * the lifecycle takes them (pins, removals). Throws NameInvalidError and its kin.
 */
export function imageRefs(config: Config, references: string[]): ImageRef[] {
  return references.map((reference) => {
    const location = parseLocation(config, reference);
    const ref: ImageRef = {
      upstream: location.upstream,
      repository: location.repository,
      reference,
    };
    if (location.tag !== undefined) ref.tag = location.tag;
    if (location.digest !== undefined) ref.digest = location.digest;
    return ref;
  });
}
