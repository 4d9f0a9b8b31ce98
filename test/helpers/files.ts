/** Files of a test's storage, as the tests look at them. */
import { createHash } from 'node:crypto';
import { existsSync, readdirSync, readFileSync, statSync } from 'node:fs';
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
  const { hex } = parseDigest(digest);
  return join(root, 'blobs', 'sha256', hex.slice(0, 2), hex, 'data');
}
