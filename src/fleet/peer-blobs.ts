/**
 * What a replica's peer endpoint serves another replica: the blob it is fetching (followed from
 * byte 0, the last byte held until its digest is verified here too), else the blob as stored.
 * Never an upstream request: a peer asks only the replica its lease names.
 */
import type { Digest } from '../oci/digest.js';
import type { UpstreamFetch } from '../proxy/types.js';
import { RemoteBlobFetch } from '../proxy/remote-fetch.js';
import type { HeldFetch } from './types.js';
import type { WorkerLeases } from './worker-leases.js';
import type {
  BlobStore,
  ByteRange,
  OpenResult,
  RepositoryKey,
  StatResult,
} from '../storage/types.js';
import type { BlobService } from '../storage/services.js';
import { resolveRange } from '../storage/byte-range.js';

export class PeerBlobService implements BlobService {
  constructor(
    private readonly inflight: ReadonlyMap<Digest, UpstreamFetch>,
    private readonly blobs: BlobStore,
    /**
     * With `server.workers`, the peer's request may reach a worker other than the one fetching:
     * it follows that one, as it would for a client.
     */
    private readonly workers?: { leases: Pick<WorkerLeases, 'watch'>; idleTimeout: number },
  ) {}

  private active(digest: Digest): UpstreamFetch | undefined {
    const fetch = this.inflight.get(digest);
    return fetch && fetch.state !== 'failed' ? fetch : undefined;
  }

  async stat(_repo: RepositoryKey, digest: Digest): Promise<StatResult> {
    const fetch = this.active(digest);
    if (fetch?.size !== undefined) return { found: true, descriptor: { digest, size: fetch.size } };
    return this.blobs.stat(digest);
  }

  async open(repo: RepositoryKey, digest: Digest, range?: ByteRange): Promise<OpenResult> {
    const fetch = this.active(digest) ?? (await this.another(repo, digest));
    if (fetch) {
      try {
        await fetch.ready;
      } catch {
        return { found: false };
      }
      if (fetch.state !== 'failed' && fetch.size !== undefined) {
        const { start, end } = resolveRange(fetch.size, range);
        const stream = fetch.follow(start, end + 1);
        const descriptor = { digest, size: fetch.size };
        return range
          ? { found: true, descriptor, stream, range: { start, end }, fromUpstream: true }
          : { found: true, descriptor, stream, fromUpstream: true };
      }
      await fetch.done.catch(() => {});
    }
    return this.blobs.open(digest, range);
  }

  /** The fetch of another worker of this host, followed; undefined when none has it. */
  private async another(repo: RepositoryKey, digest: Digest): Promise<UpstreamFetch | undefined> {
    if (!this.workers) return undefined;
    let holder: HeldFetch | undefined;
    try {
      holder = await this.workers.leases.watch(digest);
    } catch {
      return undefined; // the primary is gone: storage answers
    }
    if (!holder) return undefined;
    return new RemoteBlobFetch({
      digest,
      repo,
      holder,
      blobs: this.blobs,
      idleTimeout: this.workers.idleTimeout,
    });
  }
}
