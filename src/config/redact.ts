/**
 * Secrets out of everything pullcache shows: `pullcache config` (print.ts), log fields, and the
 * start-up errors that echo a value given in the config ("got ..."). An error is no excuse to
 * print a password.
 */

/**
 * The value with everything before its last `@` (a URL's userinfo) replaced by `[redacted]`:
 * `https://user:pw@host` -> `https://[redacted]@host`. Works on strings that are no valid URL too
 * (a password with a `/` in it), which is when an error would echo them.
 */
export function redactUserinfo(value: string): string {
  const scheme = /^[A-Za-z][A-Za-z0-9+.-]*:\/\//.exec(value)?.[0] ?? '';
  const at = value.lastIndexOf('@');
  if (at < scheme.length) return value;
  return `${scheme}[redacted]${value.slice(at)}`;
}

/** A value given in the config, as an error message echoes it: JSON, userinfo redacted. */
export function show(value: unknown): string {
  if (value === undefined) return 'nothing';
  if (typeof value === 'number' && !Number.isFinite(value)) return String(value);
  return JSON.stringify(typeof value === 'string' ? redactUserinfo(value) : value);
}
