/**
 * The lifecycle's owner record (src/lifecycle/owner.ts), on both drivers: a record nobody can
 * read is taken over like a stale one, and two processes taking over the same stale record at
 * once never both own.
 */
import { createHash } from 'node:crypto';
import { hostname } from 'node:os';
import { describe, expect, test } from 'vitest';
import { Ownership, readOwner } from '../../src/lifecycle/owner.js';
import { paths } from '../../src/storage/paths.js';
import { DRIVERS, useStorage } from '../helpers/storage-drivers.js';

/** A record of a process that died without cleaning up: expired `ago` ms ago. */
const staleRecord = (ago: number, pid = process.pid) =>
  JSON.stringify({ pid, host: hostname(), expiresAt: Date.now() - ago });

describe.each(DRIVERS)('lifecycle owner on %s', (kind) => {
  const storage = useStorage(kind);

  test('a record that cannot be read (empty, torn, not a record) is taken over', async () => {
    const driver = storage.open();
    for (const content of ['', '{"pid":1', '{}', 'null', '[]', '\0\0\0\0']) {
      await driver.putContent(paths.owner(), content);
      const ownership = new Ownership(driver);
      expect(await ownership.acquire(), JSON.stringify(content)).toBe(true);
      expect(await readOwner(driver)).toMatchObject({ pid: process.pid, host: hostname() });
      // Renewed as its own; another process sees it as the live owner.
      expect(await ownership.acquire()).toBe(true);
      const other = new Ownership(storage.open());
      expect(await other.acquire()).toBe(false);
      expect(await other.other()).toMatchObject({ pid: process.pid });
      await ownership.release();
      expect(await readOwner(driver)).toBeUndefined();
    }
  });

  test('two processes taking over the same stale record at once: exactly one owns, every time', async () => {
    const driver = storage.open();
    for (let i = 0; i < (kind === 's3' ? 20 : 40); i++) {
      // A stale record (a killed owner's), or one nobody can read, different every round.
      await driver.putContent(paths.owner(), i % 4 === 3 ? '{"pid":' : staleRecord(1000 + i));
      const [a, b] = [new Ownership(storage.open()), new Ownership(storage.open())];
      const won = await Promise.all([a.acquire(), b.acquire()]);
      expect(won.filter(Boolean).length, `round ${i}: ${JSON.stringify(won)}`).toBe(1);
      // The record is the winner's, and the loser sees it as another live owner.
      const [winner, loser] = won[0] ? [a, b] : [b, a];
      expect(await loser.other()).toMatchObject({ pid: process.pid });
      expect(await winner.other()).toBeUndefined();
      // Asked again (the 10 s renewal), the same one owns.
      expect(await Promise.all([winner.acquire(), loser.acquire()])).toEqual([true, false]);
      // No claim is left behind.
      expect(await driver.list('lifecycle')).toEqual(['owner.json']);
      await winner.release();
    }
  });

  test('a claim left by a taker that died does not keep the record from being taken over', async () => {
    const driver = storage.open();
    const record = staleRecord(5000);
    await driver.putContent(paths.owner(), record);
    // A taker that claimed this record, then died before it wrote its own.
    const claim = `${paths.owner()}.takeover-${createHash('sha256').update(record).digest('hex')}-0`;
    expect(await driver.createExclusive(claim, staleRecord(1000, 999_999_999))).toBe(true);
    const ownership = new Ownership(storage.open());
    expect(await ownership.acquire()).toBe(true);
    expect(await readOwner(driver)).toMatchObject({ pid: process.pid });
    expect(await driver.stat(claim)).toBeUndefined();
    // A live taker's claim is respected: it is taking the record over now.
    await ownership.release();
    const next = staleRecord(6000);
    await driver.putContent(paths.owner(), next);
    const live = `${paths.owner()}.takeover-${createHash('sha256').update(next).digest('hex')}-0`;
    expect(
      await driver.createExclusive(
        live,
        JSON.stringify({ pid: process.pid, host: hostname(), expiresAt: Date.now() + 30_000 }),
      ),
    ).toBe(true);
    expect(await new Ownership(storage.open()).acquire()).toBe(false);
    expect((await driver.getContent(paths.owner())).toString()).toBe(next);
  });
});
