/**
 * The command line itself: exit codes (0 done, 1 failed, 2 used wrongly), which command takes
 * which option, and failures told in one line on stderr, never a stack trace.
 */
import { join } from 'node:path';
import { describe, expect, test } from 'vitest';
import { cli, configFile, hasStackTrace, tmp } from '../helpers/cli.js';

describe('exit codes', () => {
  test('an unknown option is a usage error: exit 2', async () => {
    const r = await cli('export', '-o', 'b.tar', '--bogus');
    expect(r.code).toBe(2);
    expect(r.stderr).toContain("unknown option '--bogus'");
  });

  test('a missing argument is a usage error: exit 2', async () => {
    const r = await cli('import');
    expect(r.code).toBe(2);
    expect(r.stderr).toContain("missing required argument 'bundle'");
  });

  test('a missing required option is a usage error: exit 2', async () => {
    const r = await cli('export', '--all');
    expect(r.code).toBe(2);
    expect(r.stderr).toContain("required option '-o, --output <file>' not specified");
  });

  test('an unknown command is a usage error: exit 2', async () => {
    const r = await cli('exprot');
    expect(r.code).toBe(2);
    expect(r.stderr).toContain("unknown command 'exprot'");
  });

  test('no command prints the help on stderr and exits 2', async () => {
    const r = await cli();
    expect(r.code).toBe(2);
    expect(r.stderr).toContain('Usage: pullcache');
    expect(r.stdout.length).toBe(0);
  });

  test('--help, help and --version print on stdout and exit 0', async () => {
    for (const args of [['--help'], ['help'], ['export', '--help'], ['help', 'import']]) {
      const r = await cli(...args);
      expect(r.code, args.join(' ')).toBe(0);
      expect(r.stdout.toString()).toContain('Usage: pullcache');
    }
    const version = await cli('--version');
    expect(version.code).toBe(0);
    expect(version.stdout.toString()).toMatch(/^\d+\.\d+\.\d+\n$/);
  });

  test('an invalid option value is a usage error: exit 2', async () => {
    const r = await cli('import', '--log-level', 'loud', 'bundle.tar');
    expect(r.code).toBe(2);
    expect(r.stderr).toContain("option '--log-level <level>' argument 'loud' is invalid");
  });
});

describe('options', () => {
  test('only serve and config take --listen', async () => {
    for (const command of ['serve', 'config']) {
      const r = await cli(command, '--help');
      expect(r.stdout.toString(), command).toContain('--listen <host:port>');
    }
    for (const [command, ...args] of [
      ['prefetch', 'x'],
      ['export', '-o', 'b.tar', 'x'],
      ['import', 'x'],
    ]) {
      const help = await cli(command!, '--help');
      expect(help.stdout.toString(), command).toContain('--storage-root <dir>');
      expect(help.stdout.toString(), command).not.toContain('--listen');
      const r = await cli(command!, '--listen', '127.0.0.1:5001', ...args);
      expect(r.code, command).toBe(2);
      expect(r.stderr, command).toContain("unknown option '--listen'");
    }
  });
});

describe('failures', () => {
  test('a failure is one line on stderr and exit 1, never a stack trace', async () => {
    const root = tmp('root');
    const config = configFile(root, { 'docker.io': { url: 'http://registry.invalid' } });
    const missing = join(tmp('missing'), 'nothing.tar');
    const r = await cli('import', '--config', config, missing);
    expect(r.code).toBe(1);
    expect(r.stderr).toBe(`pullcache: cannot read ${missing}: no such file\n`);
    expect(hasStackTrace(r.stderr)).toBe(false);
  });

  test('nothing to export or prefetch is a usage error: exit 2', async () => {
    const root = tmp('root');
    const config = configFile(root, { 'docker.io': { url: 'http://registry.invalid' } });
    const r = await cli('export', '--config', config, '-o', join(root, 'b.tar'));
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/^error: nothing to export: give references or --all\n/);
    const p = await cli('prefetch', '--config', config);
    expect(p.code).toBe(2);
    expect(p.stderr).toMatch(/^error: nothing to prefetch: give references or --file\n/);
  });
});
