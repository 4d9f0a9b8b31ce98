/**
 * A forwarder in front of the real test registry that does what Docker Hub does and
 * distribution cannot be made to: it sends RateLimit headers with every manifest GET (one pull
 * less left each time), and it can send blob bodies slowly, so that a test sees a fetch while it
 * is under way. Everything else passes through unchanged.
 */
import { createServer, request, type Server } from 'node:http';
import type { Socket } from 'node:net';

export class HubLike {
  url = '';
  /** The pull limit reported; `remaining` goes down with every manifest GET. */
  limit = 100;
  remaining = 100;
  /** Blob bodies are sent at this rate; Infinity: as fast as they come. */
  blobBytesPerSecond = Infinity;
  private server: Server | undefined;
  private readonly sockets = new Set<Socket>();

  private constructor(private readonly target: URL) {}

  static async start(target: string): Promise<HubLike> {
    const hub = new HubLike(new URL(target));
    await hub.listen();
    return hub;
  }

  private async listen(): Promise<void> {
    this.server = createServer((req, res) => {
      const isManifestGet = req.method === 'GET' && /\/manifests\//.test(req.url ?? '');
      const isBlobGet = req.method === 'GET' && /\/blobs\/sha256:/.test(req.url ?? '');
      const upstream = request(
        {
          host: this.target.hostname,
          port: this.target.port,
          method: req.method,
          path: req.url,
          headers: req.headers,
        },
        (answer) => {
          const headers = { ...answer.headers };
          if (isManifestGet && answer.statusCode === 200) {
            this.remaining = Math.max(0, this.remaining - 1);
            headers['ratelimit-limit'] = `${this.limit};w=21600`;
            headers['ratelimit-remaining'] = `${this.remaining};w=21600`;
          }
          res.writeHead(answer.statusCode ?? 502, headers);
          if (!isBlobGet || !Number.isFinite(this.blobBytesPerSecond)) {
            answer.pipe(res);
            return;
          }
          this.pace(answer, res);
        },
      );
      upstream.on('error', () => res.destroy());
      req.pipe(upstream);
    });
    this.server.on('connection', (s) => {
      this.sockets.add(s);
      s.on('close', () => this.sockets.delete(s));
    });
    await new Promise<void>((resolve) => this.server!.listen(0, '127.0.0.1', resolve));
    const address = this.server.address();
    this.url = `http://127.0.0.1:${typeof address === 'object' && address ? address.port : 0}`;
  }

  /** Sends the body in 64 KiB steps at `blobBytesPerSecond`. */
  private pace(from: NodeJS.ReadableStream, to: NodeJS.WritableStream & { destroyed: boolean }) {
    const step = 64 * 1024;
    const pending: Buffer[] = [];
    let ended = false;
    let timer: NodeJS.Timeout | undefined;
    const send = () => {
      timer = undefined;
      if (to.destroyed) return;
      let budget = step;
      while (budget > 0 && pending.length > 0) {
        const chunk = pending[0]!;
        const part = chunk.subarray(0, budget);
        to.write(part);
        budget -= part.length;
        if (part.length === chunk.length) pending.shift();
        else pending[0] = chunk.subarray(part.length);
      }
      if (pending.length === 0 && ended) {
        to.end();
        return;
      }
      schedule();
    };
    const schedule = () => {
      timer ??= setTimeout(send, (step / this.blobBytesPerSecond) * 1000);
    };
    from.on('data', (chunk: Buffer) => {
      pending.push(chunk);
      schedule();
    });
    from.on('end', () => {
      ended = true;
      schedule();
    });
    from.on('error', () => {
      clearTimeout(timer);
      (to as unknown as Socket).destroy();
    });
  }

  async close(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    await new Promise<void>((resolve) => this.server?.close(() => resolve()) ?? resolve());
  }
}
