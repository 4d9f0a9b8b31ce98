/**
 * The htpasswd file (`auth.htpasswd`): one `user:hash` per line, bcrypt hashes only (what
 * `htpasswd -B` writes: `$2y$`, also `$2a$` and `$2b$`). Blank lines and `#` comments are
 * skipped; a malformed line is logged with its number and skipped, the rest used.
 *
 * The file is read again when it changes, found by a cheap poll of its stat (mtime, size, inode;
 * a rename over it, as editors and Kubernetes secret updates do, counts): fs.watch misses renames
 * and atomic symlink swaps on some systems, and a stat a second costs nothing. A file that cannot
 * be read later on is logged and the last good version kept. One without a single valid entry
 * (emptied, comments only, removed) may be one read between the truncation and the write of
 * `htpasswd`: it is logged, and taken (nobody can log in) when it is found unchanged at the next
 * look, as start-up takes it: removing the last user ends their access too.
 */
import { randomInt } from 'node:crypto';
import { readFile, stat } from 'node:fs/promises';
import { readFileSync, statSync } from 'node:fs';
import bcrypt from 'bcryptjs';
import type { Logger } from '../log/logger.js';

/** A bcrypt hash as htpasswd -B (and other bcrypt writers) print it: 60 characters. */
const BCRYPT = /^\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}$/;
const MAX_USER_LENGTH = 255;
const NO_ENTRY = 'no valid entry';
/** The signature of a file that is not there. */
const MISSING = 'missing';

export interface ParsedHtpasswd {
  /** User name -> bcrypt hash. */
  users: Map<string, string>;
  /** Lines skipped, numbered from 1, with why. */
  problems: { line: number; reason: string }[];
}

/** Parses htpasswd text. Never throws. */
export function parseHtpasswd(text: string): ParsedHtpasswd {
  const users = new Map<string, string>();
  const problems: ParsedHtpasswd['problems'] = [];
  text.split('\n').forEach((raw, i) => {
    const line = raw.replace(/\r$/, '').trim();
    if (line === '' || line.startsWith('#')) return;
    const colon = line.indexOf(':');
    const problem = (reason: string) => problems.push({ line: i + 1, reason });
    if (colon < 0) return problem('expected user:hash');
    const user = line.slice(0, colon);
    const hash = line.slice(colon + 1);
    if (user === '') return problem('empty user name');
    if (user.length > MAX_USER_LENGTH)
      return problem(`user name over ${MAX_USER_LENGTH} characters`);
    // "anonymous" in the rules means a request without credentials: no user may be called so.
    if (user === 'anonymous')
      return problem('"anonymous" is reserved for requests without credentials');
    if (!BCRYPT.test(hash))
      return problem(
        hash.startsWith('$apr1$') || hash.startsWith('{SHA}') || hash.startsWith('$1$')
          ? 'not a bcrypt hash (MD5 and SHA1 are too weak): write it with htpasswd -B'
          : 'not a bcrypt hash: write it with htpasswd -B',
      );
    if (users.has(user))
      return problem(`user ${JSON.stringify(user)} again; the first line counts`);
    users.set(user, hash);
  });
  return { users, problems };
}

/** The bcrypt cost of a hash the BCRYPT pattern took: `$2y$05$...` is 5. */
const costOf = (hash: string) => Number(hash.slice(4, 6));

/**
 * A bcrypt hash of no password, at the cost most of `users` have (the higher of equals; 10
 * for none), within what bcrypt takes (4 to 31). Checking a password against it costs what
 * checking a user's does: an unknown name takes as long to refuse as a wrong password. Made
 * with a random salt and digest, not by hashing (which would take that cost once more).
 */
export function standInHash(users: ReadonlyMap<string, string>): string {
  const counts = new Map<number, number>();
  for (const hash of users.values()) {
    const cost = costOf(hash);
    counts.set(cost, (counts.get(cost) ?? 0) + 1);
  }
  let cost = 10;
  let most = 0;
  for (const [c, n] of counts) if (n > most || (n === most && c > cost)) [cost, most] = [c, n];
  cost = Math.min(31, Math.max(4, cost));
  const alphabet = './ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789';
  const digest = Array.from({ length: 31 }, () => alphabet[randomInt(alphabet.length)]).join('');
  return `${bcrypt.genSaltSync(cost)}${digest}`;
}

/** The identity of a version of the file, to tell a change without reading it. */
function signature(s: { mtimeMs: number; ctimeMs: number; size: number; ino: number }): string {
  return `${s.mtimeMs}/${s.ctimeMs}/${s.size}/${s.ino}`;
}

export interface HtpasswdOptions {
  /** How often the file's stat is looked at, ms. */
  pollInterval?: number;
}

export class HtpasswdFile {
  private current: Map<string, string>;
  /** What a password of an unknown user is checked against (standInHash of `current`). */
  private standIn: string;
  /** The text of the version in use. */
  private text: string;
  /** The stat signature of the version last read (MISSING: the file was not there). */
  private seen: string;
  /** A version without a valid entry, seen at the last look and not taken yet (see `check`). */
  private unsure: { sig: string; text: string } | undefined;
  /** What is wrong with the file now, as last logged (logged again only when it changes). */
  private trouble: string | undefined;
  private readonly timer: NodeJS.Timeout;
  private readonly listeners: (() => void)[] = [];
  private polling = false;

  /**
   * Reads the file now. Throws an Error saying why when it cannot be read (the caller turns it
   * into a start-up error naming `auth.htpasswd`); a file without a valid entry is logged and
   * used (nobody can log in; anonymous rules may still serve).
   */
  constructor(
    readonly path: string,
    private readonly log: Logger,
    options: HtpasswdOptions = {},
  ) {
    let text: string;
    try {
      this.seen = signature(statSync(path));
      text = readFileSync(path, 'utf8');
    } catch (err) {
      throw new Error(fileProblem(err));
    }
    const parsed = this.parsed(text);
    if (parsed.users.size === 0)
      log.warn({ htpasswd: path }, 'htpasswd file has no valid entry; nobody can log in');
    this.current = parsed.users;
    this.standIn = standInHash(parsed.users);
    this.text = text;
    log.info({ htpasswd: path, users: parsed.users.size }, 'htpasswd file loaded');
    this.timer = setInterval(() => void this.check(), options.pollInterval ?? 1000);
    this.timer.unref();
  }

  /** The bcrypt hash of `user`, if the file has one. */
  hash(user: string): string | undefined {
    return this.current.get(user);
  }

  /**
   * A hash that no password matches, at the cost of the file's hashes (`standInHash`): what an
   * unknown user's password is checked against, so that it costs what a known user's does.
   */
  get unknownUserHash(): string {
    return this.standIn;
  }

  /** The text of the version in use (the key of the local owner's tokens is derived from it). */
  get content(): string {
    return this.text;
  }

  /** Calls `listener` after every change of the users taken in. */
  onChange(listener: () => void): void {
    this.listeners.push(listener);
  }

  close(): void {
    clearInterval(this.timer);
  }

  private parsed(text: string): ParsedHtpasswd {
    const parsed = parseHtpasswd(text);
    for (const { line, reason } of parsed.problems)
      this.log.warn({ htpasswd: this.path, line, reason }, 'htpasswd line skipped');
    return parsed;
  }

  /**
   * Looks at the file now (the timer does every `pollInterval`): takes a new version in, or keeps
   * the last good one and says why. A version without a valid entry (emptied, comments only,
   * gone) may be one read between the truncation and the write of `htpasswd`: it is taken when
   * the next look finds it unchanged (same stat, same text), so that removing the last user
   * ends their logins and tokens within two looks. Never rejects.
   */
  async check(): Promise<void> {
    if (this.polling) return;
    this.polling = true;
    try {
      const version = await this.changed();
      if (version === undefined) return;
      const { sig, text } = version;
      this.seen = sig;
      const reason = sig === MISSING ? 'no such file (ENOENT)' : NO_ENTRY;
      if (parseHtpasswd(text).users.size === 0) {
        const before = this.unsure;
        this.unsure = { sig, text };
        if (before?.sig !== sig || before.text !== text) return this.keep(reason);
      }
      this.unsure = undefined;
      const parsed = this.parsed(text);
      this.current = parsed.users;
      this.standIn = standInHash(parsed.users);
      this.text = text;
      this.trouble = undefined;
      if (parsed.users.size === 0)
        this.log.warn(
          { htpasswd: this.path, reason },
          'htpasswd file has no valid entry; nobody can log in',
        );
      this.log.info({ htpasswd: this.path, users: parsed.users.size }, 'htpasswd file reloaded');
      for (const listener of this.listeners) listener();
    } finally {
      this.polling = false;
    }
  }

  /**
   * The file as it is now when it is to be read (changed, or without a valid entry last time):
   * a missing file is an empty one; undefined when unchanged, or when it cannot be read (kept,
   * and logged).
   */
  private async changed(): Promise<{ sig: string; text: string } | undefined> {
    let sig: string;
    try {
      sig = signature(await stat(this.path));
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') {
        this.keep(fileProblem(err));
        return undefined;
      }
      sig = MISSING;
    }
    if (sig === this.seen && this.unsure?.sig !== sig) {
      // Unchanged; or back as it was after it could not be read: the version in use is that one.
      this.trouble = undefined;
      return undefined;
    }
    if (sig === MISSING) return { sig, text: '' };
    try {
      return { sig, text: await readFile(this.path, 'utf8') };
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return { sig: MISSING, text: '' };
      this.keep(fileProblem(err));
      return undefined;
    }
  }

  private keep(reason: string): void {
    if (this.trouble === reason) return;
    this.trouble = reason;
    this.log.warn(
      { htpasswd: this.path, reason, users: this.current.size },
      'htpasswd file not usable; keeping the last good version',
    );
  }
}

/** Why a file could not be read, in a few words. */
export function fileProblem(err: unknown): string {
  const code = (err as NodeJS.ErrnoException).code;
  if (code === 'ENOENT') return 'no such file (ENOENT)';
  if (code === 'EACCES') return 'permission denied (EACCES)';
  if (code === 'EISDIR') return 'it is a directory (EISDIR)';
  return code ?? String(err);
}
