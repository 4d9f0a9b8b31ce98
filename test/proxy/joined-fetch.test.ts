/**
 * ProxyBlobStore when a client joins a fetch made for another repository and that fetch is
 * refused for its own repository (with workers: it was to follow another process's fetch, which
 * the upstream did not confirm for it). The moment cannot be hit from outside on purpose: a fake
 * stands in for that fetch, on real storage, with an in-process upstream.
 */
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { afterEach, expect, test } from 'vitest';
import { silentLogger } from '../../src/log/logger.js';
import { Metrics } from '../../src/metrics.js';
import { digestOf, type Digest } from '../../src/oci/digest.js';
import { parseRepository } from '../../src/oci/reference.js';
import { deferred } from '../../src/proxy/deferred.js';
import { ProxyBlobStore } from '../../src/proxy/proxy-blob-store.js';
import type { UpstreamFetch } from '../../src/proxy/types.js';
import { DriverBlobStore } from '../../src/storage/blob-store.js';
import { FilesystemDriver } from '../../src/storage/filesystem-driver.js';
import type { LocalBlobService } from '../../src/storage/local-services.js';
import type { MetadataCache } from '../../src/metadata/types.js';
import { UpstreamNotFoundError } from '../../src/upstream/errors.js';
import type { UpstreamClient } from '../../src/upstream/types.js';

const roots: string[] = [];
afterEach(() => roots.splice(0).forEach((r) => rmSync(r, { recursive: true, force: true })));

test("a client that joined another repository's fetch, refused for that one, fetches for itself", async () => {
  const bytes = randomBytes(200_000);
  const digest = digestOf(bytes);
  const root = mkdtempSync(join(tmpdir(), 'pullcache-joined-'));
  roots.push(root);
  const gets: string[] = [];
  const client = {
    name: 'fake',
    headBlob: async () => ({ size: bytes.length }),
    getBlob: async (repository: string) => {
      gets.push(repository);
      return { size: bytes.length, stream: Readable.from([bytes]) };
    },
  } as unknown as UpstreamClient;
  const nothing = async () => ({ found: false as const });
  const local = {
    stat: nothing,
    open: nothing,
    stored: nothing,
    link: async () => {},
  } as unknown as LocalBlobService;
  // The fetch for team-b/app, under way, then refused for team-b/app.
  const ready = deferred<void>();
  const other = {
    digest,
    repo: { upstream: 'docker.io', repository: parseRepository('team-b/app') },
    ready: ready.promise,
    done: ready.promise.then(() => ({ digest, size: bytes.length })),
    state: 'starting',
    size: undefined,
  } as unknown as UpstreamFetch & { state: string };
  other.done.catch(() => {});
  const inflight = new Map<Digest, UpstreamFetch>([[digest, other]]);
  const store = new ProxyBlobStore({
    local,
    blobs: new DriverBlobStore(new FilesystemDriver(root)),
    cache: {} as MetadataCache,
    client,
    log: silentLogger(),
    metrics: new Metrics(),
    orphanTimeout: 60_000,
    inflight,
  });
  const opening = store.open(
    { upstream: 'docker.io', repository: parseRepository('team-c/app') },
    digest,
  );
  await new Promise((r) => setTimeout(r, 20)); // confirmed for team-c/app, and joined
  other.state = 'failed';
  ready.reject(new UpstreamNotFoundError('fake', `blob ${digest}`));
  const opened = await opening;
  expect(opened.found).toBe(true);
  if (!opened.found) return;
  const chunks: Buffer[] = [];
  for await (const chunk of opened.stream) chunks.push(chunk as Buffer);
  expect(Buffer.concat(chunks).equals(bytes)).toBe(true);
  expect(gets).toEqual(['team-c/app']);
});
