/**
 * The S3 driver's connection to its store (S3Driver extends it, s3-driver.ts): the options that
 * say where the bucket is and how to reach it, the SDK client set up for AWS S3 and S3-compatible
 * stores (Ceph RGW, MinIO, R2...), the count of the requests it sends, the object key of a path
 * (`prefix` + path), `send`, through which every request goes, and the two operations on keys
 * themselves that the driver builds on: every key under a directory (`walkKeys`) and deletes in
 * batches (`deleteKeys`).
 *
 * `send` turns a failure of the store (refused, down, 5xx after the SDK's retries with backoff,
 * 403) into a StorageUnavailableError (503), and lets a 404 about the key through for the driver
 * to make the contract's own PathNotFoundError/undefined of it (s3-errors.ts).
 */
import { Agent } from 'node:https';
import { Agent as HttpAgent } from 'node:http';
import {
  DeleteObjectsCommand,
  ListObjectsV2Command,
  type ListObjectsV2CommandOutput,
  S3Client,
  type S3ClientConfig,
} from '@aws-sdk/client-s3';
import { unavailable } from './s3-errors.js';
import { StorageUnavailableError } from './errors.js';

/** Keys a DeleteObjects takes at once. */
const DELETE_BATCH = 1000;

/** Where the bucket is and how it is reached (S3DriverOptions adds how writes are made). */
export interface S3ConnectionOptions {
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
  /** Attempts per request (the SDK's standard retry mode, with backoff); 3 by default. */
  maxAttempts?: number;
  /** How long a request may go without a byte from the store (ms); 60 s by default. */
  requestTimeout?: number;
}

/** One bucket (under a key prefix) of a store, and the SDK client that reaches it. */
export class S3Connection<Options extends S3ConnectionOptions = S3ConnectionOptions> {
  readonly client: S3Client;
  readonly bucket: string;
  /** S3 requests sent, by command (each retry too): for the cost figures. */
  readonly requests = new Map<string, number>();
  protected readonly prefix: string;

  constructor(readonly options: Options) {
    this.bucket = options.bucket;
    this.prefix = options.prefix ?? '';
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

  /**
   * Every page of the listing of the keys under `prefix` (with `delimiter`: the keys right under
   * it, and the common prefixes below).
   */
  protected async *listPages(
    prefix: string,
    delimiter?: string,
  ): AsyncIterable<ListObjectsV2CommandOutput> {
    let token: string | undefined;
    do {
      const res = await this.send('list', () =>
        this.client.send(
          new ListObjectsV2Command({
            Bucket: this.bucket,
            Prefix: prefix,
            ...(delimiter !== undefined ? { Delimiter: delimiter } : {}),
            ...(token ? { ContinuationToken: token } : {}),
          }),
        ),
      );
      yield res;
      token = res.IsTruncated ? res.NextContinuationToken : undefined;
    } while (token);
  }

  /** Every key under a directory, with its size and last write. */
  protected async *walkKeys(
    p: string,
  ): AsyncIterable<{ key: string; size: number; modTime: Date }> {
    for await (const res of this.listPages(this.dirKey(p)))
      for (const o of res.Contents ?? [])
        if (o.Key) yield { key: o.Key, size: o.Size ?? 0, modTime: o.LastModified ?? new Date(0) };
  }

  protected async deleteKeys(keys: string[]): Promise<void> {
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
}
