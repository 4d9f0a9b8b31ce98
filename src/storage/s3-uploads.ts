/**
 * The S3 driver's multipart-upload housekeeping (s3-driver.ts's `copy`, `abortIncomplete` and
 * `abortUpload`; the writes themselves are s3-writer.ts): a server-side copy, part by part
 * (UploadPartCopy) past S3's 5 GiB limit for one CopyObject, and the purge of what a process that
 * died mid-write left behind: its multipart uploads, invisible at their keys until aborted, and
 * its spool files. A write open in this process is never taken for one of those.
 */
import * as fs from 'node:fs/promises';
import * as path from 'node:path';
import {
  AbortMultipartUploadCommand,
  CompleteMultipartUploadCommand,
  CopyObjectCommand,
  CreateMultipartUploadCommand,
  ListMultipartUploadsCommand,
  UploadPartCopyCommand,
  type CompletedPart,
  type S3Client,
} from '@aws-sdk/client-s3';
import { isNoSuchUpload, isNotFound, isTooLarge } from './s3-errors.js';
import type { FileInfo } from './types.js';
import { PathNotFoundError } from './errors.js';

/** S3's limit for one CopyObject; larger objects are copied part by part. */
const COPY_MAX = 5 * 1024 ** 3;

/** What the multipart-upload housekeeping needs of its driver (S3Driver). */
export interface UploadTarget {
  readonly client: S3Client;
  readonly bucket: string;
  readonly options: { partSize: number };
  /** The object key of a path. */
  key(p: string): string;
  /** The key prefix of a directory. */
  dirKey(p: string): string;
  /** Sends a request, a failure of the store becoming a StorageUnavailableError. */
  send<T>(what: string, run: () => Promise<T>): Promise<T>;
  stat(p: string): Promise<FileInfo | undefined>;
}

/** A write open in this process (S3Writer): its upload and its spool file are not stale. */
interface OpenWrite {
  readonly uploadId: string | undefined;
  readonly spoolPath: string;
}

/** Server-side copies and the multipart uploads and spool files that writes leave. */
export class S3Uploads {
  constructor(
    private readonly driver: UploadTarget,
    /** Where writes are spooled, one file per key (S3DriverOptions.spoolDir). */
    private readonly spoolDir: string,
    /** The writes open in this process, by path: the driver's own map, as it changes. */
    private readonly writing: ReadonlyMap<string, OpenWrite>,
  ) {}

  /** A server-side copy; part by part past S3's 5 GiB limit for one copy. */
  async copy(from: string, to: string, size?: number): Promise<void> {
    const source = `${this.driver.bucket}/${encodeKey(this.driver.key(from))}`;
    if (size === undefined || size <= COPY_MAX) {
      try {
        await this.driver.send('copy', () =>
          this.driver.client.send(
            new CopyObjectCommand({
              Bucket: this.driver.bucket,
              Key: this.driver.key(to),
              CopySource: source,
            }),
          ),
        );
        return;
      } catch (err) {
        if (isNotFound(err)) throw new PathNotFoundError(from);
        if (size !== undefined || !isTooLarge(err)) throw err;
        const info = await this.driver.stat(from);
        if (!info) throw new PathNotFoundError(from);
        size = info.size;
      }
    }
    const partSize = Math.max(this.driver.options.partSize, 512 * 1024 ** 2);
    const { UploadId } = await this.driver.send('write', () =>
      this.driver.client.send(
        new CreateMultipartUploadCommand({ Bucket: this.driver.bucket, Key: this.driver.key(to) }),
      ),
    );
    try {
      const parts: CompletedPart[] = [];
      for (let start = 0, n = 1; start < size; start += partSize, n++) {
        const end = Math.min(start + partSize, size) - 1;
        const res = await this.driver.send('copy', () =>
          this.driver.client.send(
            new UploadPartCopyCommand({
              Bucket: this.driver.bucket,
              Key: this.driver.key(to),
              UploadId,
              PartNumber: n,
              CopySource: source,
              CopySourceRange: `bytes=${start}-${end}`,
            }),
          ),
        );
        parts.push({ PartNumber: n, ETag: res.CopyPartResult?.ETag });
      }
      await this.driver.send('write', () =>
        this.driver.client.send(
          new CompleteMultipartUploadCommand({
            Bucket: this.driver.bucket,
            Key: this.driver.key(to),
            UploadId,
            MultipartUpload: { Parts: parts },
          }),
        ),
      );
    } catch (err) {
      await this.abortUpload(this.driver.key(to), UploadId!).catch(() => {});
      throw err;
    }
  }

  /**
   * Aborts the multipart uploads under a path started before `olderThan` (left by a process
   * that died mid-write); resolves to how many.
   */
  async abortIncomplete(under: readonly string[], olderThan: Date): Promise<number> {
    await this.purgeSpool(olderThan);
    let aborted = 0;
    for (const p of under) aborted += await this.abortIncompleteUnder(p, olderThan);
    return aborted;
  }

  private async abortIncompleteUnder(p: string, olderThan: Date): Promise<number> {
    const prefix = this.driver.dirKey(p);
    let aborted = 0;
    let keyMarker: string | undefined;
    let idMarker: string | undefined;
    for (;;) {
      const res = await this.driver.send('list uploads', () =>
        this.driver.client.send(
          new ListMultipartUploadsCommand({
            Bucket: this.driver.bucket,
            Prefix: prefix,
            ...(keyMarker ? { KeyMarker: keyMarker, UploadIdMarker: idMarker } : {}),
          }),
        ),
      );
      for (const upload of res.Uploads ?? []) {
        if (!upload.Key || !upload.UploadId) continue;
        if (upload.Initiated && upload.Initiated.getTime() >= olderThan.getTime()) continue;
        if ([...this.writing.values()].some((w) => w.uploadId === upload.UploadId)) continue;
        await this.abortUpload(upload.Key, upload.UploadId);
        aborted++;
      }
      if (!res.IsTruncated) return aborted;
      keyMarker = res.NextKeyMarker;
      idMarker = res.NextUploadIdMarker;
    }
  }

  /** Spool files a killed process left, untouched since `olderThan` (never one being written). */
  private async purgeSpool(olderThan: Date): Promise<void> {
    const mine = new Set([...this.writing.values()].map((w) => w.spoolPath));
    for (const name of await fs.readdir(this.spoolDir).catch(() => [] as string[])) {
      const file = path.join(this.spoolDir, name);
      if (mine.has(file)) continue;
      const info = await fs.stat(file).catch(() => undefined);
      if (info && info.mtimeMs < olderThan.getTime()) await fs.rm(file, { force: true });
    }
  }

  /** Aborts a multipart upload; no error when it is gone already. */
  async abortUpload(key: string, uploadId: string): Promise<void> {
    try {
      await this.driver.send('abort an upload', () =>
        this.driver.client.send(
          new AbortMultipartUploadCommand({
            Bucket: this.driver.bucket,
            Key: key,
            UploadId: uploadId,
          }),
        ),
      );
    } catch (err) {
      if (!isNotFound(err) && !isNoSuchUpload(err)) throw err;
    }
  }
}

/** A key in a CopySource: each segment URL-encoded, the slashes kept. */
export function encodeKey(key: string): string {
  return key.split('/').map(encodeURIComponent).join('/');
}
