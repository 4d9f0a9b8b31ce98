/**
 * Which process manages a storage's lifecycle (evicts, collects, pins): one at a time, so that
 * two processes never evict at once. The owner keeps `lifecycle/owner.json` fresh; a record past
 * its expiry (a process killed without cleaning up) is taken over. A running server records its
 * URL there, so that the commands can use its admin API and its caches see every removal.
 */
import type { Logger } from '../log/logger.js';
import { hostname } from 'node:os';
import { paths } from '../storage/paths.js';
import { PathNotFoundError, type StorageDriver } from '../storage/types.js';
import type { Lease } from './lease.js';

export interface OwnerRecord {
  pid: number;
  host: string;
  /** The server's base URL; absent for a command. */
  url?: string;
  /** ms since epoch. */
  expiresAt: number;
}

/** How long a record stays valid without renewal. */
export const OWNER_TTL_MS = 30_000;

export async function readOwner(driver: StorageDriver): Promise<OwnerRecord | undefined> {
  try {
    const value = JSON.parse((await driver.getContent(paths.owner())).toString('utf8')) as unknown;
    if (typeof value !== 'object' || value === null) return undefined;
    const r = value as Partial<OwnerRecord>;
    if (typeof r.pid !== 'number' || typeof r.host !== 'string' || typeof r.expiresAt !== 'number')
      return undefined;
    return r as OwnerRecord;
  } catch (err) {
    if (err instanceof PathNotFoundError || err instanceof SyntaxError) return undefined;
    throw err;
  }
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

  private async tryAcquire(): Promise<boolean> {
    if (this.lease) return this.acquireLease(this.lease);
    const current = await readOwner(this.driver);
    if (current && current.pid === process.pid && current.host === hostname()) {
      await this.driver.putContent(paths.owner(), this.record());
      this.held = true;
      return true;
    }
    this.held = false;
    if (current && isLive(current)) return false;
    // Stale (its process died): remove it, then race any other taker for the fresh one.
    if (current) await this.driver.delete(paths.owner());
    this.held = await this.driver.createExclusive(paths.owner(), this.record());
    return this.held;
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

  /** The live owner, when it is another process. */
  async other(): Promise<OwnerRecord | undefined> {
    const current = await readOwner(this.driver);
    if (!current || !isLive(current)) return undefined;
    if (current.pid === process.pid && current.host === hostname()) return undefined;
    return current;
  }

  async release(): Promise<void> {
    if (!this.held) return;
    this.held = false;
    if (this.lease) await this.lease.release().catch(() => {});
    const current = await readOwner(this.driver).catch(() => undefined);
    if (current && current.pid === process.pid && current.host === hostname())
      await this.driver.delete(paths.owner());
  }
}
