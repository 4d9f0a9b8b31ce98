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
 */
import { createHash } from 'node:crypto';
import { constants } from 'node:fs';
import * as fs from 'node:fs/promises';
import { Agent } from 'node:https';
import { Agent as HttpAgent } from 'node:http';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import {
  CopyObjectCommand,
  DeleteObjectsCommand,
  GetObjectCommand,
  HeadBucketCommand,
  HeadObjectCommand,
  ListObjectsV2Command,
  PutObjectCommand,
  S3Client,
  type S3ClientConfig,
} from '@aws-sdk/client-s3';
import { getSignedUrl } from '@aws-sdk/s3-request-presigner';
import { FileRange } from './file-range.js';
import type { ObjectRange } from './object-range.js';
import { isNotFound, isTooLarge, notFound, statusOf, unavailable } from './s3-errors.js';
import { S3Reads } from './s3-reads.js';
import { S3Uploads, encodeKey } from './s3-uploads.js';
import { S3Writer } from './s3-writer.js';
import {
  PathNotFoundError,
  StorageUnavailableError,
  SpoolError,
  type FileInfo,
  type FileWriter,
  type StorageDriver,
} from './types.js';

export interface S3DriverOptions {
  bucket: string;
  region: string;
  /** Empty: AWS. */
  endpoint?: string;
  forcePathStyle?: boolean;
  /** "" or ending in "/". */
  prefix?: string;
  /**
   * Explicit keys (or a provider of them, which may say when they expire); without them the
   * AWS default chain.
   */
  credentials?: S3ClientConfig['credentials'];
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
  /** Attempts per request (the SDK's standard retry mode, with backoff); 3 by default. */
  maxAttempts?: number;
  /** How long a request may go without a byte from the store (ms); 60 s by default. */
  requestTimeout?: number;
}

/** How long new writes are refused after the spool directory failed one (the Retry-After). */
const SPOOL_FAILURE_MS = 10_000;

/** Keys a DeleteObjects takes at once. */
const DELETE_BATCH = 1000;

export class S3Driver implements StorageDriver {
  readonly name = 's3';
  readonly client: S3Client;
  readonly bucket: string;
  /** Presigned URLs made (redirects), for the figures. */
  presigned = 0;
  /** S3 requests sent, by command (each retry too): for the cost figures. */
  readonly requests = new Map<string, number>();
  private readonly prefix: string;
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

  constructor(readonly options: S3DriverOptions) {
    this.bucket = options.bucket;
    this.prefix = options.prefix ?? '';
    this.spoolDir = options.spoolDir ?? path.join(tmpdir(), 'pullcache-spool');
    // The SDK warns on Node 20 that its releases from 2027 need Node 22: package.json pins a
    // release that runs on Node 20, so the warning says nothing a user of pullcache can act on.
    process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= 'true';
    const agent = { keepAlive: true, maxSockets: 256 };
    this.client = new S3Client({
      region: options.region,
      ...(options.endpoint ? { endpoint: options.endpoint } : {}),
      forcePathStyle: options.forcePathStyle ?? false,
      ...(options.credentials ? { credentials: options.credentials } : {}),
      maxAttempts: options.maxAttempts ?? 3,
      // Checksums only where S3 requires them: RGW 16 and other servers reject the trailers
      // that newer SDKs add by default, and every blob is verified by its digest anyway.
      requestChecksumCalculation: 'WHEN_REQUIRED',
      responseChecksumValidation: 'WHEN_REQUIRED',
      // The SDK's own Node handler, with these options.
      requestHandler: {
        connectionTimeout: 5000,
        // Inactivity, before the answer and while its body streams (a whole-request limit
        // would cut a long download; this SDK only warns about one by default).
        socketTimeout: options.requestTimeout ?? 60_000,
        httpAgent: new HttpAgent(agent),
        httpsAgent: new Agent(agent),
      },
    });
    this.client.middlewareStack.add(
      (next, context) => (args) => {
        const name = context.commandName ?? 'unknown';
        this.requests.set(name, (this.requests.get(name) ?? 0) + 1);
        return next(args);
      },
      // At the step where a request goes out: every attempt counts, a presigned URL does not.
      { step: 'deserialize', name: 'pullcacheRequestCount' },
    );
    this.reads = new S3Reads(this);
    this.uploads = new S3Uploads(this, this.spoolDir, this.writing);
  }

  /** Requests sent so far, all commands together. */
  get requestCount(): number {
    let n = 0;
    for (const v of this.requests.values()) n += v;
    return n;
  }

  key(p: string): string {
    if (p.split('/').some((part) => part === '..' || part === '.') || p.includes('\0'))
      throw new Error(`invalid storage path ${JSON.stringify(p)}`);
    return this.prefix + p;
  }

  /** A directory's key prefix ("a/b/"; the bucket prefix itself for the root). */
  dirKey(p: string): string {
    return p === '' ? this.prefix : `${this.key(p)}/`;
  }

  /** Runs `run`, a failure of the store becoming a StorageUnavailableError naming `key`. */
  async send<T>(what: string, run: () => Promise<T>, key?: string): Promise<T> {
    try {
      return await run();
    } catch (err) {
      throw unavailable(err, what, key);
    }
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
    let token: string | undefined;
    do {
      const res = await this.send('list', () =>
        this.client.send(
          new ListObjectsV2Command({
            Bucket: this.bucket,
            Prefix: prefix,
            Delimiter: '/',
            ...(token ? { ContinuationToken: token } : {}),
          }),
        ),
      );
      for (const c of res.CommonPrefixes ?? [])
        if (c.Prefix) names.add(c.Prefix.slice(prefix.length, -1));
      for (const o of res.Contents ?? []) if (o.Key) names.add(o.Key.slice(prefix.length));
      token = res.IsTruncated ? res.NextContinuationToken : undefined;
    } while (token);
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

  /** Every key under a directory, with its size and last write. */
  private async *walkKeys(p: string): AsyncIterable<{ key: string; size: number; modTime: Date }> {
    const prefix = this.dirKey(p);
    let token: string | undefined;
    do {
      const res = await this.send('list', () =>
        this.client.send(
          new ListObjectsV2Command({
            Bucket: this.bucket,
            Prefix: prefix,
            ...(token ? { ContinuationToken: token } : {}),
          }),
        ),
      );
      for (const o of res.Contents ?? [])
        if (o.Key) yield { key: o.Key, size: o.Size ?? 0, modTime: o.LastModified ?? new Date(0) };
      token = res.IsTruncated ? res.NextContinuationToken : undefined;
    } while (token);
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

  private async deleteKeys(keys: string[]): Promise<void> {
    for (let i = 0; i < keys.length; i += DELETE_BATCH) {
      const batch = keys.slice(i, i + DELETE_BATCH);
      const res = await this.send('delete', () =>
        this.client.send(
          new DeleteObjectsCommand({
            Bucket: this.bucket,
            Delete: { Objects: batch.map((Key) => ({ Key })), Quiet: true },
          }),
        ),
      );
      const failed = (res.Errors ?? []).filter((e) => e.Code !== 'NoSuchKey');
      if (failed.length > 0)
        throw new StorageUnavailableError(
          `cannot delete ${failed[0]!.Key}: ${failed[0]!.Code ?? 'error'}`,
        );
    }
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
