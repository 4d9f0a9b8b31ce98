/**
 * Leases on digests among the replicas, in Redis: one fetch per digest across hosts. Replicas
 * that share a Redis (`cache.store: redis`) and each `server.advertise` an address take a lease
 * on a cold digest here before they fetch it; the value names the holder's address, so the
 * others can follow its fetch (fleet/peers.ts).
 *
 * The lease is a key `SET NX PX` with a short lifetime, renewed while the fetch runs: a replica
 * that dies loses it within seconds, and the next request fetches afresh.
 */
import { randomUUID } from 'node:crypto';
import type { Logger } from '../log/logger.js';
import type { Digest } from '../oci/digest.js';
import { RELEASE, REPLACE, type LeaseRedis } from '../lifecycle/lease.js';

/** A lease's lifetime; renewed every third of it while the fetch runs. */
export const PEER_LEASE_TTL_MS = 5_000;

/**
 * Renews the key while it holds our value (1), and sets it again when it expired meanwhile (2:
 * Redis could not be asked for longer than its lifetime, and nobody else took it); 0 when
 * another replica holds it now.
 */
const KEEP = `local held = redis.call('get', KEYS[1])
if held == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
if not held then
  redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 2
end
return 0`;

/**
 * A claim's answer: held by this replica, or by `holder` (its address), fetching for `scope`
 * (`upstream/repository`; undefined from a replica that does not say).
 */
export type PeerClaim =
  { held: true; release(): void } | { held: false; holder: string; scope: string | undefined };

/** Leases on digests among the replicas, in Redis. */
export class PeerLeases {
  /** This process in a lease's value: its address, and a part no other process has. */
  private readonly self: string;

  constructor(
    private readonly o: {
      /** The process's lease connection (shared with the lifecycle's lease). */
      redis: LeaseRedis;
      /** This replica's address, `server.advertise`. */
      advertise: string;
      /** Prefix of the keys: one set of leases per storage. */
      prefix: string;
      log: Logger;
      ttlMs?: number;
    },
  ) {
    this.self = `${o.advertise} ${randomUUID()}`;
  }

  /**
   * Takes the lease on `digest` for a fetch for `scope` (`upstream/repository`), or names the
   * replica holding it and what it fetches for. Rejects when Redis fails.
   */
  async claim(digest: Digest, scope: string): Promise<PeerClaim> {
    // The value: this process (address and id), then the scope. Replicas before the scope was
    // kept wrote the first two only.
    const mine = `${this.self} ${scope}`;
    // A Redis that did not answer fails at once for a while (LeaseRedis), not after a timeout.
    return this.o.redis.run(async (redis) => {
      const key = `${this.o.prefix}${digest}`;
      const ttl = this.o.ttlMs ?? PEER_LEASE_TTL_MS;
      for (let attempt = 0; attempt < 3; attempt++) {
        if ((await redis.set(key, mine, { NX: true, PX: ttl })) === 'OK')
          return { held: true, release: this.keep(key, mine, ttl) };
        const value = await redis.get(key);
        if (value === null) continue; // expired or released meanwhile: ask again
        const [holder = '', id, ...rest] = value.split(' ');
        // Our own address from an earlier life of this replica: nobody is fetching it. Taken
        // over only if that is still the value (another replica may have taken it meanwhile).
        if (holder === this.o.advertise && `${holder} ${id}` !== this.self) {
          const args = { keys: [key], arguments: [value, mine, String(ttl)] };
          if ((await redis.eval(REPLACE, args)) === 'OK')
            return { held: true, release: this.keep(key, mine, ttl) };
          continue;
        }
        return { held: false, holder, scope: rest.length > 0 ? rest.join(' ') : undefined };
      }
      // A key that keeps coming and going: fetch rather than wait.
      return { held: true, release: () => {} };
    });
  }

  /**
   * Renews the lease every third of its lifetime; resolves to its release. Each through the
   * connection of the moment: one dropped meanwhile (LeaseRedis.run) is replaced, not kept. A
   * lease that expired while Redis could not be asked is taken again if it is free, so that the
   * replicas asked next follow this fetch rather than make another; one another replica took
   * meanwhile is left to it (both fetch; each keeps what it fetched, the same bytes).
   */
  private keep(key: string, value: string, ttl: number): () => void {
    const args = { keys: [key], arguments: [value, String(ttl)] };
    const timer = setInterval(() => {
      this.o.redis
        .run((redis) => redis.eval(KEEP, args))
        .then((kept) => {
          if (kept === 2) this.o.log.info({ key }, 'fetch lease had expired: taken again');
          else if (kept === 0) {
            clearInterval(timer);
            this.o.log.info({ key }, 'fetch lease had expired and another replica took it');
          }
        })
        .catch((err: Error) => {
          this.o.log.debug({ key, err: err.message }, 'fetch lease not renewed');
        });
    }, ttl / 3);
    timer.unref();
    let released = false;
    return () => {
      if (released) return;
      released = true;
      clearInterval(timer);
      this.o.redis
        .run((redis) => redis.eval(RELEASE, { keys: [key], arguments: [value] }))
        .catch(() => {});
    };
  }
}
