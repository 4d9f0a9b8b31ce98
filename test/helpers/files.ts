/** Files of a test's storage, as the tests look at them. */
import { createHash } from 'node:crypto';
import {
  closeSync,
  existsSync,
  openSync,
  readdirSync,
  readFileSync,
  statSync,
  writeSync,
} from 'node:fs';
import { join, relative } from 'node:path';
import { parseDigest } from '../../src/oci/digest.js';

/** Every file under a directory with the sha256 of its content: a snapshot to compare. */
export function snapshot(dir: string): Record<string, string> {
  const out: Record<string, string> = {};
  const walk = (d: string) => {
    if (!existsSync(d)) return;
    for (const name of readdirSync(d)) {
      const p = join(d, name);
      if (statSync(p).isDirectory()) walk(p);
      else out[relative(dir, p)] = createHash('sha256').update(readFileSync(p)).digest('hex');
    }
  };
  walk(dir);
  return out;
}

/** Where the filesystem driver keeps a blob's bytes under a storage root (src/storage/paths.ts). */
export function storedBlobPath(root: string, digest: string): string {
  const { algorithm, hex } = parseDigest(digest);
  return join(root, 'blobs', algorithm, hex.slice(0, 2), hex, 'data');
}

/** Takes every byte left on the file system holding `path` (a small tmpfs), into that file. */
export function fillDisk(path: string): void {
  const fd = openSync(path, 'w');
  const chunk = Buffer.alloc(1024 * 1024);
  try {
    for (;;) writeSync(fd, chunk);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOSPC') throw err;
  }
  try {
    for (;;) writeSync(fd, chunk, 0, 4096);
  } catch {
    // full to the last block
  } finally {
    closeSync(fd);
  }
}
