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

/** One GET with curl into /dev/null: the client costs the server almost no CPU. */
export async function curlGet(url: string): Promise<Transfer> {
  const { stdout } = await run(
    'curl',
    [
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
 * GET with curl piped into sha256sum: the digest of the body, checking every byte. (A Node client
 * reading many large bodies at once in one process stalled in undici now and then; curl is the
 * plainer client and costs the server less CPU.)
 */
export async function hashGet(url: string): Promise<{ digest: string }> {
  const { stdout } = await run(
    'bash',
    ['-o', 'pipefail', '-c', `curl -sf ${JSON.stringify(url)} | sha256sum`],
    { timeout: 600_000 },
  );
  return { digest: `sha256:${stdout.split(' ')[0]}` };
}

/** Requests per second with wrk (32 connections); non-2xx answers are counted as errors. */
export async function wrk(
  url: string,
  headers: Record<string, string>,
  seconds = 5,
): Promise<{ rps: number; errors: number }> {
  const args = ['-t1', '-c32', `-d${seconds}s`, '--latency'];
  for (const [k, v] of Object.entries(headers)) args.push('-H', `${k}: ${v}`);
  args.push(url);
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
