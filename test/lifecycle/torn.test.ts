/**
 * TornBlobs on its own, over a stand-in store that counts what it opens: a blob found whole at a
 * size its manifest does not give it is not hashed again at the next counts, and is forgotten
 * once a count no longer names it (it kept one entry per such blob for ever). The torn blobs of a
 * real store, crashed: crash.test.ts and recount.test.ts.
 */
import { randomBytes } from 'node:crypto';
import { Readable } from 'node:stream';
import { expect, test } from 'vitest';
import { TornBlobs } from '../../src/lifecycle/torn.js';
import type { Removal } from '../../src/lifecycle/removal.js';
import type { Suspect } from '../../src/lifecycle/scan.js';
import { silentLogger } from '../../src/log/logger.js';
import { digestOf, type Digest } from '../../src/oci/digest.js';
import type { BlobStore } from '../../src/storage/types.js';

test('a good blob of another size than its manifest says is hashed once while counts name it, and again only after they stopped', async () => {
  const bytes = new Map<Digest, Buffer>();
  const opened: Digest[] = [];
  const blobs = {
    open: async (digest: Digest) => {
      opened.push(digest);
      const b = bytes.get(digest)!;
      return { found: true, descriptor: { digest, size: b.length }, stream: Readable.from([b]) };
    },
  } as unknown as BlobStore;
  const removed: Digest[] = [];
  const removal = {
    removeTorn: async (digest: Digest) => {
      removed.push(digest);
      return true;
    },
  } as unknown as Removal;
  const torn = new TornBlobs(blobs, removal, () => true, silentLogger());
  torn.enable();
  const suspects: Suspect[] = Array.from({ length: 50 }, () => {
    const b = randomBytes(100);
    const digest = digestOf(b);
    bytes.set(digest, b);
    return { digest, size: b.length, expected: 200 }; // the manifest is wrong, the blob whole
  });
  const count = async (found: Suspect[]) => {
    torn.found(found);
    await torn.idle();
  };

  await count(suspects);
  expect(opened).toHaveLength(50);
  await count(suspects);
  expect(opened).toHaveLength(50); // known whole: not read again
  // A count that names only the first: the others are forgotten (evicted, their manifests gone).
  await count(suspects.slice(0, 1));
  expect(opened).toHaveLength(50);
  await count(suspects);
  expect(opened).toHaveLength(99); // the 49 forgotten are read again, the first is not
  expect(removed).toEqual([]);
});
