/**
 * Without client authentication, changing the cache is for this host's clients only. Behind a
 * proxy on this host (nginx on localhost, a sidecar on 127.0.0.6), every connection comes from
 * loopback: trusted (`server.trustProxy`), the client is the address the proxy forwarded, not the
 * connection's; not trusted, a request that came through a proxy is from no client of this host.
 */
import type { IncomingMessage } from 'node:http';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { createAccess } from '../../src/access/access.js';
import { parseConfig } from '../../src/config/load.js';
import { silentLogger } from '../../src/log/logger.js';
import { ociError } from '../helpers/http.js';
import { startPullcache, type TestPullcache } from '../helpers/pullcache.js';
import { TestRegistry } from '../helpers/registry.js';

describe('the admin action without client authentication, behind a trusted proxy', () => {
  let registry: TestRegistry;
  let behind: TestPullcache;
  let direct: TestPullcache;

  beforeAll(async () => {
    registry = await TestRegistry.start();
    const upstreams = { 'docker.io': { url: registry.url } };
    behind = await startPullcache({ upstreams, server: { trustProxy: true } });
    direct = await startPullcache({ upstreams });
  });
  afterAll(async () => {
    await behind?.stop();
    await direct?.stop();
    await registry?.close();
  });

  /** A dry-run gc (the admin action over the whole cache) over a loopback connection. */
  const gc = async (pc: TestPullcache, headers: Record<string, string> = {}) => {
    const res = await fetch(`${pc.url}/_pullcache/v1/gc`, {
      method: 'POST',
      headers: { ...headers, 'content-type': 'application/json' },
      body: '{"dryRun":true}',
    });
    return { status: res.status, code: res.status === 200 ? undefined : await ociError(res) };
  };
  const status = async (pc: TestPullcache, headers: Record<string, string>) =>
    (
      (await (await fetch(`${pc.url}/_pullcache/v1/status`, { headers })).json()) as {
        viewer: { admin: boolean };
      }
    ).viewer;

  test('a client the proxy forwarded from elsewhere is refused, though the proxy connects from loopback', async () => {
    expect(await gc(behind, { 'x-forwarded-for': '203.0.113.9' })).toEqual({
      status: 403,
      code: 'DENIED',
    });
    // The address the proxy saw is the last entry: what a client writes before it counts not.
    expect(await gc(behind, { 'x-forwarded-for': '127.0.0.1, 203.0.113.9' })).toMatchObject({
      status: 403,
    });
    expect(await gc(behind, { 'x-forwarded-for': 'unknown' })).toMatchObject({ status: 403 });
    expect(await status(behind, { 'x-forwarded-for': '203.0.113.9' })).toEqual({ admin: false });
    // Two proxies on this host (a TLS terminator, then nginx): the entries to the right of the
    // client are theirs, loopback; the client is the right-most entry that is not.
    expect(await gc(behind, { 'x-forwarded-for': '203.0.113.9, 127.0.0.1' })).toMatchObject({
      status: 403,
    });
    expect(await gc(behind, { 'x-forwarded-for': '127.0.0.1, 203.0.113.9, ::1' })).toMatchObject({
      status: 403,
    });
    // A trusted proxy that forwarded the request without saying whom for: nobody of this host.
    expect(await gc(behind, { 'x-real-ip': '203.0.113.9' })).toMatchObject({ status: 403 });
  });

  test('without trustProxy, a request that came through a proxy on this host is not local', async () => {
    // nginx's proxy_pass with the recipes' headers, Host: 127.0.0.1:5000 ($proxy_host) or not.
    const recipes: Record<string, string>[] = [
      { 'x-forwarded-for': '203.0.113.9' },
      { 'x-forwarded-for': '127.0.0.1' },
      { 'x-real-ip': '203.0.113.9' },
      { 'x-forwarded-proto': 'https' },
      { 'x-forwarded-host': 'registry.example.com' },
      { forwarded: 'for=203.0.113.9;proto=https' },
      { via: '1.1 proxy.example.com' },
    ];
    for (const headers of recipes) {
      expect(await gc(direct, headers), JSON.stringify(headers)).toEqual({
        status: 403,
        code: 'DENIED',
      });
      expect(await status(direct, headers)).toEqual({ admin: false });
    }
    // Pulls are everyone's, as before.
    const ping = await fetch(`${direct.url}/v2/`, { headers: { 'x-real-ip': '203.0.113.9' } });
    expect(ping.status).toBe(200);
  });

  test('a client of this host is served: through the proxy, or connecting itself', async () => {
    expect(await gc(behind, { 'x-forwarded-for': '127.0.0.1' })).toEqual({ status: 200 });
    expect(await gc(behind, { 'x-forwarded-for': '127.0.0.1, ::1' })).toEqual({ status: 200 });
    // No proxy in between (the commands beside the server): the connection's address.
    expect(await gc(behind)).toEqual({ status: 200 });
    expect(await status(behind, {})).toEqual({ admin: true });
    expect(await gc(direct)).toEqual({ status: 200 });
    expect(await status(direct, {})).toEqual({ admin: true });
  });
});

test('a client connecting from elsewhere is not made local by an X-Forwarded-For it writes', () => {
  const access = createAccess(parseConfig({ server: { trustProxy: true } }), silentLogger());
  const from = (remoteAddress: string, forwarded?: string) =>
    ({
      socket: { remoteAddress },
      headers: forwarded === undefined ? {} : { 'x-forwarded-for': forwarded },
    }) as unknown as IncomingMessage;
  const local = (req: IncomingMessage) => (access.identify(req) as { local: boolean }).local;
  expect(local(from('192.0.2.7', '127.0.0.1'))).toBe(false);
  expect(local(from('192.0.2.7', '::1'))).toBe(false);
  expect(local(from('192.0.2.7'))).toBe(false);
  // Through a proxy on this host, from this host: local.
  expect(local(from('127.0.0.1', '127.0.0.1'))).toBe(true);
  expect(local(from('127.0.0.1', '192.0.2.7'))).toBe(false);
  // What the client wrote is left of what the proxy appended: neither order makes it local.
  expect(local(from('127.0.0.1', '127.0.0.1, 192.0.2.7'))).toBe(false);
  expect(local(from('127.0.0.1', '192.0.2.7, 127.0.0.1'))).toBe(false);
  expect(local(from('127.0.0.1', '127.0.0.1:8080'))).toBe(false);

  // The client logs and metrics name is the same one: proxies on this host are not the client.
  const client = (req: IncomingMessage) => access.clientAddress(req);
  expect(client(from('127.0.0.1', '192.0.2.7, 127.0.0.1'))).toBe('192.0.2.7');
  expect(client(from('127.0.0.1', '127.0.0.1, 192.0.2.7'))).toBe('192.0.2.7');
  expect(client(from('127.0.0.1', '198.51.100.1, 192.0.2.7, ::1'))).toBe('192.0.2.7');
  expect(client(from('127.0.0.1', '127.0.0.1, ::1'))).toBe('127.0.0.1');
  expect(client(from('127.0.0.1', 'unknown'))).toBe('127.0.0.1');
  expect(client(from('192.0.2.9'))).toBe('192.0.2.9');
});
