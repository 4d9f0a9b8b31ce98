/**
 * What is in use, and so never evicted or collected: a blob being served (counted per digest:
 * several clients may stream it at once) or fetched at that moment.
 */
import type { Digest } from '../oci/digest.js';

export class InUse {
  private readonly serving = new Map<Digest, number>();

  constructor(
    private readonly d: {
      /** True while a fetch of the digest is in flight. */
      fetching: (digest: Digest) => boolean;
      /** A blob is served no more, by anyone. */
      released: () => void;
    },
  ) {}

  /** A blob is being served: it is not evicted until the returned function is called. */
  serve(digest: Digest): () => void {
    this.serving.set(digest, (this.serving.get(digest) ?? 0) + 1);
    let released = false;
    return () => {
      if (released) return;
      released = true;
      const n = (this.serving.get(digest) ?? 1) - 1;
      if (n > 0) this.serving.set(digest, n);
      else {
        this.serving.delete(digest);
        this.d.released();
      }
    };
  }

  /** True while the blob is being served or fetched. */
  has(digest: Digest): boolean {
    return this.serving.has(digest) || this.d.fetching(digest);
  }
}
