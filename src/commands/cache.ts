/**
 * `pullcache ls | du | pin | unpin | rm | gc`: what is cached and how much room it takes, and
 * managing it. When a server manages the same storage (its owner record names its URL), the
 * commands go through its admin API, so that its caches see every removal at once; otherwise
 * they work on storage directly, as its owner for the while (two processes never evict at once).
 */
import type { Config } from '../config/schema.js';
import { formatBytes } from '../config/units.js';
import { ADMIN_PREFIX } from '../http/admin.js';
import { imageRefs } from '../routing.js';
import type { Lifecycle } from '../lifecycle/lifecycle.js';
import type { ImageInfo, RemovalReport, Usage } from '../lifecycle/types.js';
import type { Runtime } from '../runtime.js';
import { fetchOwnServer } from '../tls/own-server.js';
import { ownerAuthorization } from '../access/tokens.js';

/**
 * With client authentication on, a command on the same config may do everything through the
 * server's admin API: it proves it with an owner token, made from the owner key in storage and
 * the htpasswd file (access/tokens.ts). `problem`: why none could be made, to say along with a
 * refusal.
 */
export function ownerCredentials(config: Pick<Config, 'auth' | 'storage'>): {
  headers: Record<string, string>;
  problem?: string;
} {
  if (config.auth.htpasswd === '') return { headers: {} };
  const made = ownerAuthorization(config);
  return 'authorization' in made
    ? { headers: { authorization: made.authorization } }
    : { headers: {}, problem: `no owner token: ${made.problem}` };
}

/** The cache's lifecycle operations, wherever they run. */
export interface CacheAdmin {
  /** `server` when a running server answers, `storage` when this process works on it. */
  readonly via: 'server' | 'storage';
  images(): Promise<ImageInfo[]>;
  usage(): Promise<Usage>;
  pins(): Promise<string[]>;
  pin(references: string[]): Promise<string[]>;
  /** Resolves to the references that were not pinned. */
  unpin(references: string[]): Promise<string[]>;
  remove(references: string[], dryRun: boolean): Promise<RemovalReport>;
  gc(dryRun: boolean): Promise<RemovalReport>;
}

/**
 * The running server's admin API when one owns the storage; else the storage itself, with this
 * process as its owner. Throws when another command holds it.
 */
export async function openCacheAdmin(runtime: Runtime, config: Config): Promise<CacheAdmin> {
  const { lifecycle } = runtime;
  const other = await lifecycle.ownership.other();
  if (other?.url) return new ServerAdmin(other.url, config);
  if (other || !(await lifecycle.ownership.acquire()))
    throw new Error(
      `another pullcache process (pid ${other?.pid ?? '?'} on ${other?.host ?? 'this host'}) is managing this storage; try again when it is done`,
    );
  await lifecycle.whenReady();
  return new StorageAdmin(lifecycle, config);
}

/**
 * After a command added content (prefetch, import): a server managing the same storage counts it
 * afresh, so that its `ls` and its budget see the new images now rather than at its next sweep.
 * Best effort: a server that does not answer counts it at that sweep anyway.
 */
export async function tellServer(runtime: Runtime): Promise<void> {
  const other = await runtime.lifecycle.ownership.other().catch(() => undefined);
  if (!other?.url) return;
  await fetchOwnServer(
    `${other.url}${ADMIN_PREFIX}/recount`,
    {
      method: 'POST',
      // The admin API takes a change only as JSON (a page of another site cannot send that).
      headers: {
        ...ownerCredentials(runtime.config).headers,
        'content-type': 'application/json',
      },
      signal: AbortSignal.timeout(60_000),
    },
    runtime.config.server.tls,
  )
    .then((res) => res.arrayBuffer())
    .catch(() => {});
}

class StorageAdmin implements CacheAdmin {
  readonly via = 'storage';
  constructor(
    private readonly lifecycle: Lifecycle,
    private readonly config: Config,
  ) {}
  images() {
    return this.lifecycle.images();
  }
  usage() {
    return this.lifecycle.usage();
  }
  async pins() {
    return this.lifecycle.pinned();
  }
  async pin(references: string[]) {
    await this.lifecycle.pin(imageRefs(this.config, references));
    return this.lifecycle.pinned();
  }
  unpin(references: string[]) {
    return this.lifecycle.unpin(imageRefs(this.config, references));
  }
  remove(references: string[], dryRun: boolean) {
    return this.lifecycle.remove(imageRefs(this.config, references), dryRun);
  }
  gc(dryRun: boolean) {
    return this.lifecycle.gc(dryRun);
  }
}

class ServerAdmin implements CacheAdmin {
  readonly via = 'server';
  /**
   * `config.server.tls`: the server's certificate, which an https `base` must present; with
   * client authentication, the command proves itself with an owner token (`ownerCredentials`).
   */
  constructor(
    private readonly base: string,
    private readonly config: Pick<Config, 'auth' | 'storage' | 'server'>,
  ) {}

  private async call<T>(method: string, path: string, body?: unknown): Promise<T> {
    let res: Awaited<ReturnType<typeof fetchOwnServer>>;
    const owner = ownerCredentials(this.config);
    try {
      res = await fetchOwnServer(
        `${this.base}${ADMIN_PREFIX}${path}`,
        {
          method,
          headers: {
            ...owner.headers,
            ...(body !== undefined ? { 'content-type': 'application/json' } : {}),
          },
          ...(body !== undefined ? { body: JSON.stringify(body) } : {}),
          signal: AbortSignal.timeout(120_000),
        },
        this.config.server.tls,
      );
    } catch (err) {
      // fetch's own message is "fetch failed"; its cause says why.
      const cause = (err as Error).cause as Error | undefined;
      throw new Error(
        `the server managing this storage (${this.base}) does not answer: ${cause?.message ?? (err as Error).message}`,
      );
    }
    const text = await res.text();
    if (!res.ok) {
      let message = text.slice(0, 200);
      try {
        const parsed = JSON.parse(text) as { errors?: { message?: string }[] };
        message = parsed.errors?.[0]?.message ?? message;
      } catch {
        // not JSON: the text as it came
      }
      const why = owner.problem && (res.status === 401 || res.status === 403);
      throw new Error(
        `${this.base} answered ${res.status}: ${message}${why ? ` (${owner.problem})` : ''}`,
      );
    }
    return JSON.parse(text) as T;
  }

  images() {
    return this.call<ImageInfo[]>('GET', '/images');
  }
  usage() {
    return this.call<Usage>('GET', '/usage');
  }
  async pins() {
    return (await this.call<{ pins: string[] }>('GET', '/pins')).pins;
  }
  async pin(references: string[]) {
    return (await this.call<{ pins: string[] }>('POST', '/pins', { references })).pins;
  }
  async unpin(references: string[]) {
    return (await this.call<{ notPinned: string[] }>('DELETE', '/pins', { references })).notPinned;
  }
  remove(references: string[], dryRun: boolean) {
    return this.call<RemovalReport>('POST', '/remove', { references, dryRun });
  }
  gc(dryRun: boolean) {
    return this.call<RemovalReport>('POST', '/gc', { dryRun });
  }
}

// ---- what people read ----------------------------------------------------------------------

export type SortKey = 'pulled' | 'size' | 'name';

export function sortImages(images: ImageInfo[], by: SortKey): ImageInfo[] {
  const name = (i: ImageInfo) => i.references[0] ?? '';
  return [...images].sort((a, b) =>
    by === 'pulled'
      ? b.lastPulled.localeCompare(a.lastPulled)
      : by === 'size'
        ? b.size - a.size
        : name(a).localeCompare(name(b)),
  );
}

/** `ls` as a table: one image a row (more references of one image on lines of their own). */
export function formatImages(images: ImageInfo[]): string {
  if (images.length === 0) return 'no images cached\n';
  const rows = images.map((i) => [
    i.references.join('\n'),
    i.digest.slice(0, 19),
    formatBytes(i.size),
    formatBytes(i.sharedBytes),
    i.lastPulled.replace('T', ' ').slice(0, 19),
    i.pinned ? 'pinned' : '',
  ]);
  const head = ['REFERENCE', 'DIGEST', 'SIZE', 'SHARED', 'LAST PULLED (UTC)', ''];
  const widths = head.map((h, c) =>
    Math.max(h.length, ...rows.map((r) => Math.max(...r[c]!.split('\n').map((l) => l.length)))),
  );
  const line = (cells: string[]) =>
    cells
      .map((cell, c) => cell.padEnd(widths[c]!))
      .join('  ')
      .trimEnd();
  const out = [line(head)];
  for (const row of rows) {
    const [first, ...more] = row[0]!.split('\n');
    out.push(line([first!, ...row.slice(1)]));
    for (const reference of more) out.push(line([reference, '', '', '', '', '']));
  }
  return `${out.join('\n')}\n`;
}

export function formatUsage(u: Usage): string {
  const lines = [
    `content   ${formatBytes(u.bytes)} in ${u.blobs} blobs: ${u.images} images, ${u.orphanBlobs} blobs of no image`,
    `budget    ${u.maxSize > 0 ? `${formatBytes(u.maxSize)} (${Math.round((u.bytes / u.maxSize) * 100)}% used)` : 'none (retention.maxSize is 0)'}`,
  ];
  if (u.minFree > 0) lines.push(`min free  ${formatBytes(u.minFree)}`);
  lines.push(
    `free      ${u.free === null ? 'unknown' : formatBytes(u.free)} on the storage's disk`,
  );
  lines.push(`evicted   ${formatBytes(u.evictedBytes)} since the server started`);
  return `${lines.join('\n')}\n`;
}

export function formatReport(report: RemovalReport, what: string): string {
  const verb = report.dryRun ? 'would remove' : 'removed';
  const count = report.removed.length;
  const lines = report.removed.map(
    (r) => `${verb} ${r.kind} ${r.name}${r.bytes > 0 ? ` (${formatBytes(r.bytes)})` : ''}`,
  );
  lines.push(
    `${what}: ${count === 0 ? 'nothing to remove' : `${verb} ${count} ${count === 1 ? 'entry' : 'entries'}, ${formatBytes(report.bytes)}`}`,
  );
  return `${lines.join('\n')}\n`;
}
