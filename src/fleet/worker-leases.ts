/**
 * A worker's side of the host's leases (lease-table.ts keeps them in the primary): asks for a
 * lease over IPC, tells the primary how its own fetches go, and follows the fetches of other
 * workers by reading their upload files in the shared storage as far as they say they wrote.
 */
import type { Digest } from '../oci/digest.js';
import type { RangeStream } from '../storage/file-range.js';
import { PathNotFoundError } from '../storage/errors.js';
import {
  isLeaseMessage,
  type HolderState,
  type ToPrimary,
  type ToWorker,
  type WireEvent,
} from './messages.js';
import type { DigestLeases, HeldFetch, HolderEvent, Lease, LeaseResult } from './types.js';

/** How often a holder's progress goes to the primary at most: one message per interval. */
const PROGRESS_EVERY_MS = 5;

/** The IPC channel to the primary: `process` in a cluster worker. */
export interface Channel {
  readonly connected: boolean;
  send(message: ToPrimary): void;
  onMessage(listener: (message: unknown) => void): void;
  onDisconnect(listener: () => void): void;
}

/** `process` in a cluster worker, for the leases and for fleet/forget-transports.ts alike. */
export const processChannel = {
  get connected() {
    return process.connected;
  },
  send(message: object) {
    process.send?.(message);
  },
  onMessage(listener: (message: unknown) => void) {
    process.on('message', listener);
  },
  onDisconnect(listener: () => void) {
    process.on('disconnect', listener);
  },
} satisfies Channel;

export interface WorkerLeasesOptions {
  channel: Channel;
  /** Reads `length` bytes from `offset` of an upload session's data; PathNotFoundError once gone. */
  readUpload(id: string, offset: number, length: number): Promise<RangeStream>;
}

export class WorkerLeases implements DigestLeases {
  private next = 0;
  /** Questions to the primary, by token; `undefined`: nobody holds it (a `watch`). */
  private readonly asked = new Map<
    string,
    { resolve: (r: LeaseResult | undefined) => void; reject: (e: Error) => void }
  >();
  /** The holders followed from here, by their token. */
  private readonly followed = new Map<string, Set<IpcHeldFetch>>();
  private gone = false;

  constructor(private readonly o: WorkerLeasesOptions) {
    o.channel.onMessage((m) => {
      if (isLeaseMessage(m)) this.receive(m as ToWorker);
    });
    o.channel.onDisconnect(() => this.disconnected());
  }

  acquire(digest: Digest, scope: string): Promise<LeaseResult> {
    return this.ask('acquire', digest, scope) as Promise<LeaseResult>;
  }

  /** The fetch of `digest` another worker holds, to follow; undefined when none does. */
  async watch(digest: Digest): Promise<HeldFetch | undefined> {
    const result = await this.ask('watch', digest);
    return result && !result.held ? result.holder : undefined;
  }

  private ask(
    t: 'acquire' | 'watch' | 'takeOver',
    digest: Digest,
    scope = '',
    stalled = '',
  ): Promise<LeaseResult | undefined> {
    if (this.gone || !this.o.channel.connected)
      return Promise.reject(new Error('the primary process is gone'));
    const token = this.token();
    return new Promise((resolve, reject) => {
      this.asked.set(token, { resolve, reject });
      this.send(
        t === 'takeOver'
          ? { pullcache: 'lease', t, digest, token, stalled, scope }
          : t === 'acquire'
            ? { pullcache: 'lease', t, digest, token, scope }
            : { pullcache: 'lease', t, digest, token },
      );
    });
  }

  takeOver(digest: Digest, stalled: HeldFetch, scope: string): Promise<LeaseResult> {
    const holder = stalled instanceof IpcHeldFetch ? stalled.holder : '';
    return this.ask('takeOver', digest, scope, holder) as Promise<LeaseResult>;
  }

  private token(): string {
    return `${process.pid}.${++this.next}`;
  }

  private send(message: ToPrimary): void {
    if (this.gone || !this.o.channel.connected) return;
    try {
      this.o.channel.send(message);
    } catch {
      // The channel closed under us: `disconnected` tells everyone.
    }
  }

  private receive(m: ToWorker): void {
    if (m.t === 'event') {
      for (const held of [...(this.followed.get(m.holder) ?? [])]) held.tell(m.event);
      return;
    }
    const asked = this.asked.get(m.token);
    if (!asked) return;
    this.asked.delete(m.token);
    if (m.t === 'none') {
      asked.resolve(undefined);
      return;
    }
    if (m.t === 'granted') {
      asked.resolve({ held: true, lease: new IpcLease(m.token, (x) => this.send(x)) });
      return;
    }
    const held = new IpcHeldFetch(m.holder, m.scope, m.state, {
      read: (id, offset, length) => this.o.readUpload(id, offset, length),
      close: () => this.unwatch(m.holder, held),
    });
    let set = this.followed.get(m.holder);
    if (!set) this.followed.set(m.holder, (set = new Set()));
    set.add(held);
    asked.resolve({ held: false, holder: held });
  }

  private unwatch(holder: string, held: IpcHeldFetch): void {
    const set = this.followed.get(holder);
    if (!set?.delete(held) || set.size > 0) return;
    this.followed.delete(holder);
    this.send({ pullcache: 'lease', t: 'unwatch', token: holder });
  }

  private disconnected(): void {
    this.gone = true;
    for (const { reject } of this.asked.values()) reject(new Error('the primary process is gone'));
    this.asked.clear();
    for (const set of this.followed.values())
      for (const held of [...set])
        held.tell({ type: 'failed', reason: 'the primary process is gone' });
    this.followed.clear();
  }
}

class IpcLease implements Lease {
  private latest = 0;
  private sent = 0;
  private timer: NodeJS.Timeout | undefined;
  private ended = false;

  constructor(
    private readonly token: string,
    private readonly send: (m: ToPrimary) => void,
  ) {}

  started(upload: { id: string; size: number | undefined }): void {
    this.send({
      pullcache: 'lease',
      t: 'started',
      token: this.token,
      upload: upload.id,
      size: upload.size ?? null,
    });
  }

  progress(written: number): void {
    this.latest = written;
    if (this.timer || this.ended) return;
    this.timer = setTimeout(() => this.flush(), PROGRESS_EVERY_MS);
    this.timer.unref();
  }

  private flush(): void {
    clearTimeout(this.timer);
    this.timer = undefined;
    if (this.latest <= this.sent) return;
    this.sent = this.latest;
    this.send({ pullcache: 'lease', t: 'progress', token: this.token, written: this.latest });
  }

  committing(): void {
    if (this.ended) return;
    this.flush();
    this.send({ pullcache: 'lease', t: 'committing', token: this.token });
  }

  committed(size: number, kept: boolean): void {
    if (this.ended) return;
    this.flush();
    this.ended = true;
    this.send({ pullcache: 'lease', t: 'committed', token: this.token, size, kept });
  }

  failed(reason: string): void {
    if (this.ended) return;
    clearTimeout(this.timer);
    this.ended = true;
    this.send({ pullcache: 'lease', t: 'failed', token: this.token, reason });
  }
}

class IpcHeldFetch implements HeldFetch {
  private listener: ((event: HolderEvent) => void) | undefined;
  private readonly early: HolderEvent[] = [];
  private upload: string | null;
  private closed = false;

  constructor(
    /** The holder's lease token. */
    readonly holder: string,
    readonly scope: string,
    state: HolderState,
    private readonly io: {
      read(id: string, offset: number, length: number): Promise<RangeStream>;
      close(): void;
    },
  ) {
    this.upload = state.upload;
    if (state.upload !== null) {
      this.early.push({ type: 'started', size: state.size ?? undefined });
      if (state.written > 0) this.early.push({ type: 'progress', written: state.written });
      if (state.committing) this.early.push({ type: 'committing' });
    }
  }

  watch(listener: (event: HolderEvent) => void): void {
    this.listener = listener;
    for (const event of this.early.splice(0)) listener(event);
  }

  tell(wire: WireEvent): void {
    if (this.closed) return;
    let event: HolderEvent;
    if (wire.type === 'started') {
      this.upload = wire.upload;
      event = { type: 'started', size: wire.size ?? undefined };
    } else event = wire;
    if (this.listener) this.listener(event);
    else this.early.push(event);
  }

  readWritten(offset: number, length: number): Promise<RangeStream> {
    if (this.upload === null) return Promise.reject(new PathNotFoundError('upload not started'));
    return this.io.read(this.upload, offset, length);
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.io.close();
  }
}
