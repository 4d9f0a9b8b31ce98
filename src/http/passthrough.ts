/**
 * Passthrough upstreams: requests, pushes included, go to the upstream unchanged through
 * http-proxy. Nothing is cached; the client's own Authorization is forwarded; Location headers
 * that point into the upstream's /v2/ are rewritten to point at pullcache. The default upstream's
 * `/v2/` ping goes there too, unless it cannot be reached.
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import httpProxy from 'http-proxy';
import type { UpstreamConfig } from '../config/schema.js';
import type { Logger } from '../log/logger.js';
import { UnavailableError } from '../oci/errors.js';

/** While the upstream stays unreachable, the local ping answer is logged once per this long. */
const PING_WARN_MS = 60_000;

export class Passthrough {
  private readonly proxy: httpProxy;
  private readonly target: URL;
  /** What each client put before the repository name, to put back into Location headers. */
  private readonly prefixes = new WeakMap<IncomingMessage, string>();
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
    });
    this.proxy.on('proxyRes', (proxyRes, req) => {
      const location = proxyRes.headers.location;
      if (!location) return;
      let url: URL;
      try {
        url = new URL(location, this.target);
      } catch {
        return;
      }
      if (url.origin !== this.target.origin || !url.pathname.startsWith('/v2/')) return;
      proxyRes.headers.location = `/v2/${this.prefixes.get(req) ?? ''}${url.pathname.slice(4)}${url.search}`;
    });
  }

  /** Forwards the request to `path` on the upstream; `prefix` is what the client put before the name. */
  forward(
    req: IncomingMessage,
    res: ServerResponse,
    path: string,
    prefix: string,
    onError: (err: unknown) => void,
  ): void {
    this.send(req, res, path, prefix, (err) => {
      this.log.warn({ upstream: this.name, err: err.message }, 'passthrough request failed');
      onError(this.unavailable(err));
    });
  }

  /**
   * Forwards the `/v2/` ping, whose answer (any status: a 401's challenge above all) tells clients
   * how to authenticate. When the upstream cannot be reached, `local` answers it instead: clients
   * give up on a failed ping, before asking for what the other upstreams could serve them.
   */
  ping(
    req: IncomingMessage,
    res: ServerResponse,
    local: () => void,
    onError: (err: unknown) => void,
  ): void {
    this.send(req, res, '/v2/', '', (err) => {
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
    prefix: string,
    onError: (err: Error) => void,
  ): void {
    req.url = path;
    this.prefixes.set(req, prefix);
    this.proxy.web(req, res, {}, onError);
  }

  private unavailable(err: Error): UnavailableError {
    return new UnavailableError(`upstream ${this.name} is unavailable: ${err.message}`);
  }

  close(): void {
    this.proxy.close();
  }
}
