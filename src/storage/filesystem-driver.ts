/** The filesystem StorageDriver: one directory tree under `root`. */
import { randomUUID } from 'node:crypto';
import { constants } from 'node:fs';
import * as fs from 'node:fs/promises';
import * as path from 'node:path';
import { FileRange } from './file-range.js';
import { PathNotFoundError, type FileInfo, type FileWriter, type StorageDriver } from './types.js';

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
    const tmp = `${full}.tmp-${randomUUID()}`;
    // Twice at most: an eviction may prune the (empty) directory between mkdir and the write.
    for (let attempt = 1; ; attempt++) {
      await fs.mkdir(path.dirname(full), { recursive: true });
      try {
        await fs.writeFile(tmp, content);
        await fs.rename(tmp, full);
        return;
      } catch (err) {
        await fs.rm(tmp, { force: true });
        if (attempt === 2 || !isNotFound(err)) throw err;
      }
    }
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
      await fs.rmdir(full).catch(() => {});
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
    // Written whole under a temporary name, then linked into place: link() fails when the name
    // exists, so no reader ever sees a half-written file and only one creator wins.
    const tmp = `${full}.tmp-${randomUUID()}`;
    await fs.writeFile(tmp, content);
    try {
      await fs.link(tmp, full);
      return true;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'EEXIST') return false;
      throw err;
    } finally {
      await fs.rm(tmp, { force: true });
    }
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

function isNotFound(err: unknown): boolean {
  return (err as NodeJS.ErrnoException)?.code === 'ENOENT';
}

function notFound(err: unknown, p: string): unknown {
  return isNotFound(err) ? new PathNotFoundError(p) : err;
}
