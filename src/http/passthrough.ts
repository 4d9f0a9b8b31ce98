/**
 * Passthrough upstreams: requests, pushes included, go to the upstream unchanged through
 * http-proxy. Nothing is cached. Without client authentication the client's own Authorization
 * goes on and the upstream's auth challenge comes back: pullcache is a transparent proxy. With
 * it, the client's credentials are pullcache's: the HTTP layer removes them, and the upstream's
 * challenge is never relayed (see `ForwardOptions.unauthorized`). URLs of its answer into the
 * upstream's /v2/ (a Location, the targets of a Link: the next page of a tags list) are pointed
 * at pullcache, addressed as the client addressed the request. The default upstream's `/v2/`
 * ping goes there too, unless it cannot be reached.
 */
import type {
  IncomingHttpHeaders,
  IncomingMessage,
  OutgoingHttpHeaders,
  ServerResponse,
} from 'node:http';
import { pipeline } from 'node:stream';
import httpProxy from 'http-proxy';
import type { UpstreamConfig } from '../config/schema.js';
import type { Logger } from '../log/logger.js';
import { UnavailableError, type RegistryError } from '../oci/errors.js';
import { rewriteLinkTargets } from './link-header.js';
import { API_SECURITY_HEADERS } from './manifests.js';

/** While the upstream stays unreachable, the local ping answer is logged once per this long. */
const PING_WARN_MS = 60_000;

/**
 * Headers of one connection, not of the answer (RFC 9110 section 7.6.1): Node frames what it
 * relays itself (Content-Length, else chunked), on the client's connection's own terms.
 */
const HOP_BY_HOP = new Set([
  'connection',
  'keep-alive',
  'proxy-connection',
  'proxy-authenticate',
  'proxy-authorization',
  'te',
  'trailer',
  'transfer-encoding',
  'upgrade',
]);

/**
 * The hop-by-hop headers of a request or an answer (RFC 9110 section 7.6.1): the fixed ones, and
 * those its Connection header names. Neither side of a proxy passes them on.
 */
function hopByHopOf(headers: IncomingHttpHeaders): Set<string> {
  const named = String(headers.connection ?? '')
    .split(',')
    .map((token) => token.trim().toLowerCase())
    .filter((token) => token !== '');
  return new Set([...HOP_BY_HOP, ...named]);
}

/** pullcache's own headers of every /v2 answer, which an upstream's do not replace. */
const OWN_HEADERS = new Set(Object.keys(API_SECURITY_HEADERS).map((h) => h.toLowerCase()));

export interface ForwardOptions {
  /** What the client put before the repository name, put back into the URLs pointed at pullcache. */
  prefix: string;
  /** The `ns` query parameter the client named the upstream with, carried into those URLs. */
  ns?: string;
  /**
   * Set when the client's credentials are pullcache's (client authentication on): the answer
   * to an upstream 401 instead of the upstream's (pullcache's own challenge, or a refusal), and
   * no `WWW-Authenticate` of the upstream reaches the client on any answer. A client answers a
   * challenge with the credentials it holds for the host it dialled (containerd's
   * dockerAuthorizer, Docker's and containers/image's alike), sending pullcache's to whatever
   * realm the upstream names.
   */
  unauthorized?: () => RegistryError;
}

/** What is known of a request on its way to the upstream, until its answer comes back. */
interface Forwarding extends ForwardOptions {
  onError: (err: unknown) => void;
  /** The URL it was sent to: what a relative URL of the answer is relative to. */
  base: URL;
}

export class Passthrough {
  private readonly proxy: httpProxy;
  private readonly target: URL;
  private readonly forwarding = new WeakMap<IncomingMessage, Forwarding>();
  /** When the last local ping answer was logged, and how many went unlogged since. */
  private pingWarned = -Infinity;
  private pingsUnlogged = 0;

  constructor(
    readonly name: string,
    config: UpstreamConfig,
    private readonly log: Logger,
  ) {
    this.target = new URL(config.url);
    this.proxy = httpProxy.createProxyServer({
      target: this.target.origin,
      changeOrigin: true,
      xfwd: false,
      proxyTimeout: config.timeouts.headers,
      // The answer is written by `relay`: http-proxy's own copies every header as it comes, the
      // upstream's challenge and hop-by-hop headers included, before anything can look at it.
      selfHandleResponse: true,
    });
    this.proxy.on('proxyRes', (proxyRes, req, res) => this.relay(proxyRes, req, res));
  }

  /** Forwards the request to `path` on the upstream; its answer goes back by `options`. */
  forward(
    req: IncomingMessage,
    res: ServerResponse,
    path: string,
    options: ForwardOptions,
    onError: (err: unknown) => void,
  ): void {
    this.send(req, res, path, { ...options, onError }, (err) => {
      this.log.warn({ upstream: this.name, err: err.message }, 'passthrough request failed');
      onError(this.unavailable(err));
    });
  }

  /**
   * Forwards the `/v2/` ping, whose answer (any status: a 401's challenge above all) tells clients
   * how to authenticate: only without client authentication (with it, pullcache answers the ping
   * itself, with its own challenge). When the upstream cannot be reached, `local` answers it
   * instead: clients give up on a failed ping, before asking for what the other upstreams could
   * serve them.
   */
  ping(
    req: IncomingMessage,
    res: ServerResponse,
    local: () => void,
    onError: (err: unknown) => void,
  ): void {
    this.send(req, res, '/v2/', { prefix: '', onError }, (err) => {
      if (res.headersSent) {
        // Cut while the upstream's answer went out: nothing else can be said.
        this.log.warn({ upstream: this.name, err: err.message }, 'passthrough request failed');
        onError(this.unavailable(err));
        return;
      }
      // Clients ping before every pull: one line a minute while it stays down, not one per pull.
      const now = Date.now();
      if (now - this.pingWarned >= PING_WARN_MS) {
        this.log.warn(
          { upstream: this.name, err: err.message, unlogged: this.pingsUnlogged },
          'passthrough upstream unreachable: /v2/ answered by pullcache',
        );
        this.pingWarned = now;
        this.pingsUnlogged = 0;
      } else this.pingsUnlogged++;
      local();
    });
  }

  private send(
    req: IncomingMessage,
    res: ServerResponse,
    path: string,
    forwarding: Omit<Forwarding, 'base'>,
    onError: (err: Error) => void,
  ): void {
    req.url = path;
    // The client's hop-by-hop headers were for this connection, not the upstream's: a
    // `Transfer-Encoding: gzip, chunked` passed on made the upstream refuse the request (501),
    // and `Proxy-Authorization` is a credential for a proxy, never an upstream's to see.
    for (const name of hopByHopOf(req.headers)) delete req.headers[name];
    this.forwarding.set(req, { ...forwarding, base: new URL(path, this.target) });
    this.proxy.web(req, res, {}, onError);
  }

  /** Writes the upstream's answer to the client: its status, body and end-to-end headers. */
  private relay(proxyRes: IncomingMessage, req: IncomingMessage, res: ServerResponse): void {
    const forwarding = this.forwarding.get(req);
    const status = proxyRes.statusCode ?? 502;
    if (forwarding?.unauthorized && status === 401) {
      // Its body names the upstream's scope and realm: not the client's to read either.
      proxyRes.resume();
      forwarding.onError(forwarding.unauthorized());
      return;
    }
    const headers: OutgoingHttpHeaders = {};
    const hopByHop = hopByHopOf(proxyRes.headers);
    for (const [name, value] of Object.entries(proxyRes.headers)) {
      if (value === undefined || hopByHop.has(name)) continue;
      if (OWN_HEADERS.has(name)) continue;
      if (name === 'www-authenticate' && forwarding?.unauthorized) continue;
      headers[name] = value;
    }
    if (forwarding) this.pointHere(headers, forwarding);
    res.statusCode = status;
    if (proxyRes.statusMessage) res.statusMessage = proxyRes.statusMessage;
    for (const [name, value] of Object.entries(headers)) res.setHeader(name, value!);
    // A body cut upstream cuts the client's connection (never a short body taken for whole);
    // a client that leaves stops the upstream's.
    pipeline(proxyRes, res, () => {});
  }

  /**
   * Points the answer's URLs into the upstream's /v2/ at pullcache: its Location, and the target
   * of each link of its Link header (a paginated list's next page: clients take its path and
   * query and ask the host they dialled, which must route them back to this upstream). A Link
   * that is not one by RFC 8288's grammar is dropped: what a client would make of it, an
   * upstream URL included, cannot be known.
   */
  private pointHere(headers: OutgoingHttpHeaders, forwarding: Forwarding): void {
    const { location, link } = headers;
    if (typeof location === 'string') headers.location = this.pointed(location, forwarding);
    if (typeof link === 'string') {
      const rewritten = rewriteLinkTargets(link, (target) => this.pointed(target, forwarding));
      if (rewritten === undefined) {
        delete headers.link;
        this.log.debug({ upstream: this.name }, 'passthrough Link header unreadable: dropped');
      } else headers.link = rewritten;
    }
  }

  /**
   * A URL of the upstream's answer, resolved against the request's URL (RFC 9110 section 10.2.2,
   * RFC 8288 section 3.1), pointed at pullcache when it is into the upstream's /v2/: a path on
   * pullcache with the client's prefix and `ns`. On pullcache, `ns` chooses the upstream: one the
   * upstream wrote goes (it would send the client to another upstream, or twice given, be
   * refused); userinfo and fragment go too. Any other full URL (another host's, as a blob's
   * redirect to storage; one that does not parse) is left as the upstream wrote it, in a Link as
   * in a Location: it is where the upstream sends its clients, pullcache never dials it, and no
   * credential of pullcache's is in it (passthrough forwards only the client's own). A relative
   * one outside /v2/ is made the upstream's full URL it names.
   */
  private pointed(value: string, forwarding: Forwarding): string {
    let url: URL;
    try {
      url = new URL(value, forwarding.base);
    } catch {
      return value;
    }
    if (url.origin !== this.target.origin || !url.pathname.startsWith('/v2/')) {
      // Written as a full URL: as it is. A relative one is where the upstream points (a path of
      // its own outside /v2/): resolved against it, or the client would resolve it against
      // pullcache.
      if (ABSOLUTE_URL.test(value)) return value;
      url.username = '';
      url.password = '';
      return url.href;
    }
    return `/v2/${forwarding.prefix}${url.pathname.slice(4)}${withNs(url.search, forwarding.ns)}`;
  }

  private unavailable(err: Error): UnavailableError {
    return new UnavailableError(`upstream ${this.name} is unavailable: ${err.message}`);
  }

  close(): void {
    this.proxy.close();
  }
}

/** A URL with its scheme (RFC 3986 section 3.1), not a reference relative to another. */
const ABSOLUTE_URL = /^[a-z][a-z0-9+.-]*:/i;

/** `search` (`?a=b`, or empty) with `ns=<ns>` as its only `ns` (none without), else as written. */
function withNs(search: string, ns: string | undefined): string {
  const params = search
    .slice(1)
    .split('&')
    .filter((param) => param !== '' && !new URLSearchParams(param).has('ns'));
  if (ns !== undefined) params.push(`ns=${encodeURIComponent(ns)}`);
  return params.length === 0 ? '' : `?${params.join('&')}`;
}
