/**
 * Runs the real `pullcache serve` with `server.workers` (a primary and its workers, each a
 * process) on a free port with its own storage, as the CLI tests run it; knows the workers' pids
 * and which worker answered a request (its `Pullcache-Worker` header).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import {
  mkdtempSync,
  readdirSync,
  readFileSync,
  readlinkSync,
  rmSync,
  writeFileSync,
} from 'node:fs';
import { request, type IncomingMessage } from 'node:http';
import { request as httpsRequest } from 'node:https';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { PULLCACHE } from './cli.js';
import { sha256 } from './images.js';
import { freePort, waitFor } from './net.js';

export interface WorkersServer {
  url: string;
  port: number;
  root: string;
  primary: ChildProcess;
  /** Every log line so far, parsed. */
  lines: Record<string, unknown>[];
  /** The pids of the live workers, read from /proc. */
  workers(): number[];
  /**
   * Waits until `count` workers are alive and `listened` have listened since the start
   * (replacements included); on a timeout, the error shows what the server logged at warn or
   * above and on stderr.
   */
  waitForWorkers(count: number, listened: number, timeoutMs?: number): Promise<void>;
  /** Waits for the primary to exit (after a signal); resolves to its exit code. */
  exited(): Promise<number | null>;
  stop(): Promise<void>;
}

/**
 * The workers of the primary `pid`: its children that run the same executable (node). Not every
 * child is a worker: tsx starts esbuild's service from the primary when its cache is cold (after
 * a change to the sources), and counting those made the tests wait for a replacement worker that
 * was already there, or kill esbuild instead of a worker.
 */
export function workersOf(pid: number): number[] {
  const exe = (p: number | string) => {
    try {
      return readlinkSync(`/proc/${p}/exe`);
    } catch {
      return undefined; // gone meanwhile
    }
  };
  const own = exe(pid);
  const children: number[] = [];
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const stat = readFileSync(`/proc/${entry}/stat`, 'utf8');
      // pid (comm) state ppid ...: comm may hold spaces, so read after its closing parenthesis.
      const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
      if (ppid !== pid) continue;
      // A worker that died but is not reaped yet (a zombie, no executable) still counts: the
      // primary has not yet heard of its death, and a connection it accepts meanwhile may still
      // be handed to it (node's round-robin cluster), so "gone" means reaped.
      const its = exe(entry);
      if (its === undefined || its === own) children.push(Number(entry));
    } catch {
      // gone meanwhile
    }
  }
  return children;
}

export async function startWorkers(options: {
  upstream: string;
  workers: number;
  yaml?: string[];
  root?: string;
  /** Workers to wait for (default `workers`). */
  expect?: number;
  /** The port (default: a free one). */
  port?: number;
  /** More lines under `server:`. */
  server?: string[];
  /** The `storage:` block's lines, instead of a filesystem root in `root`. */
  storage?: string[];
  /** More top-level blocks (`cache:`, ...). */
  top?: string[];
}): Promise<WorkersServer> {
  const root = options.root ?? mkdtempSync(join(tmpdir(), 'pullcache-workers-'));
  const port = options.port ?? (await freePort());
  const config = join(root, 'pullcache.yaml');
  writeFileSync(
    config,
    [
      'server:',
      `  listen: 127.0.0.1:${port}`,
      `  workers: ${options.workers}`,
      ...(options.server ?? []),
      'storage:',
      ...(options.storage ?? ['  filesystem:', `    root: ${join(root, 'data')}`]),
      ...(options.top ?? []),
      'upstreams:',
      '  docker.io:',
      `    url: ${options.upstream}`,
      ...(options.yaml ?? []),
      'log:',
      '  level: info',
      '',
    ].join('\n'),
  );
  const env = Object.fromEntries(
    Object.entries(process.env).filter(([k]) => !k.startsWith('PULLCACHE_')),
  );
  const primary = spawn('sh', ['-c', `exec ${PULLCACHE} serve --config ${config}`], {
    env,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const lines: Record<string, unknown>[] = [];
  let stderr = '';
  // The log goes to stderr (stdout is the commands' output); both are read, line by line.
  for (const stream of [primary.stdout!, primary.stderr!]) {
    let rest = '';
    stream.on('data', (chunk: Buffer) => {
      if (stream === primary.stderr) stderr += chunk.toString();
      const parts = (rest + chunk.toString()).split('\n');
      rest = parts.pop() ?? '';
      for (const line of parts) {
        try {
          lines.push(JSON.parse(line) as Record<string, unknown>);
        } catch {
          lines.push({ msg: line });
        }
      }
      if (process.env.PULLCACHE_TEST_LOG) process.stderr.write(chunk);
    });
  }
  const exit = new Promise<number | null>((resolve) =>
    primary.once('exit', (code) => resolve(code)),
  );
  const url = `http://127.0.0.1:${port}`;
  const listening = () => lines.filter((l) => l.msg === 'pullcache listening').length;
  const expected = options.expect ?? options.workers;
  await Promise.race([
    waitFor(async () => listening() >= expected, `${expected} workers`, 30_000),
    exit.then((code) => {
      throw new Error(`pullcache exited during start-up (code ${code}): ${stderr}`);
    }),
  ]);
  return {
    url,
    port,
    root,
    primary,
    lines,
    workers: () => workersOf(primary.pid!),
    async waitForWorkers(count, listened, timeoutMs = 90_000) {
      try {
        await waitFor(
          async () => workersOf(primary.pid!).length === count && listening() >= listened,
          `${count} workers, ${listened} listened`,
          timeoutMs,
        );
      } catch (err) {
        // What the workers said last, requests left out, and which processes are there.
        const logged = lines
          .filter((l) => l.msg !== 'request')
          .map((l) => `${String(l.worker ?? l.module ?? '')} ${String(l.msg)}`);
        throw new Error(
          `${(err as Error).message}; workers ${JSON.stringify(workersOf(primary.pid!))}; logged: ${JSON.stringify(logged.slice(-25))}`.slice(
            0,
            6000,
          ),
        );
      }
    },
    exited: () => exit,
    async stop() {
      if (primary.exitCode === null && primary.signalCode === null) {
        const pids = workersOf(primary.pid!);
        primary.kill('SIGTERM');
        const timer = setTimeout(() => {
          for (const pid of [primary.pid!, ...pids]) {
            try {
              process.kill(pid, 'SIGKILL');
            } catch {
              // gone
            }
          }
        }, 20_000);
        await exit;
        clearTimeout(timer);
      }
      if (!options.root) rmSync(root, { recursive: true, force: true });
    },
  };
}

export interface Got {
  status: number;
  worker: number;
  body: Buffer;
  /** Set when the response broke off (the connection was cut before its end). */
  error?: Error;
  /** ms from the request to the first body byte. */
  firstByteMs?: number;
}

/** A whole answer with the blob's bytes: 200, not cut short, and `digest`'s content. */
export const intact = (r: Got, digest: string) =>
  r.status === 200 && r.error === undefined && sha256(r.body) === digest;

/**
 * GET on a connection of its own (so that the primary hands it to the next worker in turn).
 * `onResponse` sees the response as it starts; never rejects for a cut body (see `error`).
 */
export function get(
  url: string,
  onResponse?: (res: IncomingMessage) => void,
  timeoutMs = 60_000,
  /** For an https URL: the CA that signed the server's certificate (PEM). */
  ca?: string,
): Promise<Got> {
  return new Promise((resolve, reject) => {
    const started = Date.now();
    const send = url.startsWith('https:') ? httpsRequest : request;
    const req = send(url, { agent: false, ...(ca ? { ca } : {}) }, (res) => {
      const chunks: Buffer[] = [];
      const got: Got = {
        status: res.statusCode ?? 0,
        worker: Number(res.headers['pullcache-worker'] ?? 0),
        body: Buffer.alloc(0),
      };
      onResponse?.(res);
      res.on('data', (chunk: Buffer) => {
        got.firstByteMs ??= Date.now() - started;
        chunks.push(chunk);
      });
      const finish = (error?: Error) => {
        got.body = Buffer.concat(chunks);
        if (error) got.error = error;
        resolve(got);
      };
      res.on('end', () => finish());
      res.on('error', (err) => finish(err));
      res.on('aborted', () => finish(new Error('aborted')));
    });
    req.setTimeout(timeoutMs, () => req.destroy(new Error('timed out')));
    req.on('error', reject);
    req.end();
  });
}

/**
 * A download of `url` that reads its first bytes, then waits until `resume`: a transfer in
 * flight. `worker`: the pid that answered it (its Pullcache-Worker header).
 */
export async function pausedDownload(
  url: string,
  ca?: string,
): Promise<{ done: Promise<Got>; resume: () => void; worker: number }> {
  let response!: (res: IncomingMessage) => void;
  const started = new Promise<IncomingMessage>((resolve) => (response = resolve));
  const done = get(
    url,
    (res) => {
      res.once('data', () => res.pause());
      response(res);
    },
    undefined,
    ca,
  );
  const res = await started;
  return {
    done,
    resume: () => res.resume(),
    worker: Number(res.headers['pullcache-worker']),
  };
}
