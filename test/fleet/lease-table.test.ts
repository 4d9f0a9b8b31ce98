/** The primary's leases on digests (fleet/lease-table.ts), as the workers see them over IPC. */
import { describe, expect, test } from 'vitest';
import { LeaseTable } from '../../src/fleet/lease-table.js';
import type { HolderState, ToWorker } from '../../src/fleet/messages.js';
import type { Digest } from '../../src/oci/digest.js';

const digest = `sha256:${'a'.repeat(64)}` as Digest;
/** What every worker here fetches for, unless a test says otherwise. */
const scope = 'docker.io/library/a';

function table() {
  const sent: { worker: number; message: ToWorker }[] = [];
  const leases = new LeaseTable((worker, message) => sent.push({ worker, message }));
  const to = (worker: number) => sent.filter((s) => s.worker === worker).map((s) => s.message);
  return { leases, sent, to };
}

/** What the primary answers a follower's `token`: the holder 1.1, and what it said so far. */
const held = (token: string, state: HolderState): ToWorker => ({
  pullcache: 'lease',
  t: 'held',
  token,
  holder: '1.1',
  scope,
  state,
});

describe('the leases of one host', () => {
  test('the first to ask holds the digest; a later one is told the holder and what it said so far, then its progress', () => {
    const { leases, to } = table();
    leases.receive(1, { pullcache: 'lease', t: 'acquire', digest, token: '1.1', scope });
    expect(to(1)).toEqual([{ pullcache: 'lease', t: 'granted', token: '1.1' }]);
    leases.receive(1, { pullcache: 'lease', t: 'started', token: '1.1', upload: 'u1', size: 100 });
    leases.receive(1, { pullcache: 'lease', t: 'progress', token: '1.1', written: 40 });
    leases.receive(2, { pullcache: 'lease', t: 'acquire', digest, token: '2.1', scope });
    expect(to(2)).toEqual([held('2.1', { upload: 'u1', size: 100, written: 40 })]);
    leases.receive(1, { pullcache: 'lease', t: 'progress', token: '1.1', written: 90 });
    leases.receive(1, { pullcache: 'lease', t: 'committed', token: '1.1', size: 100, kept: true });
    expect(to(2).slice(1)).toEqual([
      { pullcache: 'lease', t: 'event', holder: '1.1', event: { type: 'progress', written: 90 } },
      {
        pullcache: 'lease',
        t: 'event',
        holder: '1.1',
        event: { type: 'committed', size: 100, kept: true },
      },
    ]);
    // Ended: the next ask holds it afresh.
    expect(leases.size).toBe(0);
    leases.receive(2, { pullcache: 'lease', t: 'acquire', digest, token: '2.2', scope });
    expect(to(2).at(-1)).toEqual({ pullcache: 'lease', t: 'granted', token: '2.2' });
  });

  test('a holder committing tells its followers, and a follower that comes later learns it', () => {
    const { leases, to } = table();
    leases.receive(1, { pullcache: 'lease', t: 'acquire', digest, token: '1.1', scope });
    leases.receive(2, { pullcache: 'lease', t: 'acquire', digest, token: '2.1', scope });
    leases.receive(1, { pullcache: 'lease', t: 'started', token: '1.1', upload: 'u1', size: 100 });
    leases.receive(1, { pullcache: 'lease', t: 'progress', token: '1.1', written: 100 });
    leases.receive(1, { pullcache: 'lease', t: 'committing', token: '1.1' });
    expect(to(2).at(-1)).toEqual({
      pullcache: 'lease',
      t: 'event',
      holder: '1.1',
      event: { type: 'committing' },
    });
    leases.receive(3, { pullcache: 'lease', t: 'acquire', digest, token: '3.1', scope });
    expect(to(3)).toEqual([
      held('3.1', { upload: 'u1', size: 100, written: 100, committing: true }),
    ]);
  });

  test('a watch (for a peer) follows the holder, and takes no lease when nobody holds one', () => {
    const { leases, to } = table();
    leases.receive(2, { pullcache: 'lease', t: 'watch', digest, token: '2.1' });
    expect(to(2)).toEqual([{ pullcache: 'lease', t: 'none', token: '2.1' }]);
    expect(leases.size).toBe(0);
    leases.receive(1, { pullcache: 'lease', t: 'acquire', digest, token: '1.1', scope });
    expect(to(1)).toEqual([{ pullcache: 'lease', t: 'granted', token: '1.1' }]);
    leases.receive(2, { pullcache: 'lease', t: 'watch', digest, token: '2.2' });
    expect(to(2).at(-1)).toMatchObject({ t: 'held', token: '2.2', holder: '1.1' });
    leases.receive(1, { pullcache: 'lease', t: 'failed', token: '1.1', reason: 'x' });
    expect(to(2).at(-1)).toMatchObject({ t: 'event', holder: '1.1', event: { type: 'failed' } });
  });

  test('a holder that exits fails its followers at once and frees the digest', () => {
    const { leases, to } = table();
    leases.receive(1, { pullcache: 'lease', t: 'acquire', digest, token: '1.1', scope });
    leases.receive(2, { pullcache: 'lease', t: 'acquire', digest, token: '2.1', scope });
    leases.receive(3, { pullcache: 'lease', t: 'acquire', digest, token: '3.1', scope });
    leases.workerGone(1);
    for (const follower of [2, 3])
      expect(to(follower).at(-1)).toMatchObject({
        t: 'event',
        holder: '1.1',
        event: { type: 'failed' },
      });
    leases.receive(3, { pullcache: 'lease', t: 'acquire', digest, token: '3.2', scope });
    expect(to(3).at(-1)).toEqual({ pullcache: 'lease', t: 'granted', token: '3.2' });
  });

  test("a take-over cuts the stalled holder's other followers, and what the stalled holder says next is ignored", () => {
    const { leases, to, sent } = table();
    leases.receive(1, { pullcache: 'lease', t: 'acquire', digest, token: '1.1', scope });
    leases.receive(2, { pullcache: 'lease', t: 'acquire', digest, token: '2.1', scope });
    leases.receive(3, { pullcache: 'lease', t: 'acquire', digest, token: '3.1', scope });
    leases.receive(2, {
      pullcache: 'lease',
      t: 'takeOver',
      digest,
      token: '2.2',
      stalled: '1.1',
      scope,
    });
    expect(to(3).at(-1)).toMatchObject({ t: 'event', holder: '1.1', event: { type: 'failed' } });
    expect(to(2).at(-1)).toEqual({ pullcache: 'lease', t: 'granted', token: '2.2' });
    const before = sent.length;
    leases.receive(1, { pullcache: 'lease', t: 'committed', token: '1.1', size: 5, kept: true });
    expect(sent).toHaveLength(before);
    // The taker holds it now: a new follower follows the taker.
    leases.receive(3, { pullcache: 'lease', t: 'acquire', digest, token: '3.2', scope });
    expect(to(3).at(-1)).toMatchObject({ t: 'held', holder: '2.2' });
  });

  test('two followers that take over one stalled holder: the second follows the first, which keeps its lease', () => {
    const { leases, to } = table();
    leases.receive(1, { pullcache: 'lease', t: 'acquire', digest, token: '1.1', scope });
    leases.receive(2, { pullcache: 'lease', t: 'acquire', digest, token: '2.1', scope });
    leases.receive(3, { pullcache: 'lease', t: 'acquire', digest, token: '3.1', scope });
    // Their idle timers fired together: both ask to take over the holder 1.1.
    leases.receive(2, {
      pullcache: 'lease',
      t: 'takeOver',
      digest,
      token: '2.2',
      stalled: '1.1',
      scope,
    });
    leases.receive(3, {
      pullcache: 'lease',
      t: 'takeOver',
      digest,
      token: '3.2',
      stalled: '1.1',
      scope,
    });
    expect(to(2).at(-1)).toEqual({ pullcache: 'lease', t: 'granted', token: '2.2' });
    expect(to(3).at(-1)).toMatchObject({ t: 'held', token: '3.2', holder: '2.2' });
    // The first taker's lease stands: its progress reaches the second.
    leases.receive(2, { pullcache: 'lease', t: 'progress', token: '2.2', written: 7 });
    expect(to(3).at(-1)).toMatchObject({ t: 'event', holder: '2.2', event: { written: 7 } });
    expect(to(2).filter((m) => m.t === 'event' && m.holder === '2.2')).toEqual([]);
  });

  test('a follower that stops watching is told nothing more', () => {
    const { leases, to } = table();
    leases.receive(1, { pullcache: 'lease', t: 'acquire', digest, token: '1.1', scope });
    leases.receive(2, { pullcache: 'lease', t: 'acquire', digest, token: '2.1', scope });
    leases.receive(2, { pullcache: 'lease', t: 'unwatch', token: '1.1' });
    leases.receive(1, { pullcache: 'lease', t: 'progress', token: '1.1', written: 10 });
    expect(to(2)).toHaveLength(1);
  });
});
