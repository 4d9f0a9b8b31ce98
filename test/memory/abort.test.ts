import { getEventListeners, once } from 'node:events';
import { createServer, connect, type AddressInfo, type Socket } from 'node:net';
import { describe, expect, test, vi } from 'vitest';
import { TimedOutError, unlessAborted, within } from '../../src/abort.js';

describe('unlessAborted', () => {
  test('leaves nothing on the signal once a wait settles, however many waits there were', async () => {
    const controller = new AbortController();
    for (let i = 0; i < 1000; i++) {
      expect(await unlessAborted(Promise.resolve(i), controller.signal)).toBe(i);
      await expect(
        unlessAborted(Promise.reject(new Error(`no ${i}`)), controller.signal),
      ).rejects.toThrow(`no ${i}`);
    }
    // Promise.race with a pending promise would hold 2000 reactions here (src/abort.ts).
    expect(getEventListeners(controller.signal, 'abort')).toHaveLength(0);
  });

  test('an abort rejects the waits under way with its reason, and later ones at once', async () => {
    const controller = new AbortController();
    const never = new Promise<void>(() => {});
    const waits = [
      unlessAborted(never, controller.signal),
      unlessAborted(never, controller.signal),
    ];
    controller.abort(new Error('client gone'));
    for (const wait of waits) await expect(wait).rejects.toThrow('client gone');
    await expect(unlessAborted(Promise.resolve(1), controller.signal)).rejects.toThrow(
      'client gone',
    );
  });

  test('a promise that fails after the abort is not an unhandled rejection', async () => {
    const unhandled: unknown[] = [];
    const onUnhandled = (reason: unknown) => unhandled.push(reason);
    process.on('unhandledRejection', onUnhandled);
    try {
      const controller = new AbortController();
      controller.abort(new Error('output failed'));
      const late = Promise.reject(new Error('already finalized'));
      await expect(unlessAborted(late, controller.signal)).rejects.toThrow('output failed');
      await new Promise((r) => setTimeout(r, 20));
      expect(unhandled).toEqual([]);
    } finally {
      process.off('unhandledRejection', onUnhandled);
    }
  });
});

describe('within', () => {
  test('an answer that came while the process could not run counts, though its timer is due first', async () => {
    // A connection on loopback: what one end writes is in the other's socket buffer at once,
    // whatever this process does next (as a Redis answer arrives while it cannot run).
    const server = createServer();
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    const accepted = once(server, 'connection') as Promise<[Socket]>;
    const client = connect((server.address() as AddressInfo).port, '127.0.0.1');
    const [peer] = await accepted;
    await once(client, 'connect');
    try {
      // From the check phase: next come the timers (the wait's, due by then), then the poll
      // phase that reads the answer, which arrived during the pause.
      const waited = await new Promise<{ wait: Promise<unknown> }>((started) =>
        setImmediate(() => {
          const wait = within(once(client, 'data'), 20, 'late');
          peer.write('answer');
          const until = Date.now() + 200;
          while (Date.now() < until); // the pause
          started({ wait });
        }),
      );
      await expect(waited.wait).resolves.toBeDefined();
    } finally {
      client.destroy();
      peer.destroy();
      server.close();
    }
  });

  test('leaves no timer behind once a wait settles, and times out one that does not', async () => {
    vi.useFakeTimers();
    try {
      for (let i = 0; i < 1000; i++) {
        expect(await within(Promise.resolve(i), 60_000, 'late')).toBe(i);
        await expect(within(Promise.reject(new Error(`no ${i}`)), 60_000, 'late')).rejects.toThrow(
          `no ${i}`,
        );
      }
      // A timer kept for the full minute after each wait would be 2000 here.
      expect(vi.getTimerCount()).toBe(0);
      const late = within(new Promise(() => {}), 20, 'no answer');
      vi.advanceTimersByTime(21);
      await expect(late).rejects.toBeInstanceOf(TimedOutError);
    } finally {
      vi.useRealTimers();
    }
  });
});
