/**
 * One fetch per digest across hosts: replicas that share a Redis (`cache.store: redis`) and each
 * `server.advertise` an address take a lease on a cold digest in Redis before they fetch it. The
 * one that gets it fetches from the upstream; every other replica asked for the digest meanwhile
 * streams it from that one's peer endpoint (`GET /_pullcache/v1/peer/blobs/<digest>`), from byte
 * 0 at once, and treats that stream as it treats an upstream: it checks the digest itself as the
 * bytes come (a peer sending corrupt bytes is caught), keeps the blob, and holds every client's
 * last byte until the check passed.
 *
 * This file holds the peer endpoint's path and request signature, and the blob source that
 * follows the replica holding a digest's lease; the leases in Redis are fleet/peer-leases.ts. A
 * peer that cannot be asked (gone, its fetch over and the blob not in its storage) is passed over
 * for the upstream, under the lease when it is free by then; one that failed mid-stream (stalled
 * past the idle timeout, corrupt, dead) is passed over for a while, so the retry of a client it
 * cut fetches from the upstream.
 *
 * Requests between replicas carry `Pullcache-Peer: <time>.<HMAC-SHA256(peerSecret, time digest)>`:
 * the secret itself never goes on the wire, and a signature is good for one digest for a minute.
 */
import { createHmac, timingSafeEqual } from 'node:crypto';
import { Readable } from 'node:stream';
import type { Logger } from '../log/logger.js';
import type { PeerCells } from '../metrics.js';
import { DigestVerifier, parseDigest, type Digest } from '../oci/digest.js';
import type { Repository } from '../oci/reference.js';
import type { RawBody } from '../upstream/raw-body.js';
import { RawAgent } from '../upstream/raw-get.js';
import type { RawResponse } from '../upstream/raw-connection.js';
import type { BlobRequestOptions, BlobStream, UpstreamClient } from '../upstream/types.js';
import { UpstreamNotFoundError } from '../upstream/errors.js';
import { COMMIT_WAIT_MS, fetchScope } from './types.js';
import type { PeerClaim, PeerLeases } from './peer-leases.js';

export const PEER_HEADER = 'pullcache-peer';
export const PEER_PATH = '/_pullcache/v1/peer/blobs/';
/** How long a signature is good for, either way of its time (clocks of a fleet drift a little). */
const SIGNATURE_WINDOW_MS = 60_000;
/** How long a digest whose peer failed mid-stream, or an unusable peer, is passed over. */
const AVOID_MS = 60_000;
/**
 * How long a peer may take to accept a connection. Replicas are on one network: a peer that has
 * not answered by then is gone or unreachable (a wrong `server.advertise`, a firewall), and each
 * cold blob should not wait the body's idle timeout on it.
 */
const PEER_CONNECT_MS = 3_000;
/** At most one warning this often that Redis cannot be asked for fetch leases. */
const LEASES_WARN_MS = 10_000;

/** The header value signing a request for `digest` at `now`. */
export function peerSignature(secret: string, digest: string, now = Date.now()): string {
  const mac = createHmac('sha256', secret).update(`${now} ${digest}`).digest('hex');
  return `${now}.${mac}`;
}

/** Whether `header` is a signature of `digest` with `secret`, made within the window. */
export function verifyPeerSignature(
  secret: string,
  digest: string,
  header: string | undefined,
  now = Date.now(),
): boolean {
  const m = /^(\d{1,16})\.([0-9a-f]{64})$/.exec(header ?? '');
  if (!m) return false;
  const time = Number(m[1]);
  if (Math.abs(now - time) > SIGNATURE_WINDOW_MS) return false;
  const expected = createHmac('sha256', secret).update(`${time} ${digest}`).digest();
  return timingSafeEqual(expected, Buffer.from(m[2]!, 'hex'));
}

/**
 * The peer could not be asked, or had nothing to give: the upstream is asked instead. `peerFault`:
 * the peer itself is wrong for every blob (it does not answer, or refuses this replica's
 * signature), not just done with this one.
 */
class PeerUnavailableError extends Error {
  constructor(
    message: string,
    readonly peerFault = false,
  ) {
    super(message);
  }
}

/**
 * The blob source of a fetch when replicas share leases: the upstream when this replica holds
 * the digest's lease (or Redis cannot be asked), else the replica that holds it.
 */
export class PeeredBlobSource implements Pick<UpstreamClient, 'getBlob'> {
  /** Digests whose peer failed a follower mid-stream: fetched from the upstream meanwhile. */
  private readonly avoid = new PassedOver();
  /** When the last warning that the leases cannot be asked was logged. */
  private leasesWarnedAt = -Infinity;
  /** Peers that did not answer or refused this replica: not dialled meanwhile. */
  private readonly avoidPeers = new PassedOver();
  /** Connections to peers, kept per peer. */
  private readonly raw: RawAgent;

  constructor(
    private readonly upstream: Pick<UpstreamClient, 'getBlob' | 'headBlob' | 'name'>,
    private readonly o: {
      leases: PeerLeases;
      secret: string;
      /** How long a peer may send nothing before it is given up (the upstream's bodyIdle). */
      idleTimeout: number;
      log: Logger;
      /** Where the bytes and results of following peers are counted. */
      cells?: PeerCells;
    },
  ) {
    const wait = o.idleTimeout;
    this.raw = new RawAgent({
      connect: Math.min(wait, PEER_CONNECT_MS),
      headers: wait,
      bodyIdle: wait,
      // The holder sends the last byte once its blob is stored: on S3 the completion of its
      // multipart upload, which for a layer of several GB can outlast bodyIdle.
      lastByteIdle: Math.max(wait, COMMIT_WAIT_MS),
    });
  }

  /** Closes the kept connections to peers (at shutdown). */
  close(): void {
    this.raw.close();
  }

  async getBlob(
    repository: Repository,
    digest: Digest,
    options: BlobRequestOptions = {},
  ): Promise<BlobStream> {
    const scope = fetchScope({ upstream: this.upstream.name, repository });
    let claim: PeerClaim | undefined;
    const asked = new Set<string>();
    // Asked twice at most: a holder that cannot give the blob (its fetch failed, for its own
    // repository) has most likely let the lease go by then, and this replica takes it; fetching
    // without it would leave the replicas asked next to fetch once more each.
    for (let ask = 0; ask < 2; ask++) {
      claim = this.avoid.has(digest) ? undefined : await this.claim(digest, scope);
      if (
        !claim ||
        claim.held ||
        asked.has(claim.holder) ||
        this.avoidPeers.has(claim.holder) ||
        !(await this.confirmed(claim, repository, digest))
      )
        break;
      const peer = claim.holder;
      asked.add(peer);
      try {
        return await this.fromPeer(peer, digest, options);
      } catch (err) {
        if (!(err instanceof PeerUnavailableError)) throw err;
        if (this.o.cells) this.o.cells.unavailable.value++;
        if (err.peerFault) {
          // Once per peer and minute: it is wrong for every blob until mended.
          this.avoidPeers.add(peer);
          this.o.log.warn(
            { digest, peer, err: err.message },
            'peer unusable: fetching from the upstream, and not asking it for a minute',
          );
        } else
          this.o.log.info(
            { digest, peer, err: err.message },
            'peer cannot give the blob: fetching from the upstream',
          );
      }
    }
    const release = claim?.held ? claim.release : () => {};
    let blob: BlobStream;
    try {
      blob = await this.upstream.getBlob(repository, digest, options);
    } catch (err) {
      release();
      throw err;
    }
    // Held until the blob is stored (or given up), else until the body is done: a replica
    // asking meanwhile follows this one rather than find the blob neither fetched nor stored.
    if (options.settled) options.settled.then(release, release);
    else blob.stream.once('close', release);
    return blob;
  }

  /** The digest's lease, or undefined when Redis cannot be asked (the upstream answers then). */
  private async claim(digest: Digest, scope: string): Promise<PeerClaim | undefined> {
    try {
      return await this.o.leases.claim(digest, scope);
    } catch (err) {
      // A warning at most every LEASES_WARN_MS: while Redis is away, every cold blob comes here.
      const now = Date.now();
      const warn = now - this.leasesWarnedAt >= LEASES_WARN_MS;
      if (warn) this.leasesWarnedAt = now;
      this.o.log[warn ? 'warn' : 'debug'](
        { digest, err: (err as Error).message },
        'fetch leases cannot be asked: fetching from the upstream alone',
      );
      return undefined;
    }
  }

  /**
   * Whether this repository may have the bytes of a peer that fetches them for `claim.scope`:
   * at once for the same repository, else once the upstream confirms (HEAD, with this
   * repository's scope) that this one has the blob too. A no is thrown (UpstreamNotFoundError:
   * the blob is not this repository's); an upstream that cannot be asked leaves it to the GET.
   */
  private async confirmed(
    claim: { scope: string | undefined },
    repository: Repository,
    digest: Digest,
  ): Promise<boolean> {
    if (claim.scope === fetchScope({ upstream: this.upstream.name, repository })) return true;
    try {
      await this.upstream.headBlob(repository, digest);
      return true;
    } catch (err) {
      if (err instanceof UpstreamNotFoundError) {
        this.o.log.info(
          { repository, digest },
          'blob of another repository not followed: the upstream did not confirm this one has it',
        );
        throw err;
      }
      return false;
    }
  }

  /**
   * The blob streamed from the replica fetching it, checked against its digest as it comes. On
   * the blob path's own sockets (upstream/raw-get.ts): the body is read into the fetch's slabs,
   * as an upstream's is, not into a new buffer per read.
   */
  private async fromPeer(
    peer: string,
    digest: Digest,
    options: BlobRequestOptions,
  ): Promise<BlobStream> {
    let url: URL;
    try {
      url = new URL(`${PEER_PATH}${digest}`, peer);
    } catch {
      throw new PeerUnavailableError(`its address ${JSON.stringify(peer)} is no URL`, true);
    }
    if (url.protocol !== 'http:' && url.protocol !== 'https:')
      throw new PeerUnavailableError(`its address ${JSON.stringify(peer)} is no URL`, true);
    let res: RawResponse;
    try {
      res = await this.raw.get(url, {
        headers: { [PEER_HEADER]: peerSignature(this.o.secret, digest) },
        signal: options.signal,
        slabs: options.slabs,
      });
    } catch (err) {
      if (options.signal?.aborted) throw err;
      // No connection (refused, none within the connect timeout, TLS not trusted): the peer is
      // unusable for now. Later errors (its headers late, while its own upstream is slow) are
      // about this blob only.
      throw new PeerUnavailableError((err as Error).message, !connectionMade(err));
    }
    if (res.statusCode !== 200) {
      res.body.resume();
      const refused = res.statusCode === 401 || res.statusCode === 403;
      throw new PeerUnavailableError(
        refused
          ? `it refused this replica (${res.statusCode}): server.peerSecret differs, or the clocks disagree by more than a minute`
          : `it answered ${res.statusCode}`,
        refused,
      );
    }
    const length = Number(res.headers['content-length']);
    const size = Number.isSafeInteger(length) ? length : undefined;
    this.o.log.info({ digest, peer }, 'following the fetch of another replica');
    return {
      size,
      fromPeer: true,
      // Each chunk as it was read, so the fetch can hand the slabs' views back (blob-get.ts).
      stream: Readable.from(this.peerChunks(peer, digest, size, res.body, options.signal), {
        objectMode: true,
        highWaterMark: 1,
      }),
    };
  }

  /** A peer's body, passed on as it comes; throws unless it ends whole with the right digest. */
  private async *peerChunks(
    peer: string,
    digest: Digest,
    size: number | undefined,
    body: RawBody,
    signal: AbortSignal | undefined,
  ): AsyncGenerator<Buffer> {
    const verifier = new DigestVerifier(parseDigest(digest));
    const cells = this.o.cells;
    let whole = false;
    try {
      // A consumer that stops early returns the body's generator too: the connection is cut.
      for await (const view of body.drain()) {
        verifier.update(view);
        if (cells) cells.bytes.value += view.length;
        yield view;
      }
      const end = body.ended!;
      try {
        if (end.kind === 'error') throw new Error(`the peer cut the blob: ${errorText(end.error)}`);
        if (size !== undefined && verifier.bytes !== size)
          throw new Error(`the peer sent ${verifier.bytes} of ${size} bytes`);
        verifier.verify();
        whole = true;
      } catch (err) {
        // Unless this replica gave the fetch up itself (no client left past the cache write
        // timeout): then the peer did nothing wrong.
        if (!signal?.aborted) {
          this.avoid.add(digest);
          this.o.log.warn(
            { digest, peer, err: (err as Error).message },
            'following a peer failed: the next request fetches from the upstream',
          );
        }
        throw err;
      }
    } finally {
      // Every follow that got the peer's answer ends whole or cut (also when this replica
      // stopped reading: its storage failed, or it gave the fetch up).
      if (cells) (whole ? cells.whole : cells.cut).value++;
    }
  }
}

/** Names (digests, peers) passed over for AVOID_MS from when they are added. */
class PassedOver {
  private readonly until = new Map<string, number>();

  add(name: string): void {
    const now = Date.now();
    if (this.until.size >= 1024)
      for (const [n, until] of this.until) if (until < now) this.until.delete(n);
    this.until.set(name, now + AVOID_MS);
  }

  has(name: string): boolean {
    const until = this.until.get(name);
    if (until === undefined) return false;
    if (until > Date.now()) return true;
    this.until.delete(name);
    return false;
  }
}

/** Whether a request failed after its connection was made (the peer answered, or began to). */
function connectionMade(err: unknown): boolean {
  const code = (err as { code?: unknown }).code;
  return (
    code === 'UND_ERR_HEADERS_TIMEOUT' ||
    code === 'UND_ERR_SOCKET' ||
    code === 'UND_ERR_BODY_TIMEOUT' ||
    code === 'HPE_INVALID' ||
    code === 'ECONNRESET' ||
    code === 'EPIPE'
  );
}

const errorText = (err: unknown) => (err instanceof Error ? err.message : String(err));
