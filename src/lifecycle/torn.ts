/**
 * Blobs torn short by a power loss (docs/design.md, "Crash safety"): the filesystem driver does
 * not flush blob data, and a blob's file can be left short at its name, served to every pull. The
 * count of storage (scan.ts) names the blobs stored with another size than a manifest gives them;
 * here each is read and hashed (with its digest's own algorithm), and removed through Removal
 * when its bytes are not its digest's (the next pull fetches it again). A manifest may also give
 * a good blob a wrong size: such a blob is found whole, and not hashed again at the next counts.
 *
 * Only the serving process that owns the storage's upkeep does it (`enable`, and the owner
 * record or lease: owner.ts), as only the owner evicts: a command (`ls`, `du`, `gc --dry-run`)
 * or another worker counts storage too, and never removes what it finds. It runs after the count,
 * outside the lifecycle's chain of work (a hash reads the whole blob: on S3, a download, which
 * evictions must not wait for), one blob at a time.
 */
import type { Readable } from 'node:stream';
import type { Logger } from '../log/logger.js';
import { DigestVerifier, parseDigest, type Digest } from '../oci/digest.js';
import type { BlobStore } from '../storage/types.js';
import type { Removal } from './removal.js';
import type { Suspect } from './scan.js';

export class TornBlobs {
  /** Whether this process serves (`Lifecycle.start`): a command never removes. */
  private enabled = false;
  /**
   * Blobs hashed whole at a size a manifest does not give them: digest -> that size. Only those
   * the last count found (a count names every suspect): one evicted, or whose manifest went, is
   * hashed again if it is ever suspected again, rather than kept here for ever.
   */
  private whole = new Map<Digest, number>();
  /** Suspects of the last count not checked yet (a later count's replace them). */
  private waiting: Suspect[] = [];
  private running: Promise<void> | undefined;
  /** The blob being hashed now: its stream is destroyed by `close`. */
  private reading: Readable | undefined;

  /** `isOwner`: whether this process owns the storage's upkeep now (owner.ts). */
  constructor(
    private readonly blobs: BlobStore,
    private readonly removal: Removal,
    private readonly isOwner: () => boolean,
    private readonly log: Logger,
  ) {}

  /** This process serves: as long as it owns the storage, it checks what its counts find. */
  enable(): void {
    this.enabled = true;
  }

  /** Checks nothing more (the process is closing): a hash under way stops; resolves after it. */
  async close(): Promise<void> {
    this.enabled = false;
    this.waiting = [];
    this.reading?.destroy();
    await this.idle();
  }

  /** A count found these (scan.ts): checked in the background, when this process removes. */
  found(suspects: Suspect[]): void {
    if (!this.enabled || !this.isOwner()) return;
    const whole = new Map<Digest, number>();
    for (const { digest } of suspects) {
      const size = this.whole.get(digest);
      if (size !== undefined) whole.set(digest, size);
    }
    this.whole = whole;
    this.waiting = suspects.filter(({ digest, size }) => whole.get(digest) !== size);
    this.next();
  }

  /** Resolves once the suspects found so far are checked. */
  async idle(): Promise<void> {
    while (this.running) await this.running;
  }

  private next(): void {
    if (this.running || this.waiting.length === 0) return;
    this.running = this.run().finally(() => {
      this.running = undefined;
      this.next();
    });
  }

  private async run(): Promise<void> {
    for (let suspect = this.waiting.shift(); suspect; suspect = this.waiting.shift()) {
      // Another process took the storage over meanwhile: it checks them at its own counts.
      if (!this.enabled || !this.isOwner()) {
        this.waiting = [];
        return;
      }
      try {
        await this.check(suspect);
      } catch (err) {
        if (this.enabled)
          this.log.warn(
            { digest: suspect.digest, err: (err as Error).message ?? String(err) },
            'a stored blob of another size than its manifest gives could not be checked',
          );
      }
    }
  }

  /** Hashes the blob; removes it when its bytes are not its digest's. */
  private async check({ digest, expected }: Suspect): Promise<void> {
    const opened = await this.blobs.open(digest);
    if (!opened.found) return;
    const verifier = new DigestVerifier(parseDigest(digest));
    this.reading = opened.stream;
    try {
      for await (const chunk of opened.stream) verifier.update(chunk as Buffer);
    } finally {
      this.reading = undefined;
    }
    const hashed = opened.descriptor.size;
    if (verifier.matches()) {
      this.whole.set(digest, hashed);
      return;
    }
    // A hash may take long (on S3, a download): the storage may have another owner by now, or
    // this process be closing.
    if (!this.enabled || !this.isOwner()) return;
    // Not while it is served or fetched, nor once a fetch replaced it whole: the next count
    // finds it again if it is still torn then.
    if (!(await this.removal.removeTorn(digest, hashed))) return;
    this.log.warn(
      { digest, bytes: hashed, manifestSays: expected },
      'a stored blob does not match its digest (torn by a crash?): removed',
    );
  }
}
