/**
 * Where a bundle is written to and read from: a file, or a stream (standard output and input, by
 * the `-` convention). A file is written under a temporary name beside it and renamed over the
 * name asked for only once it is complete, so a failed export leaves no partial file behind and an
 * older bundle of the same name untouched. Failures are told in a user's words ("no such
 * directory"), as BundleError.
 */
import { randomBytes } from 'node:crypto';
import { open, rename, rm, stat, type FileHandle } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import type { Readable, Writable } from 'node:stream';

/** A bundle that cannot be written, read or used; the message says why. The CLI exits 1 with it. */
export class BundleError extends Error {
  override name = 'BundleError';
}

/** Where to write a bundle: a file, or an open stream (`name` says which, in messages). */
export type BundleTarget = { path: string } | { stream: Writable; name: string };

/** Where to read a bundle from: a file, or an open stream (`name` says which, in messages). */
export type BundleSource = { path: string } | { stream: Readable; name: string };

export interface OpenedTarget {
  name: string;
  stream: Writable;
  /** After the stream has finished: makes the bundle visible under its name. */
  commit(): Promise<void>;
  /** After a failure: removes what was written (a file's temporary name; nothing of a stream). */
  discard(): Promise<void>;
}

/** Opens a target for writing; throws BundleError when it cannot be written at all. */
export async function openTarget(target: BundleTarget): Promise<OpenedTarget> {
  if ('stream' in target)
    return {
      name: target.name,
      stream: target.stream,
      commit: async () => {},
      discard: async () => {},
    };
  const { path } = target;
  const existing = await stat(path).catch(() => undefined);
  if (existing?.isDirectory()) throw new BundleError(`cannot write ${path}: it is a directory`);
  const partial = join(
    dirname(path),
    `.${basename(path)}.${randomBytes(4).toString('hex')}.partial`,
  );
  let handle: FileHandle;
  try {
    handle = await open(partial, 'wx', 0o644);
  } catch (err) {
    throw cannotWrite(path, err, true);
  }
  // flush: synced before it is closed, so the bundle is on the disk before it has its name.
  const stream = handle.createWriteStream({ flush: true });
  return {
    name: path,
    stream,
    async commit() {
      try {
        await rename(partial, path);
      } catch (err) {
        await rm(partial, { force: true });
        throw cannotWrite(path, err);
      }
    },
    async discard() {
      stream.destroy();
      await rm(partial, { force: true });
    },
  };
}

/** Opens a source for reading; throws BundleError when it cannot be read at all. */
export async function openSource(
  source: BundleSource,
): Promise<{ name: string; stream: Readable }> {
  if ('stream' in source) return { name: source.name, stream: source.stream };
  try {
    const handle = await open(source.path, 'r');
    return { name: source.path, stream: handle.createReadStream() };
  } catch (err) {
    throw cannotRead(source.path, err);
  }
}

/** `cannot write NAME: REASON`; `creating` when the file did not exist yet (ENOENT: its directory). */
export function cannotWrite(name: string, err: unknown, creating = false): BundleError {
  return new BundleError(`cannot write ${name}: ${reason(err, creating)}`);
}

export function cannotRead(name: string, err: unknown): BundleError {
  return new BundleError(`cannot read ${name}: ${reason(err, false)}`);
}

/**
 * `cannot write to storage WHERE: REASON`, for a storage failure met while importing (a full
 * disk is the storage's, not the bundle's); a BundleError is passed on as it is.
 */
export function cannotStore(where: string, err: unknown): BundleError {
  if (err instanceof BundleError) return err;
  return new BundleError(`cannot write to storage ${where}: ${reason(err, false)}`);
}

function reason(err: unknown, creating: boolean): string {
  switch ((err as NodeJS.ErrnoException).code) {
    case 'ENOENT':
      return creating ? 'no such directory' : 'no such file';
    case 'ENOTDIR':
      return 'a part of the path is not a directory';
    case 'EACCES':
    case 'EPERM':
      return 'permission denied';
    case 'EISDIR':
      return 'it is a directory';
    case 'ENOSPC':
      return 'no space left on the device';
    case 'EDQUOT':
      return 'disk quota exceeded';
    case 'EFBIG':
      return 'file too large';
    case 'EROFS':
      return 'read-only file system';
    case 'EPIPE':
    case 'ECONNRESET':
      return 'the reader closed it';
    default:
      return (err as Error).message;
  }
}
