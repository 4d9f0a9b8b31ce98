/**
 * The server's certificate and key (`server.tls.cert`, `server.tls.key`): read from their files
 * and checked as a pair before anything serves with them, at start-up and at every reload.
 * Serving is TLS 1.2 and 1.3 only.
 */
import { createPrivateKey, X509Certificate, type KeyObject } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { createSecureContext, type SecureContextOptions } from 'node:tls';

/** The two paths, as configured. */
export interface TlsFiles {
  cert: string;
  key: string;
}

/** A certificate chain and the key that matches its first certificate. */
export interface TlsCredentials {
  /** The PEM file as read: the server's certificate first, then its chain. */
  cert: Buffer;
  key: Buffer;
  /** The server's own certificate, the first of the chain. */
  leaf: X509Certificate;
}

/** Why the configured files cannot be served with; `key` is the config key to blame. */
export class TlsFilesError extends Error {
  constructor(
    readonly key: 'server.tls.cert' | 'server.tls.key',
    message: string,
  ) {
    super(message);
    this.name = 'TlsFilesError';
  }
}

/** The oldest protocol served: TLS 1.0 and 1.1 are refused whatever node's defaults say. */
export const MIN_TLS_VERSION = 'TLSv1.2';

/**
 * Reads both files and checks them: a PEM certificate, a PEM private key (unencrypted), and the
 * key belonging to the first certificate. Throws a TlsFilesError naming the config key at fault;
 * never anything else.
 */
export async function readTlsCredentials(files: TlsFiles): Promise<TlsCredentials> {
  const [cert, key] = await Promise.all([
    readPem('server.tls.cert', files.cert),
    readPem('server.tls.key', files.key),
  ]);
  let leaf: X509Certificate;
  try {
    leaf = new X509Certificate(cert);
  } catch {
    throw new TlsFilesError(
      'server.tls.cert',
      `no PEM certificate in ${JSON.stringify(files.cert)}`,
    );
  }
  let privateKey: KeyObject;
  try {
    privateKey = createPrivateKey(key);
  } catch (err) {
    const encrypted = (err as { code?: string }).code === 'ERR_MISSING_PASSPHRASE';
    throw new TlsFilesError(
      'server.tls.key',
      encrypted
        ? `the key in ${JSON.stringify(files.key)} is encrypted; give it unencrypted`
        : `no PEM private key in ${JSON.stringify(files.key)}`,
    );
  }
  if (!leaf.checkPrivateKey(privateKey)) {
    throw new TlsFilesError(
      'server.tls.key',
      `the key in ${JSON.stringify(files.key)} does not match the first certificate in ${JSON.stringify(files.cert)} (server.tls.cert: the server's own comes first, then its chain)`,
    );
  }
  const credentials = { cert, key, leaf };
  try {
    // What node:https will do with them: a chain it cannot load fails here rather than there.
    createSecureContext(secureContextOptions(credentials));
  } catch (err) {
    throw new TlsFilesError(
      'server.tls.cert',
      `cannot use ${JSON.stringify(files.cert)}: ${(err as Error).message}`,
    );
  }
  return credentials;
}

/** The options node:https (createServer, setSecureContext) takes for these credentials. */
export function secureContextOptions(credentials: TlsCredentials): SecureContextOptions {
  return { cert: credentials.cert, key: credentials.key, minVersion: MIN_TLS_VERSION };
}

/** What the logs say of a certificate. */
export function describeCertificate(leaf: X509Certificate): Record<string, string> {
  return {
    subject: leaf.subject.replaceAll('\n', ', '),
    serial: leaf.serialNumber,
    notAfter: new Date(leaf.validTo).toISOString(),
  };
}

/** True while `now` is within the certificate's validity period. */
export function isValidNow(leaf: X509Certificate, now = Date.now()): boolean {
  return Date.parse(leaf.validFrom) <= now && now <= Date.parse(leaf.validTo);
}

const FS_REASONS: Record<string, string> = {
  ENOENT: 'no such file',
  EACCES: 'permission denied',
  EPERM: 'operation not permitted',
  EISDIR: 'a directory, not a file',
};

async function readPem(key: TlsFilesError['key'], path: string): Promise<Buffer> {
  try {
    return await readFile(path);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    const reason = code === undefined ? 'unexpected error' : `${FS_REASONS[code] ?? code}`;
    throw new TlsFilesError(
      key,
      `cannot read ${JSON.stringify(path)}: ${reason}${code && FS_REASONS[code] ? ` (${code})` : ''}`,
    );
  }
}
