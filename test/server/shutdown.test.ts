/**
 * Stopping `pullcache serve` (one process) on a signal: new connections are refused at once, the
 * transfers in flight go on for `server.drainTimeout`, then are cut; the process exits 0. (The
 * same with workers: test/fleet/workers.test.ts.)
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { pushRandomBlob } from '../helpers/images.js';
import { connect } from 'node:net';
import { waitFor } from '../helpers/net.js';
import { TestCa } from '../helpers/tls.js';
import { TestRegistry } from '../helpers/registry.js';
import {
  get,
  intact,
  pausedDownload,
  startWorkers,
  type WorkersServer,
} from '../helpers/workers.js';

const MiB = 1024 * 1024;

const refused = (url: string) =>
  get(url).then(
    () => false,
    (err: NodeJS.ErrnoException) => err.code === 'ECONNREFUSED',
  );

describe('stopping on a signal', () => {
  let registry: TestRegistry;
  let blob: { digest: string };
  const servers: WorkersServer[] = [];

  /** One process with `drainTimeout`, the test's blob already stored. */
  async function serve(drainTimeout: string): Promise<WorkersServer> {
    const pc = await startWorkers({
      upstream: registry.url,
      workers: 1,
      server: [`  drainTimeout: ${drainTimeout}`],
    });
    servers.push(pc);
    const url = `${pc.url}/v2/library/drain/blobs/${blob.digest}`;
    expect(intact(await get(url), blob.digest)).toBe(true);
    return pc;
  }

  /** One process over HTTPS with a drainTimeout of 1 s, and the CA its certificate is from. */
  async function serveTls(): Promise<{ pc: WorkersServer; ca: TestCa }> {
    const ca = TestCa.create();
    const cert = ca.issue();
    const pc = await startWorkers({
      upstream: registry.url,
      workers: 1,
      server: [
        '  drainTimeout: 1s',
        '  tls:',
        `    cert: ${cert.certPath}`,
        `    key: ${cert.keyPath}`,
      ],
    });
    servers.push(pc);
    return { pc, ca };
  }

  beforeAll(async () => {
    registry = await TestRegistry.start();
    const { digest } = await pushRandomBlob(registry, 'library/drain', 48 * MiB);
    blob = { digest };
  }, 60_000);
  afterAll(async () => {
    for (const pc of servers) await pc.stop();
    await registry?.close();
  });

  test('SIGTERM: new connections are refused, a download in flight ends whole, then it exits 0', async () => {
    const pc = await serve('20s');
    const url = `${pc.url}/v2/library/drain/blobs/${blob.digest}`;
    const download = await pausedDownload(url);
    pc.primary.kill('SIGTERM');
    await waitFor(() => refused(url), 'new connections refused');
    // A second SIGTERM (a service manager signalling again) changes nothing.
    pc.primary.kill('SIGTERM');
    await new Promise((r) => setTimeout(r, 300));
    expect(pc.primary.exitCode).toBeNull();
    download.resume();
    expect(intact(await download.done, blob.digest)).toBe(true);
    expect(await pc.exited()).toBe(0);
    expect(pc.lines.some((l) => l.msg === 'draining connections')).toBe(true);
  }, 60_000);

  test('a second ^C stops at once, with exit code 1', async () => {
    const pc = await serve('20s');
    const download = await pausedDownload(`${pc.url}/v2/library/drain/blobs/${blob.digest}`);
    pc.primary.kill('SIGINT');
    await new Promise((r) => setTimeout(r, 300));
    expect(pc.primary.exitCode).toBeNull(); // draining
    const signalled = Date.now();
    pc.primary.kill('SIGINT');
    expect(await pc.exited()).toBe(1);
    expect(Date.now() - signalled).toBeLessThan(3000);
    download.resume();
    expect((await download.done).error).toBeDefined();
  }, 60_000);

  test('over HTTPS, a connection still in its TLS handshake does not hold the stop', async () => {
    const { pc } = await serveTls();
    // Connected, and silent: no ClientHello.
    const silent = connect(pc.port, '127.0.0.1');
    await new Promise((resolve) => silent.once('connect', resolve));
    silent.on('error', () => {});
    const signalled = Date.now();
    pc.primary.kill('SIGTERM');
    expect(await pc.exited()).toBe(0);
    expect(Date.now() - signalled).toBeLessThan(5000);
    silent.destroy();
  }, 60_000);

  test('a download still in flight after drainTimeout is cut, and the process exits 0', async () => {
    const pc = await serve('1s');
    const url = `${pc.url}/v2/library/drain/blobs/${blob.digest}`;
    const download = await pausedDownload(url);
    const signalled = Date.now();
    pc.primary.kill('SIGTERM');
    expect(await pc.exited()).toBe(0);
    const took = Date.now() - signalled;
    expect(took).toBeGreaterThanOrEqual(900);
    expect(took).toBeLessThan(10_000);
    download.resume();
    const got = await download.done;
    expect(got.error).toBeDefined();
    expect(got.body.length).toBeLessThan(48 * MiB);
    expect(pc.lines.some((l) => String(l.msg).startsWith('drain timeout'))).toBe(true);
    // Its request line says the server cut it, not its client.
    const line = pc.lines.find((l) => l.msg === 'request failed');
    expect(line?.err).toBe('the server stopped before the answer ended (server.drainTimeout)');
  }, 60_000);

  test('over HTTPS too, the request line of a download cut after drainTimeout says the server cut it', async () => {
    const { pc, ca } = await serveTls();
    const url = `https://127.0.0.1:${pc.port}/v2/library/drain/blobs/${blob.digest}`;
    expect(intact(await get(url, undefined, undefined, ca.pem), blob.digest)).toBe(true);
    const download = await pausedDownload(url, ca.pem);
    pc.primary.kill('SIGTERM');
    expect(await pc.exited()).toBe(0);
    download.resume();
    expect((await download.done).error).toBeDefined();
    const line = pc.lines.find((l) => l.msg === 'request failed');
    expect(line?.err).toBe('the server stopped before the answer ended (server.drainTimeout)');
  }, 60_000);
});
