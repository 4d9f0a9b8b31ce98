/**
 * A real redis-server for the tests: PULLCACHE_TEST_REDIS_URL when set, else one started here on
 * a free port. A missing redis-server is a failure, not a skip.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { connect } from 'node:net';
import { freePort, waitFor } from './net.js';

export interface TestRedis {
  url: string;
  /** The server's process, when started here (not PULLCACHE_TEST_REDIS_URL's). */
  pid?: number;
  stop(): Promise<void>;
}

/** `port`: always a server of its own on that port (a test that stops and starts it again). */
export async function startRedis(options: { port?: number } = {}): Promise<TestRedis> {
  const given = process.env.PULLCACHE_TEST_REDIS_URL;
  if (given && options.port === undefined) return { url: given, stop: async () => {} };
  const port = options.port ?? (await freePort());
  const child: ChildProcess = spawn(
    'redis-server',
    ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'],
    {
      stdio: 'ignore',
    },
  );
  const failed = new Promise<never>((_, reject) => {
    child.once('error', (err) =>
      reject(new Error(`cannot start redis-server (apt-get install redis-server): ${err.message}`)),
    );
  });
  await Promise.race([
    failed,
    waitFor(
      () =>
        new Promise<boolean>((resolve) => {
          const s = connect(port, '127.0.0.1', () => {
            s.end();
            resolve(true);
          });
          s.on('error', () => resolve(false));
        }),
      `redis-server on port ${port}`,
    ),
  ]);
  return {
    url: `redis://127.0.0.1:${port}`,
    ...(child.pid !== undefined ? { pid: child.pid } : {}),
    stop: () =>
      new Promise<void>((resolve) => {
        if (child.exitCode !== null || child.signalCode !== null) return resolve();
        child.once('exit', () => resolve());
        child.kill('SIGTERM');
      }),
  };
}
