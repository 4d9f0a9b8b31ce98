/**
 * A forwarder in front of the real test registry that paces blob bodies (a real registry cannot
 * be made slow): every request passes through unchanged, GETs of blobs are counted, and their
 * bodies are sent at `bytesPerSecond` so that a test can act while a fetch is under way; `down`
 * cuts every connection.
 */
import { createServer, request, type Server } from 'node:http';
import type { Socket } from 'node:net';

export class Throttle {
  url = '';
  /** Blob GETs answered, by digest. */
  readonly gets = new Map<string, number>();
  /** Blob bytes sent, all requests counted. */
  sentBytes = 0;
  bytesPerSecond = 16 * 1024 * 1024;
  /** While true, every request's connection is cut at once: an upstream that is down. */
  down = false;
  private server: Server | undefined;
  private readonly sockets = new Set<Socket>();

  private constructor(private readonly target: string) {}

  static async start(target: string): Promise<Throttle> {
    const t = new Throttle(target);
    t.server = createServer((req, res) => {
      if (t.down) {
        req.socket.destroy();
        return;
      }
      const digest = /\/blobs\/(sha256:[a-f0-9]{64})$/.exec(req.url ?? '')?.[1];
      const target = new URL(t.target);
      const upstream = request(
        {
          host: target.hostname,
          port: target.port,
          method: req.method,
          path: req.url,
          headers: req.headers,
        },
        (answer) => {
          res.writeHead(answer.statusCode ?? 502, answer.headers);
          if (!digest || req.method !== 'GET' || answer.statusCode !== 200) {
            answer.pipe(res);
            return;
          }
          t.gets.set(digest, (t.gets.get(digest) ?? 0) + 1);
          const started = Date.now();
          let sent = 0;
          answer.on('data', (chunk: Buffer) => {
            sent += chunk.length;
            t.sentBytes += chunk.length;
            res.write(chunk);
            // Pause until the pace has caught up with what was sent.
            const due = started + (sent / t.bytesPerSecond) * 1000 - Date.now();
            if (due > 0) {
              answer.pause();
              setTimeout(() => answer.resume(), due);
            }
          });
          answer.on('end', () => res.end());
          answer.on('error', () => res.destroy());
          res.on('close', () => answer.destroy());
        },
      );
      upstream.on('error', () => {
        if (!res.headersSent) res.writeHead(502);
        res.end();
      });
      req.pipe(upstream);
    });
    t.server.on('connection', (s) => {
      t.sockets.add(s);
      s.on('close', () => t.sockets.delete(s));
    });
    await new Promise<void>((resolve) => t.server!.listen(0, '127.0.0.1', resolve));
    const address = t.server.address();
    t.url = `http://127.0.0.1:${typeof address === 'object' && address ? address.port : 0}`;
    return t;
  }

  async close(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    await new Promise<void>((resolve) => this.server?.close(() => resolve()) ?? resolve());
  }
}
