/**
 * Starts pullcache in-process on a free port with its own storage, against test upstreams;
 * over HTTPS with `options.tls` (a certificate of test/helpers/tls.ts: then `url` is https://).
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { parseConfig } from '../../src/config/load.js';
import { silentLogger, createLogger, type Logger } from '../../src/log/logger.js';
import { startServer, type RunningServer } from '../../src/server.js';

export interface TestPullcache extends RunningServer {
  root: string;
  /** host:port, for skopeo's docker:// references. */
  host: string;
  stop(): Promise<void>;
}

export async function startPullcache(
  raw: Record<string, unknown>,
  root?: string,
  options: { log?: Logger; tls?: { certPath: string; keyPath: string } } = {},
): Promise<TestPullcache> {
  const dir = root ?? mkdtempSync(join(tmpdir(), 'pullcache-data-'));
  const config = parseConfig({
    ...raw,
    server: {
      listen: '127.0.0.1:0',
      ...(options.tls ? { tls: { cert: options.tls.certPath, key: options.tls.keyPath } } : {}),
      ...(raw.server as object | undefined),
    },
    storage: { filesystem: { root: dir }, ...(raw.storage as object | undefined) },
  });
  const log =
    options.log ??
    (process.env.PULLCACHE_TEST_LOG
      ? createLogger({ level: process.env.PULLCACHE_TEST_LOG })
      : silentLogger());
  const running = await startServer(config, log);
  return {
    ...running,
    root: dir,
    host: running.address,
    async stop() {
      await running.close();
      if (!root) rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** A logger at `level` whose JSON lines are kept, parsed, in `lines`. */
export function capturedLog(level: string): { log: Logger; lines: Record<string, unknown>[] } {
  const lines: Record<string, unknown>[] = [];
  const destination = new Writable({
    write(chunk: Buffer, _enc, done) {
      for (const line of chunk.toString().split('\n').filter(Boolean))
        lines.push(JSON.parse(line) as Record<string, unknown>);
      done();
    },
  });
  return { log: createLogger({ level, destination }), lines };
}
