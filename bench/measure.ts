/** Load generators: curl for transfers (one or many), wrk for request rates. */
import { execFile } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { promisify } from 'node:util';

const run = promisify(execFile);

export interface Transfer {
  /** Seconds to the first byte. */
  ttfb: number;
  /** Seconds in all. */
  total: number;
  bytes: number;
  status: number;
}

/** curl's arguments for request headers. */
function headerArgs(headers: Record<string, string>): string[] {
  return Object.entries(headers).flatMap(([k, v]) => ['-H', `${k}: ${v}`]);
}

/** One GET with curl into /dev/null: the client costs the server almost no CPU. */
export async function curlGet(
  url: string,
  headers: Record<string, string> = {},
): Promise<Transfer> {
  const { stdout } = await run(
    'curl',
    [
      ...headerArgs(headers),
      '-s',
      '-o',
      '/dev/null',
      '-w',
      '%{http_code} %{time_starttransfer} %{time_total} %{size_download}',
      url,
    ],
    {
      timeout: 600_000,
    },
  );
  const [status, ttfb, total, bytes] = stdout.trim().split(' ').map(Number);
  return { status: status!, ttfb: ttfb!, total: total!, bytes: bytes! };
}

/**
 * GET with curl piped into `openssl dgst -sha256`: the digest of the body, checking every byte.
 * (A Node client reading many large bodies at once in one process stalled in undici now and
 * then; curl is the plainer client. coreutils' sha256sum hashes at about 300 MB/s here against
 * openssl's 1.2 GB/s.)
 */
export async function hashGet(url: string): Promise<{ digest: string }> {
  const { stdout } = await run(
    'bash',
    ['-o', 'pipefail', '-c', `curl -sf ${JSON.stringify(url)} | openssl dgst -sha256 -r`],
    { timeout: 600_000 },
  );
  return { digest: `sha256:${stdout.split(' ')[0]}` };
}

/**
 * GET with curl piped into `cmp` against the original file: true when every byte is the same
 * (and the length). Costs the client a tenth of hashing, so that many clients at once measure
 * the server rather than themselves.
 */
export async function sameBytes(
  url: string,
  file: string,
  headers: Record<string, string> = {},
): Promise<boolean> {
  const curl = ['curl', ...headerArgs(headers), '-sf', url].map((a) => JSON.stringify(a));
  try {
    await run(
      'bash',
      ['-o', 'pipefail', '-c', `${curl.join(' ')} | cmp -s - ${JSON.stringify(file)}`],
      { timeout: 600_000 },
    );
    return true;
  } catch {
    return false;
  }
}

/** Requests per second with wrk (32 connections); non-2xx answers are counted as errors. */
export async function wrk(
  url: string,
  headers: Record<string, string>,
  seconds = 5,
): Promise<{ rps: number; errors: number }> {
  const args = ['-t1', '-c32', `-d${seconds}s`, '--latency', ...headerArgs(headers), url];
  const { stdout } = await run('wrk', args, { timeout: (seconds + 30) * 1000 });
  const rps = Number(/Requests\/sec:\s+([\d.]+)/.exec(stdout)?.[1] ?? 0);
  const non2xx = Number(/Non-2xx or 3xx responses:\s+(\d+)/.exec(stdout)?.[1] ?? 0);
  const socketErrors = /Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)/.exec(
    stdout,
  );
  const errors =
    non2xx + (socketErrors ? socketErrors.slice(1).reduce((n, v) => n + Number(v), 0) : 0);
  return { rps, errors };
}

/** Bytes a process has written, sockets included (/proc/PID/io wchar). */
export function bytesWritten(pid: number): number {
  return Number(/^wchar:\s+(\d+)/m.exec(readFileSync(`/proc/${pid}/io`, 'utf8'))?.[1] ?? 0);
}

export async function timed<T>(fn: () => Promise<T>): Promise<{ seconds: number; value: T }> {
  const start = process.hrtime.bigint();
  const value = await fn();
  return { seconds: Number(process.hrtime.bigint() - start) / 1e9, value };
}

export function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)]!;
}
