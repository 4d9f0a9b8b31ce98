/** In-process HTTP servers, only for faults a real registry cannot be made to produce. */
import { createHash } from 'node:crypto';
import { ociManifest } from './images.js';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';

export interface FakeServer {
  url: string;
  port: number;
  requests: { method: string; url: string; headers: IncomingMessage['headers'] }[];
  close(): Promise<void>;
}

export async function fakeServer(
  handler: (req: IncomingMessage, res: ServerResponse) => void,
  host = '127.0.0.1',
): Promise<FakeServer> {
  const requests: FakeServer['requests'] = [];
  const server: Server = createServer((req, res) => {
    requests.push({ method: req.method ?? '', url: req.url ?? '', headers: req.headers });
    handler(req, res);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const address = server.address();
  const port = typeof address === 'object' && address ? address.port : 0;
  return {
    url: `http://${host}:${port}`,
    port,
    requests,
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}

/**
 * A manifest a fake upstream serves by digest (a referrers subject: an answer is stored only for
 * a subject the repository holds). `serve` answers its GET or HEAD and says whether it did.
 */
export function servedManifest(repository: string, seed: string) {
  const mediaType = 'application/vnd.oci.image.manifest.v1+json';
  const bytes = ociManifest(
    {
      digest: `sha256:${createHash('sha256').update(seed).digest('hex')}`,
      size: Buffer.byteLength(seed),
    },
    [],
  );
  const digest = `sha256:${createHash('sha256').update(bytes).digest('hex')}`;
  const serve = (req: IncomingMessage, res: ServerResponse): boolean => {
    if (new URL(req.url ?? '/', 'http://fake').pathname !== `/v2/${repository}/manifests/${digest}`)
      return false;
    res.writeHead(200, {
      'content-type': mediaType,
      'content-length': bytes.length,
      'docker-content-digest': digest,
    });
    res.end(req.method === 'HEAD' ? undefined : bytes);
    return true;
  };
  return { bytes, digest, mediaType, serve };
}
