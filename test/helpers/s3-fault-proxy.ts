/**
 * An S3 endpoint in front of the test's radosgw for the faults radosgw cannot be made to produce:
 * it passes requests on (the host header kept, so signatures still match), except where `fault`
 * answers an S3 error (`{status, code}`), never answers (`'hang'`), or cuts the answer's body
 * half-way (`'cut'`).
 */
import { createServer, request as httpRequest, type IncomingMessage, type Server } from 'node:http';
import type { Socket } from 'node:net';
import { freePort } from './net.js';

export type S3Fault = { status: number; code: string } | 'hang' | 'cut' | undefined;

export async function s3FaultProxy(
  s3Endpoint: string,
  fault: (req: IncomingMessage) => S3Fault,
): Promise<{ endpoint: string; close(): void }> {
  const target = new URL(s3Endpoint);
  const sockets = new Set<Socket>();
  /** Error answers so far: each has a request id of its own, as S3's have. */
  let faults = 0;
  const proxy: Server = createServer((req, res) => {
    const answer = fault(req);
    if (answer === 'hang') {
      req.resume(); // and never answer
      return;
    }
    if (answer && answer !== 'cut') {
      req.resume();
      res.writeHead(answer.status, {
        'content-type': 'application/xml',
        'x-amz-request-id': `fault-${++faults}`,
      });
      res.end(
        `<?xml version="1.0" encoding="UTF-8"?><Error><Code>${answer.code}</Code><Message>${answer.code}</Message></Error>`,
      );
      return;
    }
    const upstream = httpRequest(
      {
        host: target.hostname,
        port: target.port,
        method: req.method,
        path: req.url,
        headers: req.headers,
      },
      (reply) => {
        res.writeHead(reply.statusCode!, reply.headers);
        if (answer !== 'cut') {
          reply.pipe(res);
          return;
        }
        const half = Number(reply.headers['content-length'] ?? 0) / 2;
        let sent = 0;
        reply.on('data', (chunk: Buffer) => {
          if (sent >= half) return;
          res.write(chunk);
          sent += chunk.length;
          if (sent >= half) {
            reply.destroy();
            res.socket?.destroy();
          }
        });
      },
    );
    upstream.on('error', () => res.destroy());
    req.pipe(upstream);
  });
  proxy.on('connection', (socket) => {
    sockets.add(socket);
    socket.once('close', () => sockets.delete(socket));
  });
  const port = await freePort();
  await new Promise<void>((resolve) => proxy.listen(port, '127.0.0.1', resolve));
  return {
    endpoint: `http://127.0.0.1:${port}`,
    close: () => {
      proxy.close();
      for (const socket of sockets) socket.destroy();
    },
  };
}
