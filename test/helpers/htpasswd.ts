/**
 * htpasswd files written by the real `htpasswd` of Apache (Debian's apache2-utils), bcrypt
 * entries (`-B`, which writes `$2y$`), as users make them.
 */
import { execFileSync } from 'node:child_process';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

/** A new htpasswd file with these users (name -> password); bcrypt cost `cost` (4 is fastest). */
export function htpasswdFile(users: Record<string, string>, cost = 5): string {
  const file = join(mkdtempSync(join(tmpdir(), 'pullcache-htpasswd-')), 'htpasswd');
  let create = true;
  for (const [user, password] of Object.entries(users)) {
    htpasswd(create ? ['-c'] : [], file, user, password, cost);
    create = false;
  }
  return file;
}

/** Adds a user to (or changes their password in) the file. */
export function htpasswdSet(file: string, user: string, password: string, cost = 5): void {
  htpasswd([], file, user, password, cost);
}

/** Removes a user from the file. */
export function htpasswdDelete(file: string, user: string): void {
  execFileSync('htpasswd', ['-D', file, user], { stdio: 'pipe' });
}

function htpasswd(
  flags: string[],
  file: string,
  user: string,
  password: string,
  cost: number,
): void {
  execFileSync('htpasswd', [...flags, '-bB', '-C', String(cost), file, user, password], {
    stdio: 'pipe',
  });
}

/** The Authorization header of Basic credentials. */
export function basic(user: string, password: string): { authorization: string } {
  return { authorization: `Basic ${Buffer.from(`${user}:${password}`).toString('base64')}` };
}
