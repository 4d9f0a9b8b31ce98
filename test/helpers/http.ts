import { request } from 'node:http';

export interface RawResponse {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  body: Buffer;
}

/** A request with the path sent exactly as given (fetch would normalise `..`). */
export function rawRequest(
  base: string,
  method: string,
  path: string,
  headers: Record<string, string> = {},
  body?: string | Buffer,
): Promise<RawResponse> {
  const url = new URL(base);
  if (body !== undefined)
    headers = { 'content-length': String(Buffer.byteLength(body)), ...headers };
  return new Promise((resolve, reject) => {
    const req = request({ host: url.hostname, port: url.port, method, path, headers }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () =>
        resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks) }),
      );
      res.on('error', reject);
    });
    req.on('error', reject);
    req.end(body);
  });
}

export async function ociError(res: Response | RawResponse): Promise<string | undefined> {
  const text =
    'body' in res && Buffer.isBuffer(res.body)
      ? res.body.toString()
      : await (res as Response).text();
  try {
    return (JSON.parse(text) as { errors: { code: string }[] }).errors[0]?.code;
  } catch {
    return `not OCI JSON: ${text.slice(0, 100)}`;
  }
}
