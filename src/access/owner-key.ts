/**
 * The secret behind the owner tokens (tokens.ts), with which the commands (`pullcache pin`, `rm`,
 * `gc`, `status`...) act through the admin API of a server on their storage: 32 random bytes,
 * base64url, in `<storage.filesystem.root>/lifecycle/owner.key`, mode 0600.
 *
 * Why there: the commands run with the server's config on the server's host (they find the server
 * through the owner record in its storage and call it on loopback: docs/fleet.md), as its user
 * (they work on that storage themselves when no server runs), so the storage root is the one
 * directory both can be counted on to reach, and no other user need (a container's volume, a
 * service's data directory). The config and the htpasswd file are often on read-only mounts.
 * With S3 storage the key file is still kept under `storage.filesystem.root`, a local directory.
 * It is a file of this host, not an object of the storage driver: a driver cannot say who may
 * read it, and the key must not travel with the content (backups of a bucket, bundles).
 *
 * The server makes it when it is missing (at start-up, and again whenever an owner token comes
 * and it is gone): written whole under another name with O_EXCL and 0600, flushed, then linked
 * into place, so that a reader never sees half a key and of servers starting together (workers)
 * one wins and every one reads the winner's. The commands only read it: one run as another user
 * (root) would make a file the server cannot read.
 */
import { randomBytes, randomUUID } from 'node:crypto';
import {
  closeSync,
  fstatSync,
  fsyncSync,
  linkSync,
  mkdirSync,
  openSync,
  readFileSync,
  rmSync,
  statSync,
  writeFileSync,
  writeSync,
} from 'node:fs';
import { dirname, resolve } from 'node:path';
import type { Config } from '../config/schema.js';
import type { Logger } from '../log/logger.js';
import { fileProblem } from './htpasswd.js';

const SECRET_BYTES = 32;
/** 32 bytes in base64url, without padding. */
const ENCODED = /^[A-Za-z0-9_-]{43}$/;

/** Where the owner key of `config` is kept. */
export function ownerKeyPath(config: Pick<Config, 'storage'>): string {
  return resolve(config.storage.filesystem.root, 'lifecycle', 'owner.key');
}

export type OwnerKeyRead =
  | { found: true; secret: Buffer; version: string; mode: number }
  | { found: false; missing: boolean; problem: string };

/** The secret in the file at `path`, or why there is none. Never throws. */
export function readOwnerKey(path: string): OwnerKeyRead {
  let fd: number;
  try {
    fd = openSync(path, 'r');
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    return { found: false, missing: code === 'ENOENT', problem: fileProblem(err) };
  }
  try {
    const info = fstatSync(fd);
    if (!info.isFile()) return { found: false, missing: false, problem: 'not a file' };
    const text = readFileSync(fd, 'utf8').trim();
    if (!ENCODED.test(text))
      return {
        found: false,
        missing: false,
        problem: 'not a pullcache owner key (43 base64url characters)',
      };
    return {
      found: true,
      secret: Buffer.from(text, 'base64url'),
      version: version(info),
      mode: info.mode & 0o777,
    };
  } catch (err) {
    return { found: false, missing: false, problem: fileProblem(err) };
  } finally {
    closeSync(fd);
  }
}

/**
 * Makes the key file with a new secret unless something is there already (never replaces one),
 * then reads it. Never throws.
 */
export function createOwnerKey(path: string): OwnerKeyRead {
  const text = `${randomBytes(SECRET_BYTES).toString('base64url')}\n`;
  const tmp = `${path}.tmp-${randomUUID()}`;
  try {
    mkdirSync(dirname(path), { recursive: true });
    // 0600 at creation (the umask can only take bits away): never readable by others, not even
    // for a moment. Beside the target, so that the link below stays on one file system.
    const fd = openSync(tmp, 'wx', 0o600);
    try {
      writeSync(fd, text);
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
    try {
      linkSync(tmp, path);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      // EEXIST: another process made it first; its key is the one.
      if (code !== 'EEXIST') {
        // A file system without hard links: an exclusive create, which a reader may catch
        // half-written (read as no key: tried again at the next owner token).
        try {
          writeFileSync(path, text, { flag: 'wx', mode: 0o600 });
        } catch (again) {
          if ((again as NodeJS.ErrnoException).code !== 'EEXIST') throw again;
        }
      }
    }
  } catch (err) {
    return { found: false, missing: true, problem: `cannot create it: ${fileProblem(err)}` };
  } finally {
    rmSync(tmp, { force: true });
  }
  return readOwnerKey(path);
}

/**
 * The server's side: the owner key as it is now, made when missing. A stat per call (an owner
 * token, a rare request: the commands'), a read only when the file changed: a key file removed
 * (to end every owner token) is made anew, one replaced is taken.
 */
export class OwnerKey {
  private loaded: { secret: Buffer; version: string } | undefined;
  /** The problem last logged, so that it is logged once. */
  private trouble: string | undefined;

  constructor(
    readonly path: string,
    private readonly log: Logger,
  ) {
    this.secret();
  }

  /** The secret; undefined (and logged) when it can neither be read nor made. Never throws. */
  secret(): Buffer | undefined {
    if (this.loaded) {
      try {
        if (version(statSync(this.path)) === this.loaded.version) return this.loaded.secret;
      } catch {
        // gone or unreadable: read (or make) it below, which says why
      }
    }
    let read = readOwnerKey(this.path);
    if (!read.found && read.missing) read = createOwnerKey(this.path);
    if (!read.found) {
      this.loaded = undefined;
      if (this.trouble !== read.problem)
        this.log.warn(
          { ownerKey: this.path, reason: read.problem },
          'owner key unusable; owner tokens refused (the commands cannot act through this server)',
        );
      this.trouble = read.problem;
      return undefined;
    }
    if (this.trouble !== undefined || this.loaded === undefined) {
      if ((read.mode & 0o077) !== 0)
        this.log.warn(
          { ownerKey: this.path, mode: read.mode.toString(8) },
          'owner key readable by other users: whoever reads it may change the cache (chmod 600)',
        );
      this.trouble = undefined;
    }
    this.loaded = { secret: read.secret, version: read.version };
    return read.secret;
  }
}

/** A version of the file: a new write (rename, link, rewrite) changes it. */
function version(s: { mtimeMs: number; ctimeMs: number; size: number; ino: number }): string {
  return `${s.mtimeMs}/${s.ctimeMs}/${s.size}/${s.ino}`;
}
