import { execFile } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';

import { expect } from 'vitest';
import { parseDigest } from '../../src/oci/digest.js';
import type { Image } from './images.js';

const run = promisify(execFile);

/** Runs skopeo against plain-HTTP registries; rejects with its stderr on failure. */
export async function skopeo(...args: string[]): Promise<string> {
  try {
    const { stdout } = await run('skopeo', ['--insecure-policy', ...args], {
      timeout: 120_000,
      maxBuffer: 64 * 1024 * 1024,
    });
    return stdout;
  } catch (err) {
    const e = err as { stderr?: string; message: string };
    throw new Error(`skopeo ${args.join(' ')} failed: ${e.stderr || e.message}`);
  }
}

/** `skopeo copy docker://HOST/REF dir:DEST` from an insecure (http) registry. */
export function skopeoCopy(
  host: string,
  ref: string,
  dest: string,
  ...extra: string[]
): Promise<string> {
  return skopeo(
    'copy',
    '--src-tls-verify=false',
    ...extra,
    `docker://${host}/${ref}`,
    `dir:${dest}`,
  );
}

/** skopeo's dir: transport holds the image's manifest and every blob, byte for byte. */
export function expectDirHolds(dir: string, image: Image): void {
  expect(readFileSync(join(dir, 'manifest.json')).equals(image.manifest)).toBe(true);
  for (const blob of image.blobs) {
    expect(readFileSync(join(dir, parseDigest(blob.digest).hex)).equals(blob.bytes)).toBe(true);
  }
}
