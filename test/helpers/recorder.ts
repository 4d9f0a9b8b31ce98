/**
 * A recording forwarder in front of the real test registry (or the real S3 server): every
 * request pullcache makes to it passes through here unchanged and is counted, so tests can
 * assert what did (and did not) reach the upstream or the bucket. It can also be switched to
 * refuse connections (upstream down), to drop the Content-Length of HEAD answers, or to drop the
 * Docker-Content-Digest of manifest HEAD answers (as a proxy in front of an upstream may).
 */
import { Agent, createServer, type IncomingHttpHeaders, type Server } from 'node:http';
import type { Socket } from 'node:net';
import httpProxy from 'http-proxy';

export interface Recorded {
  method: string;
  path: string;
  status: number;
  /** Bytes of the answer's body. */
  bytes: number;
  /** Bytes of the request's body, as its headers said (an S3 client's decoded length). */
  sent: number;
}

export class Recorder {
  readonly requests: Recorded[] = [];
  /** The request headers of each request received, in order (reset with `requests`). */
  readonly headers: IncomingHttpHeaders[] = [];
  /** HEAD answers lose their Content-Length on the way (an upstream that does not send it). */
  headWithoutLength = false;
  /** Manifest HEAD answers lose their Docker-Content-Digest on the way (older spec versions). */
  headWithoutDigest = false;
  url = '';
  private server: Server | undefined;
  private readonly proxy: httpProxy;
  private readonly sockets = new Set<Socket>();

  private constructor(target: string) {
    // Keep-alive to the registry, as a real upstream's front end would (without an agent,
    // http-proxy asks for `Connection: close` on every request).
    this.proxy = httpProxy.createProxyServer({
      target,
      changeOrigin: false,
      agent: new Agent({ keepAlive: true }),
    });
    this.proxy.on('proxyRes', (proxyRes, req) => {
      if (this.headWithoutLength && req.method === 'HEAD')
        delete proxyRes.headers['content-length'];
      if (this.headWithoutDigest && req.method === 'HEAD' && /\/manifests\//.test(req.url ?? ''))
        delete proxyRes.headers['docker-content-digest'];
      const entry: Recorded = {
        method: req.method ?? '',
        path: (req.url ?? '').split('?')[0]!,
        status: proxyRes.statusCode ?? 0,
        bytes: 0,
        sent: Number(
          req.headers['x-amz-decoded-content-length'] ?? req.headers['content-length'] ?? 0,
        ),
      };
      this.requests.push(entry);
      proxyRes.on('data', (chunk: Buffer) => (entry.bytes += chunk.length));
    });
  }

  static async start(target: string, port = 0): Promise<Recorder> {
    const r = new Recorder(target);
    await r.listen(port);
    return r;
  }

  private async listen(port: number): Promise<void> {
    this.server = createServer((req, res) => {
      this.headers.push({ ...req.headers });
      this.proxy.web(req, res, {}, () => {
        if (!res.headersSent) res.writeHead(502);
        res.end();
      });
    });
    this.server.on('connection', (s) => {
      this.sockets.add(s);
      s.on('close', () => this.sockets.delete(s));
    });
    await new Promise<void>((resolve) => this.server!.listen(port, '127.0.0.1', resolve));
    const address = this.server.address();
    this.url = `http://127.0.0.1:${typeof address === 'object' && address ? address.port : 0}`;
  }

  get port(): number {
    return Number(new URL(this.url).port);
  }

  /** Stops listening: the upstream refuses connections, as a dead host does. */
  async down(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    await new Promise<void>((resolve) => this.server?.close(() => resolve()) ?? resolve());
  }

  /** Listens again on the same port. */
  async up(): Promise<void> {
    await this.listen(this.port);
  }

  reset(): void {
    this.requests.length = 0;
    this.headers.length = 0;
  }

  count(method: string, pattern: RegExp): number {
    return this.requests.filter((r) => r.method === method && pattern.test(r.path)).length;
  }

  blobBytes(): number {
    return this.requests
      .filter((r) => r.method === 'GET' && r.path.includes('/blobs/'))
      .reduce((n, r) => n + r.bytes, 0);
  }

  async close(): Promise<void> {
    await this.down();
    this.proxy.close();
  }
}
