/**
 * The S3 StorageDriver: every path is an object key (`prefix` + path) in one bucket of AWS S3 or
 * an S3-compatible store (Ceph RGW, MinIO, R2...). S3 has no directories, no appends, no
 * renames and no settable modification times; how each contract is kept here:
 *
 * - `writer` (s3-writer.ts): the bytes go to a local spool file (so that `reader` can give what
 *   is written so far to the followers of a fetch: S3 cannot read an unfinished upload) and to a
 *   multipart upload of `partSize` parts as they fill; `close` completes it (a write smaller than
 *   one part is one PUT). Until then nothing is visible at the key; `cancel` aborts it. Appending
 *   (a resumed upload session) reads the object back into the spool first. A new write with a
 *   `finalPath` (a fetched blob's own key) uploads there, so that its commit copies nothing.
 * - `reader`: the spool file of the key while there is one (a write of this process or of
 *   another on the host), else the object (s3-reads.ts); `readRange`, a blob read on the request
 *   path, is a presigned GET through undici (s3-reads.ts).
 * - `move`: a server-side copy, then a delete (`copy`, s3-uploads.ts: a multipart copy past
 *   5 GiB).
 * - `touch`: the time goes into the object's metadata (`x-amz-meta-pulled-at`) by a copy of the
 *   object onto itself, which replaces metadata only; `stat` reports it as the modification time.
 * - `createExclusive`: a PUT with `If-None-Match: *` (AWS since 2024, Ceph RGW, MinIO).
 * - `space`: undefined (no free space to read): `retention.minFree` does not apply.
 * - `stat` of a directory: undefined (only the root is one), so no LIST is ever on a request path.
 * - `abortIncomplete` (s3-uploads.ts): aborts the multipart uploads and removes the spool files
 *   that a process which died mid-write left.
 *
 * Failures of the store (refused, down, 5xx after the SDK's retries with backoff, 403) become a
 * StorageUnavailableError (503); a missing key is the contract's own PathNotFoundError/undefined
 * (s3-errors.ts).
 *
 * The driver extends its connection (s3-connection.ts): the client, the key of a path, `send`
 * (where those failures are translated) and the listing and deleting of keys are there.
 */
import { createHash } from 'node:crypto';
import { constants } from 'node:fs';
import * as fs from 'node:fs/promises';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import {
  CopyObjectCommand,
  GetObjectCommand,
  HeadBucketCommand,
  HeadObjectCommand,
  PutObjectCommand,
} from '@aws-sdk/client-s3';
import { getSignedUrl } from '@aws-sdk/s3-request-presigner';
import { FileRange } from './file-range.js';
import type { ObjectRange } from './object-range.js';
import { S3Connection, type S3ConnectionOptions } from './s3-connection.js';
import { isNotFound, isTooLarge, notFound, statusOf } from './s3-errors.js';
import { S3Reads } from './s3-reads.js';
import { S3Uploads, encodeKey } from './s3-uploads.js';
import { S3Writer } from './s3-writer.js';
import type { FileInfo, FileWriter, StorageDriver } from './types.js';
import { PathNotFoundError, StorageUnavailableError, SpoolError } from './errors.js';

/** The connection's options (s3-connection.ts), and how writes are made. */
export interface S3DriverOptions extends S3ConnectionOptions {
  partSize: number;
  /**
   * Parts one multipart upload may have: S3's 10,000 by default; a store configured with fewer
   * (RGW's `rgw_multipart_part_upload_limit`) needs its own.
   */
  maxParts?: number;
  /**
   * Where writes are spooled, one file per key: os.tmpdir()/pullcache-spool by default, shared
   * by the processes of a host, so that one worker can follow another's upload as it is written.
   */
  spoolDir?: string;
}

/** How long new writes are refused after the spool directory failed one (the Retry-After). */
const SPOOL_FAILURE_MS = 10_000;

export class S3Driver extends S3Connection<S3DriverOptions> implements StorageDriver {
  readonly name = 's3';
  /** Presigned URLs made (redirects), for the figures. */
  presigned = 0;
  readonly spoolDir: string;
  /**
   * The spool directory's last failure, while new writes are refused for it (a blob larger
   * than the room there would otherwise be fetched again and cut at the same point by every
   * client's retry).
   */
  private spoolFailure: { error: SpoolError; until: number } | undefined;
  /** Reads from the store: the SDK's GetObject, presigned GETs through undici. */
  private readonly reads: S3Reads;
  /** Server-side copies, stale multipart uploads and spool files. */
  private readonly uploads: S3Uploads;
  /** Writers open in this process, by path: their spool is what `reader` gives. */
  private readonly writing = new Map<string, S3Writer>();

  constructor(options: S3DriverOptions) {
    super(options);
    this.spoolDir = options.spoolDir ?? path.join(tmpdir(), 'pullcache-spool');
    this.reads = new S3Reads(this);
    this.uploads = new S3Uploads(this, this.spoolDir, this.writing);
  }

  async getContent(p: string): Promise<Buffer> {
    const key = this.key(p);
    // The body is read inside `send`: a connection cut in the middle of it is the store's
    // failure too.
    return this.send(
      'read',
      async () => {
        const res = await this.client.send(new GetObjectCommand({ Bucket: this.bucket, Key: key }));
        return Buffer.from(await res.Body!.transformToByteArray());
      },
      key,
    ).catch((err: unknown) => {
      throw notFound(err, p);
    });
  }

  async putContent(p: string, content: Uint8Array | string): Promise<void> {
    await this.send('write', () =>
      this.client.send(
        new PutObjectCommand({
          Bucket: this.bucket,
          Key: this.key(p),
          Body: typeof content === 'string' ? Buffer.from(content) : content,
        }),
      ),
    );
  }

  async reader(p: string, offset = 0, length?: number): Promise<FileRange | ObjectRange> {
    const open = this.writing.get(p);
    // Written here, or by another process of this host: what is in the spool so far.
    const spooled = await fs
      .open(open?.spoolPath ?? this.spoolPath(p), constants.O_RDONLY)
      .catch((err: unknown) => {
        if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
        if (open) throw new PathNotFoundError(p);
        return undefined;
      });
    if (spooled)
      return new FileRange(spooled, offset, length !== undefined ? offset + length : Infinity);
    return this.reads.objectReader(p, offset, length);
  }

  /** A presigned GET through undici (s3-reads.ts). */
  async readRange(
    p: string,
    start: number,
    end?: number,
  ): Promise<{ stream: ObjectRange; size: number } | undefined> {
    return this.reads.readRange(p, start, end);
  }

  /**
   * `size`, when known, sizes the parts (s3-writer.ts). Throws SpoolError when the spool
   * directory cannot take the write, or could not take one in the last SPOOL_FAILURE_MS.
   */
  async writer(
    p: string,
    append: boolean,
    options: { finalPath?: string; size?: number } = {},
  ): Promise<FileWriter> {
    const failure = this.spoolFailure;
    if (failure && failure.until > Date.now()) throw failure.error;
    await fs.mkdir(this.spoolDir, { recursive: true }).catch((err: unknown) => {
      throw this.spoolFailed(new SpoolError(this.spoolDir, err));
    });
    // A new write with a final path uploads to that key: completed there, nothing is copied.
    const finalPath = append ? undefined : options.finalPath;
    const writer = new S3Writer(this, p, this.spoolPath(p), finalPath, () => {
      if (this.writing.get(p) === writer) this.writing.delete(p);
    });
    if (options.size !== undefined) writer.expectSize(options.size);
    writer.onSpoolFailure = (err) => this.spoolFailed(err);
    await writer.open(append);
    this.writing.set(p, writer);
    return writer;
  }

  /** Refuses new writes for SPOOL_FAILURE_MS after the spool directory failed one. */
  private spoolFailed(error: SpoolError): SpoolError {
    this.spoolFailure = { error, until: Date.now() + SPOOL_FAILURE_MS };
    return error;
  }

  async stat(p: string): Promise<FileInfo | undefined> {
    if (p === '') {
      await this.send('reach the bucket', () =>
        this.client.send(new HeadBucketCommand({ Bucket: this.bucket })),
      ).catch((err: unknown) => {
        if (statusOf(err) !== 404) throw err;
        throw new StorageUnavailableError('storage is unavailable: no such bucket (HTTP 404)', err);
      });
      return { path: p, size: 0, modTime: new Date(), isDirectory: true };
    }
    const open = this.writing.get(p);
    if (open) return { path: p, size: open.size, modTime: new Date(), isDirectory: false };
    try {
      const head = await this.send('read', () =>
        this.client.send(new HeadObjectCommand({ Bucket: this.bucket, Key: this.key(p) })),
      );
      const pulled = Number(head.Metadata?.['pulled-at']);
      return {
        path: p,
        size: head.ContentLength ?? 0,
        modTime: Number.isFinite(pulled) && pulled > 0 ? new Date(pulled) : head.LastModified!,
        isDirectory: false,
      };
    } catch (err) {
      if (isNotFound(err)) return undefined;
      throw err;
    }
  }

  async list(p: string): Promise<string[]> {
    const prefix = this.dirKey(p);
    const names = new Set<string>();
    for await (const res of this.listPages(prefix, '/')) {
      for (const c of res.CommonPrefixes ?? [])
        if (c.Prefix) names.add(c.Prefix.slice(prefix.length, -1));
      for (const o of res.Contents ?? []) if (o.Key) names.add(o.Key.slice(prefix.length));
    }
    names.delete('');
    return [...names].sort();
  }

  async *walk(p: string): AsyncIterable<FileInfo> {
    for await (const o of this.walkKeys(p))
      yield {
        path: o.key.slice(this.prefix.length),
        size: o.size,
        modTime: o.modTime,
        isDirectory: false,
      };
  }

  async move(from: string, to: string): Promise<void> {
    await this.copy(from, to);
    await this.deleteKeys([this.key(from)]);
  }

  /** A server-side copy; part by part past S3's 5 GiB limit for one copy (s3-uploads.ts). */
  async copy(from: string, to: string, size?: number): Promise<void> {
    return this.uploads.copy(from, to, size);
  }

  async delete(p: string): Promise<void> {
    // Writes in progress under the path (an upload session being removed) are aborted first.
    for (const [open, writer] of this.writing)
      if (open === p || open.startsWith(`${p}/`)) await writer.cancel();
    const keys = [this.key(p)];
    for await (const { key } of this.walkKeys(p)) keys.push(key);
    await this.deleteKeys(keys);
  }

  async deleteFiles(ps: readonly string[]): Promise<void> {
    for (const p of ps) await this.writing.get(p)?.cancel();
    await this.deleteKeys(ps.map((p) => this.key(p)));
  }

  /** Nothing to do: S3 has no directories. */
  async deleteEmpty(): Promise<void> {}

  async touch(p: string, time: Date): Promise<void> {
    const source = `${this.bucket}/${encodeKey(this.key(p))}`;
    try {
      await this.send('record a pull', () =>
        this.client.send(
          new CopyObjectCommand({
            Bucket: this.bucket,
            Key: this.key(p),
            CopySource: source,
            MetadataDirective: 'REPLACE',
            Metadata: { 'pulled-at': String(time.getTime()) },
          }),
        ),
      );
    } catch (err) {
      if (isNotFound(err)) throw new PathNotFoundError(p);
      // Past 5 GiB a copy onto itself is refused: such an object keeps its write time.
      if (!isTooLarge(err)) throw err;
    }
  }

  async createExclusive(p: string, content: string): Promise<boolean> {
    try {
      await this.send('write', () =>
        this.client.send(
          new PutObjectCommand({
            Bucket: this.bucket,
            Key: this.key(p),
            Body: Buffer.from(content),
            IfNoneMatch: '*',
          }),
        ),
      );
      return true;
    } catch (err) {
      const status = statusOf(err);
      // 412: something is there; 409: another conditional write of the key is under way.
      if (status === 412 || status === 409) return false;
      throw err;
    }
  }

  async space(): Promise<undefined> {
    return undefined;
  }

  /**
   * Aborts the multipart uploads under a path started before `olderThan` (left by a process
   * that died mid-write), and the spool files it left; resolves to how many uploads
   * (s3-uploads.ts).
   */
  async abortIncomplete(under: readonly string[], olderThan: Date): Promise<number> {
    return this.uploads.abortIncomplete(under, olderThan);
  }

  /** Aborts a multipart upload; no error when it is gone already (s3-uploads.ts). */
  async abortUpload(key: string, uploadId: string): Promise<void> {
    return this.uploads.abortUpload(key, uploadId);
  }

  /** Throws StorageUnavailableError when it cannot be signed (no credentials to sign with). */
  async presignedUrl(p: string, ttlSeconds: number): Promise<string> {
    this.presigned++;
    const key = this.key(p);
    return this.send(
      'sign a URL',
      () =>
        getSignedUrl(this.client, new GetObjectCommand({ Bucket: this.bucket, Key: key }), {
          expiresIn: ttlSeconds,
        }),
      key,
    );
  }

  /** The spool file of a key: the same in every process of the host. */
  private spoolPath(p: string): string {
    const id = createHash('sha256')
      .update(`${this.bucket}/${this.key(p)}`)
      .digest('hex');
    return path.join(this.spoolDir, id);
  }

  /** Cancels this process's writes (their spool files go with them) and closes the client. */
  async close(): Promise<void> {
    for (const writer of [...this.writing.values()]) await writer.cancel().catch(() => {});
    this.client.destroy();
    await this.reads.close();
  }
}
