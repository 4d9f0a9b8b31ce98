/**
 * Picks up a renewed certificate without a restart. cert-manager and ACME clients renew in
 * place: they rewrite the two files, or (a Kubernetes secret volume) swap a symlinked directory
 * under them. Both show in a stat that follows symlinks (another inode, size or mtime), which
 * works where file watching does not (symlink swaps, network file systems), so the two files
 * are stat'ed every `interval` and read only when one changed. A pair that cannot be used (one
 * file written and the other not yet, a half-written file, a key of another certificate) keeps
 * the certificate being served and is logged once as a warning; the next change is tried again.
 */
import { stat } from 'node:fs/promises';
import type { Logger } from '../log/logger.js';
import {
  describeCertificate,
  isValidNow,
  readTlsCredentials,
  TlsFilesError,
  type TlsCredentials,
  type TlsFiles,
} from './credentials.js';

export interface ReloaderOptions {
  files: TlsFiles;
  /** What is served now. */
  current: TlsCredentials;
  /** Serves new connections with these (node:https's setSecureContext). */
  apply: (credentials: TlsCredentials) => void;
  /** ms between two looks at the files. */
  interval: number;
  log: Logger;
}

export class CertificateReloader {
  private current: TlsCredentials;
  private seen: string | undefined;
  private timer: NodeJS.Timeout | undefined;
  private checking: Promise<void> | undefined;
  private readonly log: Logger;

  constructor(private readonly options: ReloaderOptions) {
    this.current = options.current;
    this.log = options.log.child({ module: 'tls' });
  }

  /**
   * Starts looking at the files. The first look reads them (what changed since they were read
   * for `current` is then picked up too); later ones read them only when a stat changed.
   */
  start(): void {
    this.timer = setInterval(() => void this.check(), this.options.interval);
    this.timer.unref();
  }

  stop(): void {
    clearInterval(this.timer);
    this.timer = undefined;
  }

  /** One look at the files (one at a time); never throws. */
  check(): Promise<void> {
    this.checking ??= this.reloadIfChanged().finally(() => (this.checking = undefined));
    return this.checking;
  }

  private async reloadIfChanged(): Promise<void> {
    const stamp = await this.stamp();
    if (stamp === this.seen) return;
    this.seen = stamp;
    const { files } = this.options;
    let next: TlsCredentials;
    try {
      next = await readTlsCredentials(files);
    } catch (err) {
      const problem =
        err instanceof TlsFilesError
          ? { key: err.key, reason: err.message }
          : { reason: String(err) };
      this.log.warn(problem, 'TLS files changed but cannot be used; serving the previous ones');
      return;
    }
    if (next.cert.equals(this.current.cert) && next.key.equals(this.current.key)) return;
    try {
      this.options.apply(next);
    } catch (err) {
      this.log.warn(
        { reason: (err as Error).message },
        'TLS files changed but cannot be used; serving the previous ones',
      );
      return;
    }
    this.current = next;
    const certificate = describeCertificate(next.leaf);
    if (isValidNow(next.leaf)) this.log.info(certificate, 'TLS certificate reloaded');
    else this.log.warn(certificate, 'TLS certificate reloaded, but it is not valid now');
  }

  /** What identifies the two files' contents without reading them; a missing file included. */
  private async stamp(): Promise<string> {
    const { cert, key } = this.options.files;
    const one = (path: string) =>
      stat(path).then(
        (s) => `${s.dev}:${s.ino}:${s.size}:${s.mtimeMs}:${s.ctimeMs}`,
        (err: NodeJS.ErrnoException) => err.code ?? 'error',
      );
    return `${await one(cert)}|${await one(key)}`;
  }
}
