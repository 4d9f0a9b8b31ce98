/**
 * The blob GET of one upstream's registry client (client.ts): the body on the blob path's own
 * sockets (raw-get.ts, through the transport's `rawHop`), resumed with Range after a break, up to
 * `retries` times with a doubling delay, and checked against its digest at the end. An upstream
 * that ignores Range is read again from the start, the bytes already passed on dropped.
 */
import { Readable } from 'node:stream';
import type { UpstreamConfig } from '../config/schema.js';
import type { Logger } from '../log/logger.js';
import { DigestVerifier, parseDigest, type Digest } from '../oci/digest.js';
import type { Repository } from '../oci/reference.js';
import { contentLength, header, isConnectionError } from './answers.js';
import { errMessage, UpstreamInvalidError } from './errors.js';
import type { RawBody } from './raw-body.js';
import type { Hop, UpstreamTransport } from './transport.js';
import type { BlobRequestOptions, BlobStream, UpstreamObserver } from './types.js';

export interface BlobGetterOptions {
  name: string;
  config: UpstreamConfig;
  /** The client's transport: the blob path's hops, `sendVia`, `bodyError`. */
  transport: UpstreamTransport;
  /** The client's logger (module and upstream bound). */
  log: Logger;
  /** Base delay of Range-resume retries, ms. */
  retryDelay: number;
  observer: UpstreamObserver;
}

/** Blob GETs of one upstream, resumed with Range after a break and checked against the digest. */
export class BlobGetter {
  private readonly name: string;
  private readonly config: UpstreamConfig;
  private readonly transport: UpstreamTransport;
  private readonly log: Logger;
  private readonly retryDelay: number;
  private readonly observer: UpstreamObserver;

  constructor(options: BlobGetterOptions) {
    this.name = options.name;
    this.config = options.config;
    this.transport = options.transport;
    this.log = options.log;
    this.retryDelay = options.retryDelay;
    this.observer = options.observer;
  }

  async get(
    repository: Repository,
    digest: Digest,
    options: BlobRequestOptions = {},
  ): Promise<BlobStream> {
    const what = `blob ${digest}`;
    const hop = this.transport.rawHop(options);
    const first = await this.transport.sendVia(
      hop,
      'GET',
      repository,
      `blobs/${digest}`,
      what,
      {},
      options,
    );
    const size = contentLength(first.headers);
    const verifier = new DigestVerifier(parseDigest(digest));
    return {
      size,
      stream: Readable.from(
        this.blobChunks(hop, repository, digest, first.body, size, verifier, options),
        // Each chunk as it was yielded: a byte stream would join buffered chunks into a copy,
        // and the consumer could not hand the slabs' views back.
        { objectMode: true, highWaterMark: 1 },
      ),
    };
  }

  /**
   * Yields the blob's bytes (views of `options.slabs`, see receive-slabs.ts); on a break asks
   * again with Range from where it is, then checks the digest.
   */
  private async *blobChunks(
    hop: Hop<RawBody>,
    repository: Repository,
    digest: Digest,
    firstBody: RawBody,
    size: number | undefined,
    verifier: DigestVerifier,
    options: BlobRequestOptions,
  ): AsyncGenerator<Buffer> {
    const what = `blob ${digest}`;
    let queue = firstBody;
    let skip = 0;
    let attempt = 0;
    for (;;) {
      // A consumer that stops early (its stream destroyed, a failed write) returns this
      // generator, and the loop returns the body's: it lets go of the connection, which would
      // otherwise wait, paused, for ever.
      for await (const view of queue.drain()) {
        let chunk = view;
        if (skip > 0) {
          // The upstream ignored Range: drop what we already passed on.
          if (chunk.length <= skip) {
            skip -= chunk.length;
            options.slabs?.release(chunk);
            continue;
          }
          chunk = chunk.subarray(skip);
          skip = 0;
        }
        verifier.update(chunk);
        this.observer.received('blob', chunk.length);
        yield chunk;
      }
      let end = queue.ended!;
      if (end.kind === 'end') {
        if (size === undefined || verifier.bytes === size) break;
        end = {
          kind: 'error',
          error: Object.assign(new Error(`body ended at ${verifier.bytes} of ${size} bytes`), {
            code: 'UND_ERR_SOCKET',
          }),
        };
      }
      if (end.kind === 'error') {
        if (
          options.signal?.aborted ||
          !isConnectionError(end.error) ||
          attempt >= this.config.retries
        ) {
          if (!options.signal?.aborted)
            this.observer.failed(
              `${what} of ${repository}`,
              `body broke off at ${verifier.bytes} bytes: ${errMessage(end.error)}`,
              [repository],
            );
          throw this.transport.bodyError(end.error, what);
        }
        attempt++;
        this.log.warn(
          { repository, digest, offset: verifier.bytes, attempt, err: errMessage(end.error) },
          'blob body broke off, resuming',
        );
        await sleep(this.retryDelay * 2 ** (attempt - 1), options.signal);
      }
      const offset = verifier.bytes;
      const res = await this.transport.sendVia(
        hop,
        'GET',
        repository,
        `blobs/${digest}`,
        what,
        { range: `bytes=${offset}-` },
        options,
      );
      if (res.status === 206) {
        const start = /^bytes (\d+)-/.exec(header(res.headers, 'content-range') ?? '')?.[1];
        if (Number(start) !== offset) {
          res.body.destroy();
          throw new UpstreamInvalidError(
            this.name,
            `${what}: resumed at ${String(start)}, asked for ${offset}`,
          );
        }
      } else {
        skip = offset;
      }
      queue = res.body;
    }
    if (!verifier.matches()) {
      this.observer.failed(`${what} of ${repository}`, `content is ${verifier.actual()}`, [
        repository,
      ]);
      throw new UpstreamInvalidError(this.name, `${what}: content is ${verifier.actual()}`);
    }
  }
}

function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener(
      'abort',
      () => {
        clearTimeout(timer);
        reject(signal.reason);
      },
      { once: true },
    );
  });
}
