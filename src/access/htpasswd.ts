/**
 * The htpasswd file (`auth.htpasswd`): one `user:hash` per line, bcrypt hashes only (what
 * `htpasswd -B` writes: `$2y$`, also `$2a$` and `$2b$`). Blank lines and `#` comments are
 * skipped; a malformed line is logged with its number and skipped, the rest used.
 *
 * The file is read again when it changes, found by a cheap poll of its stat (mtime, size, inode;
 * a rename over it, as editors and Kubernetes secret updates do, counts): fs.watch misses renames
 * and atomic symlink swaps on some systems, and a stat a second costs nothing. A file that is
 * missing, unreadable or without a single valid entry later on (say, read between the truncation
 * and the write of `htpasswd`) is logged and the last good version kept.
 */
import { readFile, stat } from 'node:fs/promises';
import { readFileSync, statSync } from 'node:fs';
import type { Logger } from '../log/logger.js';

/** A bcrypt hash as htpasswd -B (and other bcrypt writers) print it: 60 characters. */
const BCRYPT = /^\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}$/;
const MAX_USER_LENGTH = 255;
const NO_ENTRY = 'no valid entry';

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
  /** The text of the version in use. */
  private text: string;
  private seen: string;
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
      throw new Error(describe(err));
    }
    const parsed = this.parsed(text);
    if (parsed.users.size === 0)
      log.warn({ htpasswd: path }, 'htpasswd file has no valid entry; nobody can log in');
    this.current = parsed.users;
    this.text = text;
    log.info({ htpasswd: path, users: parsed.users.size }, 'htpasswd file loaded');
    this.timer = setInterval(() => void this.poll(), options.pollInterval ?? 1000);
    this.timer.unref();
  }

  /** The bcrypt hash of `user`, if the file has one. */
  hash(user: string): string | undefined {
    return this.current.get(user);
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

  /** Looks at the file; takes a new version in, or keeps the last good one and says why. */
  private async poll(): Promise<void> {
    if (this.polling) return;
    this.polling = true;
    try {
      let sig: string;
      let text: string;
      try {
        sig = signature(await stat(this.path));
        if (sig === this.seen) {
          // Unchanged; or back as it was after going missing: the version in use is that one.
          if (this.trouble !== NO_ENTRY) this.trouble = undefined;
          return;
        }
        text = await readFile(this.path, 'utf8');
      } catch (err) {
        return this.keep(describe(err));
      }
      this.seen = sig;
      const parsed = this.parsed(text);
      if (parsed.users.size === 0) return this.keep(NO_ENTRY);
      this.current = parsed.users;
      this.text = text;
      this.trouble = undefined;
      this.log.info({ htpasswd: this.path, users: parsed.users.size }, 'htpasswd file reloaded');
      for (const listener of this.listeners) listener();
    } finally {
      this.polling = false;
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

function describe(err: unknown): string {
  const code = (err as NodeJS.ErrnoException).code;
  if (code === 'ENOENT') return 'no such file (ENOENT)';
  if (code === 'EACCES') return 'permission denied (EACCES)';
  if (code === 'EISDIR') return 'it is a directory (EISDIR)';
  return code ?? String(err);
}
