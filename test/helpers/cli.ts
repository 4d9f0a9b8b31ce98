/**
 * Runs the real `pullcache` command (src/cli.ts through tsx) in a child process, as a user's
 * shell would: arguments, standard input, a file size limit, or a shell pipe of two commands.
 * Each runs in a directory of its own, so that a stray file (say, one named `-`) is seen there
 * and never lands in the working tree.
 */
import { spawn } from 'node:child_process';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

export interface CliResult {
  code: number | null;
  stdout: Buffer;
  stderr: string;
}

export const tmp = (what: string) => mkdtempSync(join(tmpdir(), `pullcache-cli-${what}-`));

/** The shell words that start pullcache, from any directory. */
export const PULLCACHE = `node --import ${import.meta.resolve('tsx')} ${fileURLToPath(new URL('../../src/cli.ts', import.meta.url))}`;

/** A shell word for `value`, quoted. */
export const quote = (value: string) => `'${value.replaceAll("'", `'\\''`)}'`;

/**
 * Runs a shell command line in `cwd` (a new empty directory unless given); `$PULLCACHE` in it
 * starts pullcache.
 */
export function sh(
  line: string,
  options: { input?: Buffer; timeout?: number; cwd?: string } = {},
): Promise<CliResult> {
  return new Promise((resolve, reject) => {
    const child = spawn('sh', ['-c', line], {
      cwd: options.cwd ?? tmp('cwd'),
      env: { ...process.env, PULLCACHE },
      stdio: ['pipe', 'pipe', 'pipe'],
    });
    const stdout: Buffer[] = [];
    let stderr = '';
    child.stdout.on('data', (chunk: Buffer) => stdout.push(chunk));
    child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
    const timer = setTimeout(() => child.kill('SIGKILL'), options.timeout ?? 120_000);
    child.on('error', reject);
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout: Buffer.concat(stdout), stderr });
    });
    child.stdin.on('error', () => {}); // a command that does not read its input
    child.stdin.end(options.input);
  });
}

/** `pullcache ARGS...`, with nothing on standard input. */
export function cli(...args: string[]): Promise<CliResult> {
  return sh(`exec $PULLCACHE ${args.map(quote).join(' ')}`);
}

/** `pullcache ARGS...` run in `cwd`. */
export function cliIn(cwd: string, ...args: string[]): Promise<CliResult> {
  return sh(`exec $PULLCACHE ${args.map(quote).join(' ')}`, { cwd });
}

/** A config file with this storage root and these upstreams (name -> url). */
export function configFile(
  root: string,
  upstreams: Record<string, Record<string, unknown>>,
): string {
  const file = join(tmp('config'), 'pullcache.yaml');
  const lines = ['storage:', '  filesystem:', `    root: ${root}`, 'upstreams:'];
  for (const [name, u] of Object.entries(upstreams)) {
    lines.push(`  ${name}:`);
    for (const [k, v] of Object.entries(u)) lines.push(`    ${k}: ${String(v)}`);
  }
  writeFileSync(file, `${lines.join('\n')}\n`);
  return file;
}

/** True when stderr shows a JavaScript stack trace (an `at ...` frame line). */
export const hasStackTrace = (stderr: string) => /^\s+at .+[(:]/m.test(stderr);
