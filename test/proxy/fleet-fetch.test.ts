/**
 * FleetFetch with leases of its own making (the host's leases are tested through real workers in
 * test/fleet/): what it shows of a fetch another process holds.
 */
import { expect, test } from 'vitest';
import type { DigestLeases, HeldFetch, HolderEvent } from '../../src/fleet/types.js';
import { silentLogger } from '../../src/log/logger.js';
import type { Digest } from '../../src/oci/digest.js';
import { FleetFetch } from '../../src/proxy/fleet-fetch.js';
import { HolderStalledError, RemoteBlobFetch } from '../../src/proxy/remote-fetch.js';
import type { BlobStore, RepositoryKey } from '../../src/storage/types.js';
import { UpstreamNotFoundError } from '../../src/upstream/errors.js';
import type { UpstreamClient } from '../../src/upstream/types.js';

test('a fetch followed from another process shows the bytes that process wrote and its own clients', async () => {
  let tell!: (event: HolderEvent) => void;
  const holder: HeldFetch = {
    scope: 'docker.io/library/x',
    watch: (listener) => (tell = listener),
    readWritten: () => Promise.reject(new Error('not read here')),
    close: () => {},
  };
  const leases: DigestLeases = {
    acquire: () => Promise.resolve({ held: false, holder }),
    takeOver: () => {
      throw new Error('no take-over here');
    },
  };
  const fetch = new FleetFetch({
    leases,
    idleTimeout: 60_000,
    blobs: {} as BlobStore,
    client: {} as UpstreamClient,
    repo: { upstream: 'docker.io', repository: 'library/x' } as RepositoryKey,
    digest: `sha256:${'b'.repeat(64)}` as Digest,
    log: silentLogger(),
    orphanTimeout: 60_000,
    onCommitted: async () => {},
    // The holder fetches for this repository: the upstream is not asked.
    confirm: () => Promise.reject(new Error('not asked for the same repository')),
  });
  await new Promise((r) => setImmediate(r));
  tell({ type: 'started', size: 1000 });
  await fetch.ready;
  tell({ type: 'progress', written: 400 });
  const follower = fetch.follow(0, 1000);
  expect(fetch.local).toBe(false);
  expect(fetch.size).toBe(1000);
  expect(fetch.received).toBe(400);
  expect(fetch.clients).toBe(1);
  follower.destroy();
  expect(fetch.clients).toBe(0);
  tell({ type: 'failed', reason: 'the holder gave up' });
  await expect(fetch.done).rejects.toThrow('the holder gave up');
});

test('a holder fetching for another repository is followed only once the upstream confirms this one has the blob', async () => {
  const start = (confirm: () => Promise<void>) => {
    let closed = false;
    let tell!: (event: HolderEvent) => void;
    const holder: HeldFetch = {
      scope: 'docker.io/private/app',
      watch: (listener) => (tell = listener),
      readWritten: () => Promise.reject(new Error('not read here')),
      close: () => (closed = true),
    };
    const fetch = new FleetFetch({
      leases: {
        acquire: () => Promise.resolve({ held: false, holder }),
        takeOver: () => {
          throw new Error('no take-over here');
        },
      },
      idleTimeout: 60_000,
      blobs: {
        create: () => Promise.reject(new Error('nothing stored here')),
      } as unknown as BlobStore,
      client: {
        getBlob: () => Promise.reject(new Error('the upstream was asked for the blob')),
      } as unknown as UpstreamClient,
      repo: { upstream: 'docker.io', repository: 'public/app' } as RepositoryKey,
      digest: `sha256:${'d'.repeat(64)}` as Digest,
      log: silentLogger(),
      orphanTimeout: 60_000,
      onCommitted: async () => {},
      confirm,
    });
    fetch.done.catch(() => {});
    return { fetch, tell: (e: HolderEvent) => tell(e), closed: () => closed };
  };
  // The upstream says no: nothing of the holder's is followed, and the request fails with it.
  const refused = start(() => Promise.reject(new UpstreamNotFoundError('docker.io', 'blob')));
  await expect(refused.fetch.ready).rejects.toBeInstanceOf(UpstreamNotFoundError);
  expect(refused.closed()).toBe(true);
  // It cannot be asked (a 5xx): not followed, fetched from here instead, whose GET answers.
  const unconfirmed = start(() => Promise.reject(new Error('HTTP 502 from the upstream')));
  await expect(unconfirmed.fetch.ready).rejects.toThrow('the upstream was asked for the blob');
  expect(unconfirmed.closed()).toBe(true);
  // It says yes: followed.
  let asked = 0;
  const confirmed = start(async () => void asked++);
  await new Promise((r) => setImmediate(r));
  confirmed.tell({ type: 'started', size: 10 });
  await confirmed.fetch.ready;
  expect(asked).toBe(1);
  expect(confirmed.fetch.local).toBe(false);
  confirmed.tell({ type: 'failed', reason: 'test over' });
});

test('a holder that is committing (every byte written) is waited for past the idle timeout; one that says nothing before is not', async () => {
  const follow = (idleTimeout: number) => {
    let tell!: (event: HolderEvent) => void;
    const holder: HeldFetch = {
      scope: 'docker.io/library/x',
      watch: (listener) => (tell = listener),
      readWritten: () => Promise.reject(new Error('not read here')),
      close: () => {},
    };
    const fetch = new RemoteBlobFetch({
      digest: `sha256:${'c'.repeat(64)}` as Digest,
      repo: { upstream: 'docker.io', repository: 'library/x' } as RepositoryKey,
      holder,
      blobs: {} as BlobStore,
      idleTimeout,
    });
    fetch.done.catch(() => {});
    return { fetch, tell };
  };
  // Its commit (on S3 a server-side copy) outlasts the idle timeout: followed to the end.
  const slowCommit = follow(200);
  slowCommit.tell({ type: 'started', size: 1000 });
  slowCommit.tell({ type: 'progress', written: 1000 });
  slowCommit.tell({ type: 'committing' });
  await new Promise((r) => setTimeout(r, 600));
  expect(slowCommit.fetch.state).toBe('running');
  slowCommit.tell({ type: 'committed', size: 1000, kept: true });
  await expect(slowCommit.fetch.done).resolves.toMatchObject({ size: 1000 });
  // A holder that has written every byte but the last is waiting for it (another replica sends
  // it once that one has committed the blob): waited for the same way.
  const lastByte = follow(200);
  lastByte.tell({ type: 'started', size: 1000 });
  lastByte.tell({ type: 'progress', written: 999 });
  await new Promise((r) => setTimeout(r, 600));
  expect(lastByte.fetch.state).toBe('running');
  lastByte.fetch.fail(new Error('test over'));
  // Silent before it said it was committing: a stalled holder, given up on.
  const stalled = follow(200);
  stalled.tell({ type: 'started', size: 1000 });
  stalled.tell({ type: 'progress', written: 998 });
  await expect(stalled.fetch.done).rejects.toBeInstanceOf(HolderStalledError);
});
