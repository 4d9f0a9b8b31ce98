/**
 * `pullcache status`: the status page's overview in the terminal, from the running server's
 * JSON (`GET /_pullcache/v1/status`). The server is the one managing the storage of the config
 * (its owner record names its URL), or the one `--url` names.
 */
import type { Config } from '../config/schema.js';
import { formatBytes } from '../config/units.js';
import { CertificateMismatchError, fetchOwnServer } from '../tls/own-server.js';
import { ADMIN_PREFIX } from '../http/admin.js';
import type { Runtime } from '../runtime.js';
import type { Status } from '../status/status.js';
import { ownerCredentials } from './cache.js';

/** Events shown of each kind; the page shows more. */
const EVENTS_SHOWN = 5;

/** The URL of the server managing this storage; throws (one line) when none runs. */
export async function runningServer(runtime: Runtime): Promise<string> {
  const owner = await runtime.lifecycle.ownership.other();
  if (owner?.url) return owner.url;
  throw new Error(
    owner
      ? `the process managing this storage (pid ${owner.pid} on ${owner.host}) is not a server; give --url`
      : 'no pullcache server is running on this storage; start one with pullcache serve, or give --url',
  );
}

/**
 * The server's status. Over HTTPS the server must present the certificate of `config`
 * (server.tls.cert); with client authentication, the command proves itself with an owner
 * token, as the other commands do.
 */
export async function fetchStatus(base: string, config: Config): Promise<Status> {
  const url = `${base.replace(/\/$/, '')}${ADMIN_PREFIX}/status`;
  const owner = ownerCredentials(config);
  let res: Response;
  try {
    res = await fetchOwnServer(
      url,
      {
        headers: owner.headers,
        signal: AbortSignal.timeout(10_000),
      },
      config.server.tls,
    );
  } catch (err) {
    if (err instanceof CertificateMismatchError) throw err;
    const cause = (err as { cause?: { code?: string; message?: string } }).cause;
    throw new Error(
      `the server at ${base} does not answer: ${cause?.code ?? cause?.message ?? (err as Error).message}`,
    );
  }
  if (!res.ok) {
    const why = owner.problem && (res.status === 401 || res.status === 403);
    throw new Error(`${url} answered HTTP ${res.status}${why ? ` (${owner.problem})` : ''}`);
  }
  return (await res.json()) as Status;
}

const percent = (ratio: number | null) => (ratio === null ? '-' : `${(ratio * 100).toFixed(1)}%`);
const count = (n: number) => n.toLocaleString('en');
const clock = (iso: string) => iso.slice(11, 19);

function uptime(seconds: number): string {
  const d = Math.floor(seconds / 86400);
  const h = Math.floor((seconds % 86400) / 3600);
  const m = Math.floor((seconds % 3600) / 60);
  return d > 0 ? `${d} d ${h} h` : h > 0 ? `${h} h ${m} min` : `${m} min`;
}

/** Rows of cells as columns two spaces apart, the last one unpadded. */
function table(rows: string[][]): string[] {
  const widths = rows[0]!.map((_, c) => Math.max(...rows.map((r) => r[c]!.length)));
  return rows.map((r) =>
    r
      .map((cell, c) => cell.padEnd(widths[c]!))
      .join('  ')
      .trimEnd(),
  );
}

export function formatStatus(s: Status, base: string): string {
  const now = Date.parse(s.now);
  const t = s.traffic;
  const out: string[] = [];
  out.push(
    `pullcache ${s.version} at ${base}, up ${uptime((now - Date.parse(s.startedAt)) / 1000)}`,
    '',
  );
  out.push(
    `traffic    hit ratio ${percent(t.hitRatio.requests)} of requests, ${percent(t.hitRatio.bytes)} of bytes (${count(t.hits)} hits, ${count(t.misses)} misses)`,
    `           served ${formatBytes(t.servedBytes)}, saved ${formatBytes(t.savedBytes)}, from upstreams ${formatBytes(t.upstreamBytes)}`,
  );
  const points = s.history.points;
  const hourAgo = points.find((p) => p.t >= now - 3600_000) ?? points[0]!;
  const last = points.at(-1)!;
  const hourServed = last.hitBytes + last.missBytes - (hourAgo.hitBytes + hourAgo.missBytes);
  const hourRequests = last.hits + last.misses - (hourAgo.hits + hourAgo.misses);
  out.push(
    `last hour  served ${formatBytes(hourServed)}, ${hourRequests > 0 ? `${percent((last.hits - hourAgo.hits) / hourRequests)} of requests from the cache` : 'no requests'}`,
  );
  const st = s.storage;
  const budget =
    st.maxSize > 0
      ? `of ${formatBytes(st.maxSize)} budget (${Math.round((st.bytes / st.maxSize) * 100)}%)`
      : '(no budget)';
  out.push(
    `storage    ${formatBytes(st.bytes)} ${budget}, ${count(st.images)} images${st.free === null ? '' : `; ${formatBytes(st.free)} free on disk`}${st.ready ? '' : '; still counting'}`,
    '',
  );

  out.push(
    ...table([
      ['UPSTREAM', 'STATE', 'AUTH', 'LATENCY', 'PULL LIMIT LEFT', 'LAST FAILURE'],
      ...s.upstreams.map((u) => [
        u.name,
        u.state,
        u.auth ?? '-',
        u.latencyMs === null ? '-' : `${u.latencyMs} ms`,
        u.rateLimit ? `${u.rateLimit.remaining ?? '?'} of ${u.rateLimit.limit ?? '?'}` : '-',
        u.lastFailure
          ? `${clock(u.lastFailure.at)} ${u.lastFailure.what}: ${u.lastFailure.reason}`
          : '',
      ]),
    ]),
    '',
  );

  out.push(`fetching now (${s.fetches.length})`);
  for (const f of s.fetches) {
    const share = f.size ? ` ${Math.round((f.received / f.size) * 100)}%` : '';
    const amount = f.size
      ? `${formatBytes(f.received)} of ${formatBytes(f.size)}`
      : formatBytes(f.received);
    out.push(
      `  ${f.upstream}/${f.repository}@${f.digest.slice(0, 19)}${share}  ${amount}  ${formatBytes(f.bytesPerSecond)}/s  ${f.clients} ${f.clients === 1 ? 'client' : 'clients'}${f.from === 'replica' ? '  from another replica' : ''}`,
    );
  }
  const times = (n: number) => (n > 1 ? ` (x${n})` : '');
  const failures = s.recent.upstreamFailures;
  out.push('', `upstream failures (${failures.length})`);
  for (const f of failures.slice(0, EVENTS_SHOWN))
    out.push(`  ${clock(f.at)}  ${f.upstream}  ${f.what}: ${f.reason}${times(f.count)}`);
  const refused = s.recent.refused;
  out.push('', `refused requests (${refused.length})`);
  for (const r of refused.slice(0, EVENTS_SHOWN))
    out.push(
      `  ${clock(r.at)}  ${r.client} ${r.method} ${r.path} ${r.status} ${r.code}: ${r.reason}${times(r.count)}`,
    );
  out.push('', `images     ${count(st.images)} cached (pullcache ls lists them)`);
  return `${out.join('\n')}\n`;
}
