/**
 * The storage half of the readiness probe (Runtime.probe, /readyz): whether storage takes a
 * write, and if not, a reason fit to show (it names no path) and whether the disk is full.
 */
import { mkdir } from 'node:fs/promises';
import { dirname } from 'node:path';
import type { Reachability } from './metadata/keyv-cache.js';
import { StorageUnavailableError } from './storage/errors.js';
import type { StorageDriver } from './storage/types.js';

const FS_REASONS: Record<string, string> = {
  EACCES: 'permission denied',
  EPERM: 'operation not permitted',
  EROFS: 'read-only file system',
  ENOTDIR: 'part of the path is a file, not a directory',
  ENOSPC: 'no space left on device',
  EDQUOT: 'disk quota exceeded',
};

/**
 * Whether storage takes a write, as every pull needs: its root is a directory (made if missing)
 * and a file can be written in it, through the driver. The reason names no path, so that
 * /readyz can show it.
 */
export async function probeStorage(
  driver: StorageDriver,
  root: string,
): Promise<Reachability & { full?: boolean }> {
  try {
    const info = await driver.stat('');
    if (info && !info.isDirectory) return { ok: false, reason: 'it is a file, not a directory' };
    if (!info) await makeDirectory(root);
    await driver.putContent('.readyz', String(Date.now()));
    return { ok: true };
  } catch (err) {
    if (err instanceof StorageUnavailableError) return { ok: false, reason: err.message };
    const code = (err as NodeJS.ErrnoException).code;
    const known = code === undefined ? undefined : FS_REASONS[code];
    return {
      ok: false,
      reason: known ? `${known} (${code})` : (code ?? 'unexpected error'),
      ...(code === 'ENOSPC' || code === 'EDQUOT' ? { full: true } : {}),
    };
  }
}

/**
 * mkdir -p that fails with the real reason: Node's recursive mkdir reports ENOENT where a parent
 * cannot be made (a read-only file system, no permission), so each missing directory is made
 * in turn.
 */
async function makeDirectory(dir: string): Promise<void> {
  try {
    await mkdir(dir);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'EEXIST') return;
    if (code !== 'ENOENT' || dirname(dir) === dir) throw err;
    await makeDirectory(dirname(dir));
    await mkdir(dir).catch((again: NodeJS.ErrnoException) => {
      if (again.code !== 'EEXIST') throw again;
    });
  }
}
