/**
 * A write to S3 (s3-driver.ts's `writer`): the bytes go to a local spool file, so that what is
 * written so far can be read back (S3 cannot read an unfinished upload), and to a multipart upload
 * of `partSize` parts as they fill, PART_CONCURRENCY at a time; `close` completes it (a write
 * smaller than one part is one PUT), `cancel` aborts it. Nothing is visible at the key before
 * `close`. A write with a final path (`completesAt`, the blob's own key: a fetch knows its
 * digest) uploads to that key, so that its commit is the completion, not a copy. A write held
 * back (`holdBack`: another replica is storing the same blob) fills only the spool file, and
 * `close` uploads it then, if it is called at all.
 *
 * S3 takes at most MAX_PARTS parts: with the size known (`expectSize`) the parts are
 * max(partSize, size / MAX_PARTS); with it unknown they double every tenth of MAX_PARTS, so
 * that the limit is never met below S3's largest object (5 TiB), and nothing changes for a
 * write of fewer than a thousand parts. A failure of the spool file (full, read-only) is a
 * SpoolError: unavailable, not the storage being full.
 */
import * as buffer from 'node:buffer';
import * as fs from 'node:fs/promises';
import type { Readable } from 'node:stream';
import {
  CompleteMultipartUploadCommand,
  CreateMultipartUploadCommand,
  UploadPartCommand,
  type CompletedPart,
  type S3Client,
} from '@aws-sdk/client-s3';
import type { FileWriter } from './types.js';
import { SpoolError, StorageUnavailableError } from './errors.js';

/** Parts of one write uploaded at once. */
const PART_CONCURRENCY = 2;

/** Parts S3 takes in one multipart upload. */
export const MAX_PARTS = 10_000;

/**
 * The largest part: S3 takes 5 GiB, a Buffer on Node 20 holds 4 GiB (the part is read from the
 * spool into one).
 */
export const MAX_PART_SIZE = Math.min(5 * 1024 ** 3, buffer.constants.MAX_LENGTH);

/** What a write needs of its driver (S3Driver). */
export interface WriteTarget {
  readonly client: S3Client;
  readonly bucket: string;
  readonly options: { partSize: number; maxParts?: number };
  /** Where spool files are (for a SpoolError's message). */
  readonly spoolDir: string;
  /** The object key of a path. */
  key(p: string): string;
  /** Sends a request, a failure of the store becoming a StorageUnavailableError. */
  send<T>(what: string, run: () => Promise<T>): Promise<T>;
  readRange(p: string, start: number): Promise<{ stream: Readable } | undefined>;
  putContent(p: string, content: Uint8Array): Promise<void>;
  abortUpload(key: string, uploadId: string): Promise<void>;
}

/** A write: a local spool file, and a multipart upload of it part by part as parts fill. */
export class S3Writer implements FileWriter {
  size = 0;
  uploadId: string | undefined;
  private handle: fs.FileHandle | undefined;
  private readonly parts: CompletedPart[] = [];
  /** Bytes handed to part uploads so far (from the spool's start). */
  private uploaded = 0;
  private readonly inflight = new Set<Promise<void>>();
  private failure: unknown;
  private closed = false;
  /** `cancel` was called: a spool operation failing from then on is not the directory's fault. */
  private cancelled = false;
  /** Parts are not uploaded as they fill, but by `close`. */
  private held = false;
  private readonly key: string;
  /** The part size while the write's size is not known; set from it by `expectSize`. */
  private basePartSize: number;
  private readonly maxParts: number;
  /** The number of the next part to start (parts are numbered in the order they start). */
  private nextPart = 1;
  private sized = false;

  constructor(
    private readonly driver: WriteTarget,
    private readonly p: string,
    readonly spoolPath: string,
    /** Where the upload goes and `close` completes it, when not at `p` (FileWriter). */
    readonly completesAt: string | undefined,
    private readonly done: () => void,
  ) {
    this.key = driver.key(completesAt ?? p);
    this.basePartSize = driver.options.partSize;
    this.maxParts = driver.options.maxParts ?? MAX_PARTS;
  }

  /**
   * Tells the write's whole size before its first part starts: the parts are made large enough
   * for it to fit in MAX_PARTS parts of one size.
   */
  expectSize(size: number): void {
    if (this.nextPart > 1) return;
    this.sized = true;
    const fit = Math.ceil(size / this.maxParts);
    // Whole MiB: some stores (R2) want every part but the last of one size, and round ones.
    const mib = 1024 * 1024;
    this.basePartSize = Math.min(
      MAX_PART_SIZE,
      Math.max(this.driver.options.partSize, Math.ceil(fit / mib) * mib),
    );
  }

  /** The size of part `number` (1-based). */
  private partSize(number: number): number {
    if (this.sized) return this.basePartSize;
    // Unknown size: twice as large every tenth of the limit (16 MiB parts: 16 GB in the first
    // thousand parts, past 5 TiB in all).
    const doublings = Math.floor((number - 1) / Math.max(1, Math.floor(this.maxParts / 10)));
    return Math.min(MAX_PART_SIZE, this.basePartSize * 2 ** doublings);
  }

  /** Runs a spool file operation; its failure is a SpoolError. */
  private async spool<T>(run: () => Promise<T>): Promise<T> {
    try {
      return await run();
    } catch (err) {
      // Cancelled under it (the spool file closed and removed): no fault of the directory's,
      // which must not be refused to every other write for it.
      if (this.cancelled)
        throw new StorageUnavailableError('storage is unavailable: the write was cancelled', err);
      const error = new SpoolError(this.driver.spoolDir, err);
      this.onSpoolFailure?.(error);
      throw error;
    }
  }

  /** Told of a failure of the spool file (the driver refuses new writes for a while). */
  onSpoolFailure: ((err: SpoolError) => void) | undefined;

  async open(append: boolean): Promise<void> {
    this.handle = await this.spool(() => fs.open(this.spoolPath, 'w+'));
    if (!append) return;
    try {
      // From the store itself: the spool of this key is the (new, empty) file just opened.
      const existing = await this.driver.readRange(this.p, 0);
      if (existing) for await (const chunk of existing.stream) await this.append(chunk as Buffer);
    } catch (err) {
      await this.discard();
      throw err;
    }
  }

  private async append(chunk: Uint8Array): Promise<void> {
    let offset = 0;
    while (offset < chunk.length) {
      const { bytesWritten } = await this.spool(() =>
        this.handle!.write(chunk, offset, chunk.length - offset, this.size + offset),
      );
      offset += bytesWritten;
    }
    this.size += chunk.length;
  }

  async write(chunk: Uint8Array): Promise<void> {
    await this.writev([chunk]);
  }

  async writev(chunks: readonly Uint8Array[]): Promise<void> {
    if (this.closed) throw new Error('write after close');
    if (this.failure) throw this.failure;
    for (const chunk of chunks) await this.append(chunk);
    await this.uploadFullParts();
  }

  holdBack(): void {
    this.held = true;
  }

  private async uploadFullParts(): Promise<void> {
    if (this.held) return;
    for (;;) {
      const partSize = this.partSize(this.nextPart);
      if (this.size - this.uploaded < partSize) return;
      // The last part S3 takes: it is the rest, at close.
      if (this.nextPart >= this.maxParts) return;
      // Backpressure: at most PART_CONCURRENCY parts in flight.
      while (this.inflight.size >= PART_CONCURRENCY) await Promise.race(this.inflight);
      if (this.failure) throw this.failure;
      // Once a write has crossed a part, its multipart upload exists (a purge can find it).
      if (!this.uploadId) await this.createUpload();
      this.startPart(this.uploaded, partSize);
      this.uploaded += partSize;
    }
  }

  private startPart(start: number, length: number): void {
    const number = this.nextPart++;
    const run = (async () => {
      this.uploadId ??= await this.createUpload();
      const body = Buffer.allocUnsafe(length);
      const { bytesRead } = await this.spool(() => this.handle!.read(body, 0, length, start));
      if (bytesRead !== length) throw new Error('spool file shorter than written');
      const uploadId = this.uploadId;
      const res = await this.driver.send('write', () =>
        this.driver.client.send(
          new UploadPartCommand({
            Bucket: this.driver.bucket,
            Key: this.key,
            UploadId: uploadId,
            PartNumber: number,
            Body: body,
          }),
        ),
      );
      this.parts.push({ PartNumber: number, ETag: res.ETag });
    })();
    const tracked = run.catch((err: unknown) => {
      this.failure ??= err;
    });
    this.inflight.add(tracked);
    void tracked.finally(() => this.inflight.delete(tracked));
  }

  private creating: Promise<string> | undefined;

  private createUpload(): Promise<string> {
    this.creating ??= this.driver
      .send('write', () =>
        this.driver.client.send(
          new CreateMultipartUploadCommand({ Bucket: this.driver.bucket, Key: this.key }),
        ),
      )
      .then((res) => {
        this.uploadId = res.UploadId!;
        return res.UploadId!;
      });
    return this.creating;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    try {
      this.held = false;
      await this.uploadFullParts();
      await Promise.all(this.inflight);
      if (this.failure) throw this.failure;
      if (this.parts.length === 0) {
        // Smaller than one part: a single PUT.
        const body = Buffer.allocUnsafe(this.size);
        if (this.size > 0) await this.spool(() => this.handle!.read(body, 0, this.size, 0));
        await this.driver.putContent(this.completesAt ?? this.p, body);
      } else {
        if (this.size > this.uploaded) {
          this.startPart(this.uploaded, this.size - this.uploaded);
          this.uploaded = this.size;
          await Promise.all(this.inflight);
          if (this.failure) throw this.failure;
        }
        const parts = [...this.parts].sort((a, b) => a.PartNumber! - b.PartNumber!);
        const uploadId = this.uploadId;
        await this.driver.send('write', () =>
          this.driver.client.send(
            new CompleteMultipartUploadCommand({
              Bucket: this.driver.bucket,
              Key: this.key,
              UploadId: uploadId,
              MultipartUpload: { Parts: parts },
            }),
          ),
        );
        this.uploadId = undefined;
      }
    } catch (err) {
      await this.abort();
      throw err;
    } finally {
      await this.discard();
    }
  }

  /**
   * Aborts the upload. One cancelled while its `close` completes it (a shutdown, a purge) may
   * be completed anyway: at a blob's own key that is after its commit verified it.
   */
  async cancel(): Promise<void> {
    if (this.closed && !this.handle) return;
    this.closed = true;
    this.cancelled = true;
    await Promise.all(this.inflight);
    await this.abort();
    await this.discard();
  }

  private async abort(): Promise<void> {
    await this.creating?.catch(() => {});
    if (!this.uploadId) return;
    const uploadId = this.uploadId;
    this.uploadId = undefined;
    await this.driver.abortUpload(this.key, uploadId).catch(() => {});
  }

  private async discard(): Promise<void> {
    this.done();
    const handle = this.handle;
    this.handle = undefined;
    await handle?.close().catch(() => {});
    await fs.rm(this.spoolPath, { force: true });
  }
}
