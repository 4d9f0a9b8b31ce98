/**
 * A real Docker Engine for the client tests: Debian's `dockerd` (package docker.io), one private
 * daemon per instance with its own data root, exec root, socket, pid file and daemon.json, so
 * nothing of the host's Docker (if any) is read or touched. It needs root; a missing dockerd or
 * a non-root user is a failure, not a skip.
 *
 * Flags, and why:
 *  - `--storage-driver vfs`: works on any file system, no overlay mounts to leak;
 *  - `--iptables=false --bridge=none`: no network set-up; the tests pull, they run no container;
 *  - everything under one directory in /tmp (not os.tmpdir(), which may be long): unix socket
 *    paths are limited to 108 bytes, and containerd puts its sockets under the exec root.
 *
 * daemon.json is given as an object (`registry-mirrors`, `insecure-registries`...). The CLI gets
 * its own config directory (`docker --config`), so a `docker login` stores its credentials there,
 * not in the user's ~/.docker. Registry CA certificates are read by dockerd from the fixed
 * /etc/docker/certs.d/HOST:PORT/ca.crt: `trustRegistryCa` writes one and gives back its removal.
 */
import { execFile, execFileSync, spawn, type ChildProcess } from 'node:child_process';
import {
  closeSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  openSync,
  readFileSync,
  rmdirSync,
  rmSync,
  writeFileSync,
} from 'node:fs';
import { join } from 'node:path';

/**
 * The CLI of the docker.io package, of the same release as its dockerd, rather than whatever
 * `docker` comes first on PATH; elsewhere, the one on PATH.
 */
export const DOCKER_CLI = existsSync('/usr/bin/docker') ? '/usr/bin/docker' : 'docker';

export interface DockerdOptions {
  /** The daemon.json settings, e.g. `{ 'registry-mirrors': ['http://127.0.0.1:5000'] }`. */
  daemonConfig?: Record<string, unknown>;
  /** How long to wait for the daemon to answer `docker info`. */
  startTimeoutMs?: number;
}

export class TestDockerd {
  /** `unix://...`, for `docker -H` (the `docker()` method passes it). */
  readonly host: string;
  private exited: Promise<void>;

  private constructor(
    readonly dir: string,
    private readonly process: ChildProcess,
  ) {
    this.host = `unix://${join(dir, 'docker.sock')}`;
    this.exited = new Promise((resolve) => {
      if (process.exitCode !== null || process.signalCode !== null) resolve();
      else process.once('exit', () => resolve());
    });
  }

  static async start(options: DockerdOptions = {}): Promise<TestDockerd> {
    if (process.getuid?.() !== 0) {
      throw new Error('dockerd needs root: run the client tests as root');
    }
    const dir = mkdtempSync('/tmp/pcd-');
    for (const sub of ['data', 'exec', 'cli']) mkdirSync(join(dir, sub));
    const daemonJson = join(dir, 'daemon.json');
    writeFileSync(daemonJson, JSON.stringify(options.daemonConfig ?? {}, null, 2));
    const log = openSync(join(dir, 'dockerd.log'), 'a');
    const child = spawn(
      'dockerd',
      [
        '--storage-driver',
        'vfs',
        '--iptables=false',
        '--bridge=none',
        '--data-root',
        join(dir, 'data'),
        '--exec-root',
        join(dir, 'exec'),
        '-H',
        `unix://${join(dir, 'docker.sock')}`,
        '--pidfile',
        join(dir, 'dockerd.pid'),
        '--config-file',
        daemonJson,
      ],
      // The registries under test are local: a proxy of the environment must not be asked.
      { stdio: ['ignore', log, log], env: withoutProxies(process.env) },
    );
    closeSync(log); // dockerd has its own copy
    const daemon = new TestDockerd(dir, child);
    liveDaemons.add(daemon);
    try {
      await daemon.waitUntilUp(child, options.startTimeoutMs ?? 30_000);
    } catch (err) {
      await daemon.stop();
      throw err;
    }
    return daemon;
  }

  private async waitUntilUp(child: ChildProcess, timeoutMs: number): Promise<void> {
    let spawnError: Error | undefined;
    child.once('error', (err) => (spawnError = err));
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      if (spawnError) {
        throw new Error(`cannot start dockerd (apt-get install docker.io): ${spawnError.message}`);
      }
      if (child.exitCode !== null || child.signalCode !== null) {
        throw new Error(
          `dockerd exited (${child.exitCode ?? child.signalCode}):\n${this.logTail()}`,
        );
      }
      if (
        await this.docker('info').then(
          () => true,
          () => false,
        )
      ) {
        return;
      }
      if (Date.now() > deadline) {
        throw new Error(`dockerd did not answer on ${this.host}:\n${this.logTail()}`);
      }
      await new Promise((r) => setTimeout(r, 200));
    }
  }

  /** Runs the docker CLI against this daemon; resolves to stdout, rejects with stderr. */
  docker(...args: string[]): Promise<string> {
    return new Promise((resolve, reject) => {
      execFile(
        DOCKER_CLI,
        ['--config', join(this.dir, 'cli'), '-H', this.host, ...args],
        { timeout: 60_000, maxBuffer: 16 * 1024 * 1024 },
        (err, stdout, stderr) => {
          if (err) reject(new Error(`docker ${args.join(' ')} failed: ${stderr || err.message}`));
          else resolve(stdout);
        },
      );
    });
  }

  /** The last lines of dockerd's log, for failure messages. */
  logTail(lines = 30): string {
    try {
      return readFileSync(join(this.dir, 'dockerd.log'), 'utf8')
        .trimEnd()
        .split('\n')
        .slice(-lines)
        .join('\n');
    } catch {
      return '(no log)';
    }
  }

  /**
   * Stops dockerd (SIGTERM; SIGKILL after 15 s, then its containerd) and removes its
   * directories. Safe to call twice.
   */
  async stop(): Promise<void> {
    liveDaemons.delete(this);
    if (this.process.exitCode === null && this.process.signalCode === null) {
      this.process.kill('SIGTERM');
      const timer = setTimeout(() => this.process.kill('SIGKILL'), 15_000);
      await this.exited;
      clearTimeout(timer);
    }
    this.removeDir();
  }

  /** SIGKILL for dockerd and its containerd, then its directories, synchronously. */
  kill(): void {
    liveDaemons.delete(this);
    this.process.kill('SIGKILL');
    this.removeDir();
  }

  private removeDir(): void {
    // dockerd stops the containerd it started; one left behind by a killed dockerd goes too.
    killPidFile(join(this.dir, 'exec', 'containerd', 'containerd.pid'));
    // dockerd bind-mounts its data root onto itself and undoes it only on a clean shutdown.
    unmountUnder(this.dir);
    rmSync(this.dir, { recursive: true, force: true, maxRetries: 3 });
  }
}

const CERTS_D = '/etc/docker/certs.d';

/**
 * Makes every dockerd on this host trust `caPem` for the registry at `host` (HOST:PORT), as its
 * /etc/docker/certs.d/HOST:PORT/ca.crt. Returns what removes it again (and certs.d, if empty).
 */
export function trustRegistryCa(host: string, caPem: string): () => void {
  const dir = join(CERTS_D, host);
  mkdirSync(dir, { recursive: true });
  writeFileSync(join(dir, 'ca.crt'), caPem);
  return () => {
    rmSync(dir, { recursive: true, force: true });
    try {
      rmdirSync(CERTS_D);
    } catch {
      // another registry's CA is still there
    }
  };
}

function withoutProxies(env: NodeJS.ProcessEnv): NodeJS.ProcessEnv {
  return Object.fromEntries(
    Object.entries(env).filter(([name]) => !/^(https?|all|no)_proxy$/i.test(name)),
  );
}

/** Unmounts (lazily, deepest first) whatever is still mounted at or under `dir`. */
function unmountUnder(dir: string): void {
  const mountPoints = readFileSync('/proc/self/mountinfo', 'utf8')
    .split('\n')
    .map((line) => line.split(' ')[4])
    .filter((mp): mp is string => mp !== undefined)
    .map((mp) =>
      mp.replace(/\\([0-7]{3})/g, (_, octal: string) => String.fromCharCode(parseInt(octal, 8))),
    )
    .filter((mp) => mp === dir || mp.startsWith(`${dir}/`))
    .sort((a, b) => b.length - a.length);
  for (const mp of mountPoints) execFileSync('umount', ['--lazy', mp]);
}

function killPidFile(file: string): void {
  let pid: number;
  try {
    pid = Number(readFileSync(file, 'utf8').trim());
  } catch {
    return;
  }
  if (!Number.isInteger(pid) || pid <= 1) return;
  try {
    // Only if it is still a containerd (the pid may have been reused).
    if (!readFileSync(`/proc/${pid}/cmdline`, 'utf8').startsWith('containerd')) return;
    process.kill(pid, 'SIGKILL');
  } catch {
    // already gone
  }
}

// A test worker that exits without its afterAll (a crash, a kill) takes its daemons with it.
const liveDaemons = new Set<TestDockerd>();
process.once('exit', () => {
  for (const daemon of liveDaemons) {
    try {
      daemon.kill();
    } catch (err) {
      console.error(`cannot clean up dockerd in ${daemon.dir}:`, err);
    }
  }
});
