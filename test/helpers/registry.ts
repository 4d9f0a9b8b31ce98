/**
 * A real upstream: Debian's `docker-registry` (distribution 2.8) with token auth in front of it,
 * the way Docker Hub works. Each instance has its own storage directory and port.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createWriteStream, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { freePort, waitFor } from './net.js';
import { ISSUER, SERVICE, TokenServer } from './token-server.js';

export class TestRegistry {
  private process: ChildProcess | undefined;
  url = '';
  port = 0;

  private constructor(
    readonly dir: string,
    readonly tokens: TokenServer,
  ) {}

  static async start(): Promise<TestRegistry> {
    const dir = mkdtempSync(join(tmpdir(), 'pullcache-upstream-'));
    const tokens = await TokenServer.start(dir);
    const registry = new TestRegistry(dir, tokens);
    registry.port = await freePort();
    await registry.run();
    return registry;
  }

  private async run(): Promise<void> {
    const config = join(this.dir, 'config.yml');
    mkdirSync(join(this.dir, 'storage'), { recursive: true });
    writeFileSync(
      config,
      [
        'version: 0.1',
        'log:',
        '  level: warn',
        '  accesslog:',
        '    disabled: true',
        'storage:',
        '  filesystem:',
        `    rootdirectory: ${join(this.dir, 'storage')}`,
        '  delete:',
        '    enabled: true',
        '  cache:',
        '    blobdescriptor: inmemory',
        'http:',
        `  addr: 127.0.0.1:${this.port}`,
        'auth:',
        '  token:',
        `    realm: ${this.tokens.url}`,
        `    service: ${SERVICE}`,
        `    issuer: ${ISSUER}`,
        `    rootcertbundle: ${this.tokens.certPath}`,
        '',
      ].join('\n'),
    );
    const log = createWriteStream(join(this.dir, 'registry.log'), { flags: 'a' });
    this.process = spawn('docker-registry', ['serve', config], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    this.process.stdout!.pipe(log);
    this.process.stderr!.pipe(log);
    this.url = `http://127.0.0.1:${this.port}`;
    await waitFor(
      async () => (await fetch(`${this.url}/v2/`)).status === 401,
      `docker-registry on ${this.url}`,
    );
  }

  /** The registry's process id (for /proc figures in the benchmark). */
  get pid(): number | undefined {
    return this.process?.pid;
  }

  /** Stops the registry process; `restart()` brings it back on the same port and storage. */
  async stop(): Promise<void> {
    const p = this.process;
    this.process = undefined;
    if (!p || p.exitCode !== null || p.signalCode !== null) return;
    await new Promise<void>((resolve) => {
      p.once('exit', () => resolve());
      p.kill('SIGTERM');
    });
  }

  async restart(): Promise<void> {
    await this.stop();
    await this.run();
  }

  async close(): Promise<void> {
    await this.stop();
    await this.tokens.close();
    rmSync(this.dir, { recursive: true, force: true });
  }
}
