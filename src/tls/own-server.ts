/**
 * How a process on this host calls its own pullcache server (the commands through the URL of the
 * owner record, bin/healthcheck through the configured address): over HTTPS when the server
 * serves TLS, and then trusting exactly the certificate in `server.tls.cert`.
 *
 * Why pinning that certificate, rather than trusting it as a CA or skipping the hostname check
 * on loopback: the call goes to 127.0.0.1 (or the listen address), which a real certificate
 * (issued for registry.example.com by a public or company CA) does not name, and whose issuer
 * is often not in the file; trusting the file as a CA then fails, and skipping only the hostname
 * check would accept any certificate that CA ever issued, for any name, from any local process
 * on that port. The handshake proves that the server holds the private key of the certificate
 * it presents; presenting the configured one proves it is our server, whatever names it carries.
 * During a renewal, until the server has reloaded (server.tls.reloadInterval), the file and the
 * server differ: the call fails saying so, and works again once the server has the new one.
 */
import { readFileSync } from 'node:fs';
import { X509Certificate } from 'node:crypto';
import type { TLSSocket } from 'node:tls';
import { Agent, buildConnector, fetch, type RequestInit, type Response } from 'undici';

/** The config the caller reads: `server.tls` of the server it calls. */
export interface OwnServerTls {
  cert: string;
}

/** The server presents another certificate than the configured one. */
export class CertificateMismatchError extends Error {
  constructor(presented: string, expected: string) {
    super(
      `the server presents another certificate (serial ${presented}) than server.tls.cert (serial ${expected}); if it was just renewed, try again once the server has reloaded it`,
    );
    this.name = 'CertificateMismatchError';
  }
}

const agents = new Map<string, Agent>();

/**
 * fetch for `url` on this host's own pullcache. An http URL is fetched as is; an https one only
 * from a server presenting the certificate in `tls.cert`. Rejects as fetch does (a TypeError
 * whose `cause` says why: a CertificateMismatchError, ECONNREFUSED...), and with an Error
 * naming `server.tls.cert` when the URL is https and the certificate cannot be read.
 */
export async function fetchOwnServer(
  url: string,
  init: RequestInit,
  tls: OwnServerTls,
): Promise<Response> {
  if (new URL(url).protocol !== 'https:') return fetch(url, init);
  return fetch(url, { ...init, dispatcher: pinnedAgent(tls.cert, new URL(url).origin) });
}

function pinnedAgent(certPath: string, origin: string): Agent {
  if (certPath === '')
    throw new Error(
      `${origin} serves HTTPS: give this command the server's config (server.tls.cert)`,
    );
  configuredCertificate(certPath); // a clear error now rather than a "fetch failed"
  const known = agents.get(certPath);
  if (known) return known;
  // Chain and name are not what is checked (see above): the certificate itself is, as the file
  // says at each new connection.
  const connector = buildConnector({ rejectUnauthorized: false });
  const agent = new Agent({
    connect: (options, callback) =>
      connector(options, (...args) => {
        const [err, socket] = args;
        if (err) return callback(err, null);
        const presented = (socket as TLSSocket).getPeerCertificate();
        let expected: X509Certificate;
        try {
          expected = configuredCertificate(certPath);
        } catch (readError) {
          socket.destroy();
          return callback(readError as Error, null);
        }
        if (presented.fingerprint256 !== expected.fingerprint256) {
          socket.destroy();
          return callback(
            new CertificateMismatchError(presented.serialNumber ?? 'none', expected.serialNumber),
            null,
          );
        }
        callback(null, socket);
      }),
  });
  agents.set(certPath, agent);
  return agent;
}

/** The server's own certificate, the first in the file. */
function configuredCertificate(certPath: string): X509Certificate {
  try {
    return new X509Certificate(readFileSync(certPath));
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    throw new Error(
      `server.tls.cert: cannot read a certificate from ${JSON.stringify(certPath)}${code ? ` (${code})` : ''}`,
    );
  }
}
