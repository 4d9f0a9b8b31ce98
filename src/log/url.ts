/**
 * A request's URL as the logs and the status page show it, with the values of the query
 * parameters that carry credentials replaced: clients and the tools behind them put secrets in
 * URLs (OAuth's `access_token`, a presigned URL's `X-Amz-Signature`, a `password=` of a script),
 * and a log line or the status page is read by more people than may pull. The logger's `redact`
 * paths cannot do this: they blank a whole field, and the rest of the URL is what a reader needs.
 */

/** Names of query parameters whose value is a credential (matched case-insensitively). */
const SECRET_PARAMETER = /token|passw|secret|signature|credential|key|^sig$|^code$|^auth/i;

export const REDACTED = '[redacted]';

/** `url` (path and query) with every credential-carrying query value replaced; else as it came. */
export function redactedUrl(url: string): string;
export function redactedUrl(url: string | undefined): string | undefined;
export function redactedUrl(url: string | undefined): string | undefined {
  const at = url?.indexOf('?') ?? -1;
  if (url === undefined || at < 0) return url;
  let changed = false;
  const parameters = url
    .slice(at + 1)
    .split('&')
    .map((parameter) => {
      const eq = parameter.indexOf('=');
      const raw = eq < 0 ? parameter : parameter.slice(0, eq);
      if (eq < 0 || !SECRET_PARAMETER.test(decodedName(raw))) return parameter;
      changed = true;
      return `${raw}=${REDACTED}`;
    });
  return changed ? `${url.slice(0, at + 1)}${parameters.join('&')}` : url;
}

/** A parameter's name as a server reads it (`acc%65ss_token` is `access_token`). */
function decodedName(raw: string): string {
  try {
    return decodeURIComponent(raw.replace(/\+/g, ' '));
  } catch {
    return raw;
  }
}
