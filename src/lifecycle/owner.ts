/**
 * Which process manages a storage's lifecycle (evicts, collects, pins): one at a time, so that
 * two processes never evict at once. The owner keeps `lifecycle/owner.json` fresh; a record past
 * its expiry (a process killed without cleaning up) is taken over, and so is one that cannot be
 * read (torn, emptied, hand-edited: every writer replaces the file whole, so such a record was
 * left by no live owner). A running server records its URL there, so that the commands can use
 * its admin API and its caches see every removal.
 *
 * Taking over is a compare-and-swap, so that two processes that found the same stale record
 * never both become owner: each must first create a claim named after that record's exact bytes
 * (`owner.json.takeover-<sha256>-<n>`, created only if absent: a link on a file system, a
 * conditional PUT on S3), and the one that does replaces the record only if it still holds those
 * bytes. A claim left by a taker that died is stale once it expires (its content is a record
 * like the owner's), and the next taker uses the next number: nothing is ever deleted that
 * another process may still be relying on.
 */
import { createHash, randomUUID } from 'node:crypto';
import type { Logger } from '../log/logger.js';
import { hostname } from 'node:os';
import { paths } from '../storage/paths.js';
import type { StorageDriver } from '../storage/types.js';
import { PathNotFoundError } from '../storage/errors.js';
import type { Lease } from './lease.js';

export interface OwnerRecord {
  pid: number;
  host: string;
  /** The server's base URL; absent for a command. */
  url?: string;
  /** ms since epoch. */
  expiresAt: number;
  /** Which Ownership of the process wrote it (absent in records of older versions). */
  id?: string;
}

/** How long a record stays valid without renewal. */
export const OWNER_TTL_MS = 30_000;

/** Claims for one stale record tried at most (each one past the first costs a dead taker). */
const MAX_CLAIMS = 64;

export async function readOwner(driver: StorageDriver): Promise<OwnerRecord | undefined> {
  const raw = await readRaw(driver, paths.owner());
  return raw === undefined ? undefined : parseOwner(raw);
}

/** The bytes at a path; undefined when nothing is there. */
async function readRaw(driver: StorageDriver, path: string): Promise<Buffer | undefined> {
  try {
    return await driver.getContent(path);
  } catch (err) {
    if (err instanceof PathNotFoundError) return undefined;
    throw err;
  }
}

/** A record read back; undefined when it is not one (empty, torn, not JSON, fields missing). */
function parseOwner(raw: Buffer): OwnerRecord | undefined {
  let value: unknown;
  try {
    value = JSON.parse(raw.toString('utf8'));
  } catch {
    return undefined;
  }
  if (typeof value !== 'object' || value === null) return undefined;
  const r = value as Partial<OwnerRecord>;
  if (typeof r.pid !== 'number' || typeof r.host !== 'string' || typeof r.expiresAt !== 'number')
    return undefined;
  return r as OwnerRecord;
}

/** True while the record is valid: not expired, and on this host its process is alive. */
export function isLive(record: OwnerRecord, now = Date.now()): boolean {
  if (record.expiresAt <= now) return false;
  if (record.host !== hostname()) return true;
  try {
    process.kill(record.pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

export class Ownership {
  private held = false;
  /** The lease could not be asked last time (told once, and once more when it can again). */
  private leaseAway = false;

  private url: string | undefined;
  /** Tells this instance's records from those of another in the same process (tests). */
  private readonly id = randomUUID();

  /**
   * With a `lease` (replicas on one storage, lease.ts), the lease decides who owns; the record in
   * storage still says where the owner answers, for the commands.
   */
  constructor(
    private readonly driver: StorageDriver,
    private readonly lease?: Lease,
    private readonly log?: Logger,
  ) {}

  /** Where this process's admin API answers, recorded for the commands. */
  setUrl(url: string): void {
    this.url = url;
  }

  get isOwner(): boolean {
    return this.held;
  }

  private record(): string {
    const r: OwnerRecord = {
      pid: process.pid,
      host: hostname(),
      expiresAt: Date.now() + OWNER_TTL_MS,
      id: this.id,
    };
    if (this.url) r.url = this.url;
    return JSON.stringify(r);
  }

  /**
   * Takes ownership when nobody live has it; renews it when held. Resolves to whether held. On a
   * full disk the record cannot be written: ownership is then kept (or taken, when nobody live
   * has it) in memory, since the owner's eviction is what frees the disk.
   */
  async acquire(): Promise<boolean> {
    try {
      return await this.tryAcquire();
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOSPC') throw err;
      this.held = this.held || (await this.other()) === undefined;
      return this.held;
    }
  }

  private mine(record: OwnerRecord): boolean {
    return record.pid === process.pid && record.host === hostname() && record.id === this.id;
  }

  private async tryAcquire(): Promise<boolean> {
    if (this.lease) return this.acquireLease(this.lease);
    const raw = await readRaw(this.driver, paths.owner());
    const current = raw === undefined ? undefined : parseOwner(raw);
    if (current && this.mine(current)) {
      await this.driver.putContent(paths.owner(), this.record());
      this.held = true;
      return true;
    }
    this.held = false;
    if (current && isLive(current)) return false;
    if (raw === undefined) {
      // Nobody's: the first to create the record owns.
      this.held = await this.driver.createExclusive(paths.owner(), this.record());
      return this.held;
    }
    if (!current)
      this.log?.warn(
        { content: raw.subarray(0, 200).toString('utf8') },
        'the lifecycle owner record cannot be read: taken over as stale',
      );
    this.held = await this.takeOver(raw);
    return this.held;
  }

  /**
   * Replaces a stale (or unreadable) record whose bytes are `stale` with this process's, if no
   * other process does it first: see the comment at the top. Resolves to whether it did.
   */
  private async takeOver(stale: Buffer): Promise<boolean> {
    const base = `${paths.owner()}.takeover-${createHash('sha256').update(stale).digest('hex')}`;
    for (let n = 0; n < MAX_CLAIMS; n++) {
      const claim = `${base}-${n}`;
      if (await this.driver.createExclusive(claim, this.record())) {
        const now = await readRaw(this.driver, paths.owner());
        if (!now?.equals(stale)) {
          // Taken over, renewed or released meanwhile: nothing of that record is left to take.
          await this.driver.deleteFiles([claim]);
          return false;
        }
        await this.driver.putContent(paths.owner(), this.record());
        // Every claim on that record goes now: a taker that read it late and claims again finds
        // the record changed.
        await this.driver.deleteFiles(Array.from({ length: n + 1 }, (_, i) => `${base}-${i}`));
        return true;
      }
      const held = await readRaw(this.driver, claim);
      // Gone: its taker is done (the record is its own now, or it found it changed).
      if (held === undefined) return false;
      const claimant = parseOwner(held);
      // Another process is taking it over now; else that taker died, and the next claim is free.
      if (claimant && isLive(claimant)) return false;
    }
    this.log?.error(
      { claims: MAX_CLAIMS },
      'the lifecycle owner record cannot be taken over: every claim on it is left by a dead process',
    );
    return false;
  }

  private async acquireLease(lease: Lease): Promise<boolean> {
    try {
      this.held = await lease.acquire(OWNER_TTL_MS);
      if (this.leaseAway) this.log?.info('the lifecycle lease can be asked again');
      this.leaseAway = false;
    } catch (err) {
      // Redis cannot be asked: nobody can be sure to own, so nobody evicts meanwhile (the
      // metadata cache reports Redis as degraded); serving and the scan go on.
      if (!this.leaseAway)
        this.log?.warn(
          { err: (err as Error).message },
          'the lifecycle lease cannot be asked: no replica evicts or collects until it can',
        );
      this.leaseAway = true;
      this.held = false;
    }
    if (this.held) await this.driver.putContent(paths.owner(), this.record());
    return this.held;
  }

  /** The live owner, when it is another process (or another instance in this one). */
  async other(): Promise<OwnerRecord | undefined> {
    const current = await readOwner(this.driver);
    if (!current || !isLive(current)) return undefined;
    if (this.mine(current)) return undefined;
    return current;
  }

  async release(): Promise<void> {
    if (!this.held) return;
    this.held = false;
    if (this.lease) await this.lease.release().catch(() => {});
    const current = await readOwner(this.driver).catch(() => undefined);
    if (current && this.mine(current)) await this.driver.delete(paths.owner());
  }
}
