/**
 * Which upstream a request is for, and the repository name there. In order:
 *  1. the `ns` query parameter containerd adds when it uses a mirror (`?ns=docker.io`), which must
 *     name a configured upstream;
 *  2. a first path component equal to an upstream name (`/v2/ghcr.io/org/image/...`);
 *  3. `routing.default`.
 * On an upstream named `docker.io`, a one-component name gets Docker Hub's `library/` prefix.
 * Only configured upstreams are ever chosen: no host is taken from a request.
 */
import type { Config } from '../config/schema.js';
import { NameUnknownError, UpstreamUnknownError } from '../oci/errors.js';
import { parseRepository, type Repository } from '../oci/reference.js';

export interface Route {
  upstream: string;
  repository: Repository;
  /** How the client addressed it (for Location rewriting in passthrough). */
  prefix: string;
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
  if (upstream === 'docker.io' && !rest.includes('/')) rest = `library/${rest}`;
  return { upstream, repository: parseRepository(rest), prefix };
}

/** How clients address a repository of an upstream: bare on the default upstream, else prefixed. */
export function clientName(config: Config, upstream: string, repository: string): string {
  return upstream === config.routing.default ? repository : `${upstream}/${repository}`;
}
