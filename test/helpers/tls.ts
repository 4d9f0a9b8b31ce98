/**
 * Certificates for the TLS tests, made with the real `openssl` command: a test CA, and server
 * certificates it signs (by default for 127.0.0.1 and localhost, the way the tests dial), each
 * with a serial of its own so that a client can tell which one a server presents. Also a TLS
 * handshake that reports what the server presented, and a client that trusts the test CA.
 *
 *   const ca = TestCa.create();
 *   const a = ca.issue();                        // { certPath, keyPath, serial, pem }
 *   const pc = await startPullcache({}, undefined, { tls: a });
 *   await ca.fetch(`${pc.url}/v2/`);
 *   (await handshake(pc.address)).serial === a.serial
 *   ca.remove();
 */
import { execFileSync } from 'node:child_process';
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { connect, type SecureVersion } from 'node:tls';
import { Agent, fetch, type RequestInit, type Response } from 'undici';

export interface TestCertificate {
  certPath: string;
  keyPath: string;
  /** The serial number as node:tls shows it (upper-case hex, no leading zeros). */
  serial: string;
  /** The certificate, PEM. */
  pem: string;
}

export interface IssueOptions {
  /** Subject alternative names: IP addresses or DNS names. Default: 127.0.0.1 and localhost. */
  names?: string[];
  /** Where the files go (cert.pem, key.pem); default: a new directory. */
  dir?: string;
  days?: number;
}

function openssl(...args: string[]): void {
  try {
    execFileSync('openssl', args, { stdio: ['ignore', 'ignore', 'pipe'] });
  } catch (err) {
    const stderr = (err as { stderr?: Buffer }).stderr?.toString() ?? '';
    throw new Error(`openssl ${args[0]} failed (apt-get install openssl): ${stderr}`);
  }
}

let serials = 0x1000 + Math.floor(Math.random() * 0x10000);

export class TestCa {
  readonly certPath: string;
  private readonly keyPath: string;
  readonly pem: string;
  private agent: Agent | undefined;

  private constructor(readonly dir: string) {
    this.certPath = join(dir, 'ca.crt');
    this.keyPath = join(dir, 'ca.key');
    openssl(
      'req',
      '-x509',
      '-newkey',
      'ec',
      '-pkeyopt',
      'ec_paramgen_curve:prime256v1',
      '-nodes',
      '-keyout',
      this.keyPath,
      '-out',
      this.certPath,
      '-days',
      '2',
      '-subj',
      '/CN=pullcache test CA',
      '-addext',
      'basicConstraints=critical,CA:TRUE',
      '-addext',
      'keyUsage=critical,keyCertSign,cRLSign',
    );
    this.pem = readFileSync(this.certPath, 'utf8');
  }

  static create(): TestCa {
    return new TestCa(mkdtempSync(join(tmpdir(), 'pullcache-ca-')));
  }

  /** A server certificate signed by this CA, with a new serial, and its key. */
  issue(options: IssueOptions = {}): TestCertificate {
    const dir = options.dir ?? mkdtempSync(join(this.dir, 'cert-'));
    mkdirSync(dir, { recursive: true });
    const names = options.names ?? ['127.0.0.1', 'localhost'];
    const san = names.map((n) => (/^[\d.]+$|:/.test(n) ? `IP:${n}` : `DNS:${n}`)).join(',');
    const certPath = join(dir, 'cert.pem');
    const keyPath = join(dir, 'key.pem');
    const csr = join(dir, 'req.csr');
    const ext = join(dir, 'ext.cnf');
    const serial = (serials += 1);
    openssl(
      'req',
      '-new',
      '-newkey',
      'ec',
      '-pkeyopt',
      'ec_paramgen_curve:prime256v1',
      '-nodes',
      '-keyout',
      keyPath,
      '-out',
      csr,
      '-subj',
      `/CN=${names[0] ?? 'pullcache'}`,
    );
    writeFileSync(
      ext,
      [
        `subjectAltName=${san}`,
        'basicConstraints=CA:FALSE',
        'keyUsage=critical,digitalSignature',
        'extendedKeyUsage=serverAuth',
        '',
      ].join('\n'),
    );
    openssl(
      'x509',
      '-req',
      '-in',
      csr,
      '-CA',
      this.certPath,
      '-CAkey',
      this.keyPath,
      '-set_serial',
      String(serial),
      '-days',
      String(options.days ?? 2),
      '-extfile',
      ext,
      '-out',
      certPath,
    );
    rmSync(csr);
    rmSync(ext);
    return {
      certPath,
      keyPath,
      serial: serial.toString(16).toUpperCase(),
      pem: readFileSync(certPath, 'utf8'),
    };
  }

  /**
   * A directory holding this CA as `ca.crt`, as skopeo's --src-cert-dir and containers' certs.d
   * want it.
   */
  certDir(): string {
    const dir = mkdtempSync(join(this.dir, 'certs.d-'));
    copyFileSync(this.certPath, join(dir, 'ca.crt'));
    return dir;
  }

  /** fetch (undici's) that trusts this CA only. */
  fetch(url: string, init: RequestInit = {}): Promise<Response> {
    this.agent ??= new Agent({ connect: { ca: this.pem } });
    return fetch(url, { ...init, dispatcher: this.agent });
  }

  async remove(): Promise<void> {
    await this.agent?.close();
    rmSync(this.dir, { recursive: true, force: true });
  }
}

export interface Handshake {
  /** TLSv1.2, TLSv1.3 */
  protocol: string | null;
  /** The serial of the certificate the server presented (as in TestCertificate.serial). */
  serial: string;
}

/**
 * One TLS handshake with `host:port` on a new connection, trusting `ca` (nothing else); rejects
 * with node's error (its `code` says which alert the server sent) when it fails. `version`
 * limits the client to one protocol version; TLS 1.0 and 1.1 need OpenSSL's security level 0
 * on the client side, which is set for them, so that what refuses them is the server.
 */
export function handshake(
  address: string,
  options: { ca?: string; version?: SecureVersion } = {},
): Promise<Handshake> {
  const i = address.lastIndexOf(':');
  const host = address.slice(0, i).replace(/^\[|\]$/g, '');
  const port = Number(address.slice(i + 1));
  const old = options.version === 'TLSv1' || options.version === 'TLSv1.1';
  return new Promise((resolve, reject) => {
    const socket = connect(
      {
        host,
        port,
        ...(options.ca ? { ca: options.ca } : { rejectUnauthorized: false }),
        ...(options.version ? { minVersion: options.version, maxVersion: options.version } : {}),
        ...(old ? { ciphers: 'DEFAULT@SECLEVEL=0' } : {}),
      },
      () => {
        const result = {
          protocol: socket.getProtocol(),
          serial: socket.getPeerCertificate().serialNumber.replace(/^0+/, ''),
        };
        socket.destroy();
        resolve(result);
      },
    );
    socket.setTimeout(5_000, () => socket.destroy(new Error(`no handshake with ${address}`)));
    socket.once('error', reject);
  });
}
