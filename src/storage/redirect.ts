/**
 * Redirect mode (`storage.s3.redirect`): a stored blob that the repository holds is answered
 * with a presigned URL of its object, so clients download it from the object store and
 * pullcache's own bandwidth stays for misses. Misses, and blobs the repository does not hold,
 * are served as always.
 */
import type { Digest } from '../oci/digest.js';
import { paths } from './paths.js';
import type { ByteRange, OpenResult, RepositoryKey, StatResult, StorageDriver } from './types.js';
import type { BlobService } from './services.js';

export class RedirectingBlobService implements BlobService {
  constructor(
    private readonly inner: BlobService,
    /** Blobs as stored and held by each repository (no upstream behind it). */
    private readonly local: BlobService,
    private readonly driver: StorageDriver,
    private readonly ttlSeconds: number,
  ) {
    if (!driver.presignedUrl) throw new Error(`the ${driver.name} driver cannot redirect`);
  }

  stat(repo: RepositoryKey, digest: Digest): Promise<StatResult> {
    return this.inner.stat(repo, digest);
  }

  open(repo: RepositoryKey, digest: Digest, range?: ByteRange): Promise<OpenResult> {
    return this.inner.open(repo, digest, range);
  }

  async locate(repo: RepositoryKey, digest: Digest): Promise<string | undefined> {
    // The repository's own answer, as for serving: its link (usually from memory), never the
    // mere presence of the bytes.
    const held = await this.local.stat(repo, digest);
    if (!held.found) return undefined;
    return this.driver.presignedUrl!(paths.blobData(digest), this.ttlSeconds);
  }
}
