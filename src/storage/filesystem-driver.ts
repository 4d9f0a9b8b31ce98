/**
 * The filesystem StorageDriver: one directory tree under `root`.
 *
 * Small files (`putContent`, `createExclusive`: links, tags, manifests, the lifecycle's records)
 * are written whole under a temporary name in `<root>/.tmp/`, then renamed or linked into place;
 * the lifecycle's records (pins, the owner) are flushed to the disk (fsync) first, so that after
 * a power loss they hold their old or their new content. The others are not (they are on the
 * pull path): a torn link or tag reads as absent, a torn manifest is caught by its digest when
 * read (local-services.ts). Blob data is not flushed either: see docs/design.md. A process killed between the
 * write and the rename leaves its temporary file there, where nothing lists it and no directory
 * is kept by it; `abortIncomplete` (the upload purge) removes those.
 */
import { randomUUID } from 'node:crypto';
import { constants } from 'node:fs';
import * as fs from 'node:fs/promises';
import * as path from 'node:path';
import { FileRange } from './file-range.js';
import type { FileInfo, FileWriter, StorageDriver } from './types.js';
import { PathNotFoundError } from './errors.js';

/** Where small files are written before they are renamed into place (see above). */
const TMP_DIR = '.tmp';
/**
 * A temporary file untouched this long was left by a process that died (a write takes
 * milliseconds): the purge removes it, and so does a removal of the directory it is in (files
 * `<name>.tmp-<uuid>` beside their target, as versions before `.tmp/` wrote them).
 */
const STALE_TMP_MS = 60 * 60_000;

export class FilesystemDriver implements StorageDriver {
  readonly name = 'filesystem';
  readonly root: string;

  constructor(root: string) {
    this.root = path.resolve(root);
  }

  /** Absolute path of a driver path; refuses anything that would leave the root. */
  resolve(p: string): string {
    if (p.split('/').some((part) => part === '..' || part === '.') || p.includes('\0')) {
      throw new Error(`invalid storage path ${JSON.stringify(p)}`);
    }
    const full = path.resolve(this.root, p);
    if (full !== this.root && !full.startsWith(this.root + path.sep)) {
      throw new Error(`storage path ${JSON.stringify(p)} leaves the root`);
    }
    return full;
  }

  async getContent(p: string): Promise<Buffer> {
    try {
      return await fs.readFile(this.resolve(p));
    } catch (err) {
      throw notFound(err, p);
    }
  }

  async putContent(p: string, content: Uint8Array | string): Promise<void> {
    const full = this.resolve(p);
    // Only the lifecycle's records are flushed (pins: nothing else holds them). The other small
    // files are on the pull path (links, tags, manifests, the readiness probe), where a flush
    // costs latency, and one that a power loss tears reads as absent: a link or tag that does
    // not parse is none (fetched again), a manifest is checked against its digest when read.
    const durable = p.startsWith('lifecycle/');
    let tmp = await this.writeTemporary(this.temporaryPath(full), content, durable);
    try {
      // Three times at most: an eviction may prune the (empty) directory between mkdir and the
      // rename, and `.tmp/` may be on another file system than the target.
      for (let attempt = 1; ; attempt++) {
        await fs.mkdir(path.dirname(full), { recursive: true });
        try {
          await fs.rename(tmp, full);
          return;
        } catch (err) {
          const code = (err as NodeJS.ErrnoException).code;
          if (attempt === 3 || (code !== 'ENOENT' && code !== 'EXDEV')) throw err;
          if (code === 'EXDEV') {
            await fs.rm(tmp, { force: true });
            tmp = `${full}.tmp-${randomUUID()}`;
          }
          // Gone with the cross-device rename, or removed by a purge whose cutoff is ahead.
          if (!(await exists(tmp))) await this.writeTemporary(tmp, content, durable);
        }
      }
    } catch (err) {
      await fs.rm(tmp, { force: true });
      throw err;
    }
  }

  /** A new temporary name for a file to be renamed or linked to `full` (see above). */
  private temporaryPath(full: string): string {
    return path.join(this.root, TMP_DIR, `${path.basename(full)}.tmp-${randomUUID()}`);
  }

  /** Writes `content` to `tmp` whole, flushed to the disk when `durable`; resolves to `tmp`. */
  private async writeTemporary(
    tmp: string,
    content: Uint8Array | string,
    durable: boolean,
  ): Promise<string> {
    const handle = await fs.open(tmp, 'w').catch(async (err: unknown) => {
      if (!isNotFound(err)) throw err;
      // Not recursive first: a recursive mkdir says ENOENT where the real reason is another (a
      // read-only file system), which start-up's probe must name.
      const dir = path.dirname(tmp);
      await fs.mkdir(dir).catch(async (e: NodeJS.ErrnoException) => {
        if (e.code === 'EEXIST') return;
        if (e.code !== 'ENOENT') throw e;
        await fs.mkdir(dir, { recursive: true });
      });
      return fs.open(tmp, 'w');
    });
    try {
      await handle.writeFile(content);
      if (durable) await handle.sync();
    } catch (err) {
      await handle.close().catch(() => {});
      await fs.rm(tmp, { force: true });
      throw err;
    }
    await handle.close();
    return tmp;
  }

  async reader(p: string, offset = 0, length?: number): Promise<FileRange> {
    const full = this.resolve(p);
    let handle: fs.FileHandle;
    try {
      handle = await fs.open(full, constants.O_RDONLY);
    } catch (err) {
      throw notFound(err, p);
    }
    return new FileRange(handle, offset, length !== undefined ? offset + length : Infinity);
  }

  async writer(p: string, append: boolean): Promise<FileWriter> {
    const full = this.resolve(p);
    await fs.mkdir(path.dirname(full), { recursive: true });
    const handle = await fs.open(full, append ? 'a' : 'w');
    const { size } = await handle.stat();
    return new FilesystemWriter(handle, full, size);
  }

  async stat(p: string): Promise<FileInfo | undefined> {
    try {
      const s = await fs.stat(this.resolve(p));
      return { path: p, size: s.size, modTime: s.mtime, isDirectory: s.isDirectory() };
    } catch (err) {
      if (isNotFound(err)) return undefined;
      throw err;
    }
  }

  async list(p: string): Promise<string[]> {
    try {
      return (await fs.readdir(this.resolve(p))).filter((name) => !name.includes('.tmp-')).sort();
    } catch (err) {
      if (isNotFound(err) || (err as NodeJS.ErrnoException).code === 'ENOTDIR') return [];
      throw err;
    }
  }

  async move(from: string, to: string): Promise<void> {
    const src = this.resolve(from);
    const dst = this.resolve(to);
    await fs.mkdir(path.dirname(dst), { recursive: true });
    try {
      await fs.rename(src, dst);
    } catch (err) {
      throw notFound(err, from);
    }
  }

  async delete(p: string): Promise<void> {
    await fs.rm(this.resolve(p), { recursive: true, force: true });
  }

  async deleteFiles(ps: readonly string[]): Promise<void> {
    await Promise.all(ps.map((p) => fs.rm(this.resolve(p), { force: true })));
  }

  async deleteEmpty(p: string, options: { recursive?: boolean } = {}): Promise<void> {
    const prune = async (full: string): Promise<void> => {
      if (options.recursive !== false) {
        let entries: import('node:fs').Dirent[];
        try {
          entries = await fs.readdir(full, { withFileTypes: true });
        } catch {
          return; // gone, or not a directory
        }
        for (const entry of entries)
          if (entry.isDirectory()) await prune(path.join(full, entry.name));
      }
      // rmdir refuses a directory that is not empty: a file written meanwhile keeps its place.
      // Temporary files that a killed process left beside their target (versions before
      // `.tmp/`) would keep it forever: those untouched for STALE_TMP_MS go with it.
      await fs.rmdir(full).catch(async (err: NodeJS.ErrnoException) => {
        if (err.code === 'ENOTEMPTY' && (await removeStaleTemporaries(full)))
          await fs.rmdir(full).catch(() => {});
      });
    };
    await prune(this.resolve(p));
  }

  async touch(p: string, time: Date): Promise<void> {
    try {
      await fs.utimes(this.resolve(p), time, time);
    } catch (err) {
      throw notFound(err, p);
    }
  }

  async createExclusive(p: string, content: string): Promise<boolean> {
    const full = this.resolve(p);
    await fs.mkdir(path.dirname(full), { recursive: true });
    // Written whole (and flushed) under a temporary name, then linked into place: link() fails
    // when the name exists, so no reader ever sees a half-written file and only one creator wins.
    let tmp = await this.writeTemporary(this.temporaryPath(full), content, true);
    try {
      for (let attempt = 1; ; attempt++) {
        try {
          await fs.link(tmp, full);
          return true;
        } catch (err) {
          const code = (err as NodeJS.ErrnoException).code;
          if (code === 'EEXIST') return false;
          if (attempt === 2 || code !== 'EXDEV') throw err;
        }
        // `.tmp/` is on another file system than the target: beside it, then.
        await fs.rm(tmp, { force: true });
        tmp = await this.writeTemporary(`${full}.tmp-${randomUUID()}`, content, true);
      }
    } finally {
      await fs.rm(tmp, { force: true });
    }
  }

  /**
   * The filesystem's unfinished writes: temporary files of small writes (`.tmp/`) that a killed
   * process left, untouched since `olderThan` or for STALE_TMP_MS, whichever is sooner; resolves
   * to how many were removed. (Upload sessions are the blob store's to purge.)
   */
  async abortIncomplete(_paths: readonly string[], olderThan: Date): Promise<number> {
    const cutoff = Math.max(olderThan.getTime(), Date.now() - STALE_TMP_MS);
    const dir = path.join(this.root, TMP_DIR);
    let removed = 0;
    for (const name of await fs.readdir(dir).catch(() => [] as string[])) {
      const file = path.join(dir, name);
      const info = await fs.stat(file).catch(() => undefined);
      if (!info || info.mtimeMs >= cutoff) continue;
      await fs.rm(file, { recursive: true, force: true });
      removed++;
    }
    return removed;
  }

  async space(): Promise<{ free: number; total: number }> {
    await fs.mkdir(this.root, { recursive: true });
    const s = await fs.statfs(this.root);
    // bavail: what an unprivileged writer may still use (root's reserve excluded).
    return { free: s.bavail * s.bsize, total: s.blocks * s.bsize };
  }
}

class FilesystemWriter implements FileWriter {
  private closed = false;

  constructor(
    private readonly handle: fs.FileHandle,
    private readonly full: string,
    public size: number,
  ) {}

  async write(chunk: Uint8Array): Promise<void> {
    if (this.closed) throw new Error('write after close');
    let offset = 0;
    while (offset < chunk.length) {
      const { bytesWritten } = await this.handle.write(chunk, offset, chunk.length - offset);
      offset += bytesWritten;
    }
    this.size += chunk.length;
  }

  async writev(chunks: readonly Uint8Array[]): Promise<void> {
    if (this.closed) throw new Error('write after close');
    let pending = chunks.filter((c) => c.length > 0);
    while (pending.length > 0) {
      const { bytesWritten } = await this.handle.writev(pending as Uint8Array[]);
      this.size += bytesWritten;
      // A short write: drop what went out and go on with the rest.
      let left = bytesWritten;
      while (pending.length > 0 && left >= pending[0]!.length) {
        left -= pending[0]!.length;
        pending = pending.slice(1);
      }
      if (left > 0) pending = [pending[0]!.subarray(left), ...pending.slice(1)];
    }
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.handle.close();
  }

  async cancel(): Promise<void> {
    await this.close();
    await fs.rm(this.full, { force: true });
  }
}

/**
 * Removes the temporary files (`*.tmp-<uuid>`) in a directory untouched for STALE_TMP_MS;
 * resolves to true when the directory held nothing else (it may be empty now).
 */
async function removeStaleTemporaries(dir: string): Promise<boolean> {
  const entries = await fs.readdir(dir).catch(() => [] as string[]);
  const cutoff = Date.now() - STALE_TMP_MS;
  let onlyStale = true;
  for (const name of entries) {
    const file = path.join(dir, name);
    const info = name.includes('.tmp-') ? await fs.stat(file).catch(() => undefined) : undefined;
    if (info?.isFile() && info.mtimeMs < cutoff) await fs.rm(file, { force: true });
    else onlyStale = false;
  }
  return onlyStale;
}

async function exists(p: string): Promise<boolean> {
  return fs.access(p).then(
    () => true,
    () => false,
  );
}

function isNotFound(err: unknown): boolean {
  return (err as NodeJS.ErrnoException)?.code === 'ENOENT';
}

function notFound(err: unknown, p: string): unknown {
  return isNotFound(err) ? new PathNotFoundError(p) : err;
}
