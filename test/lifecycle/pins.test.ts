/**
 * The pins kept in storage (`lifecycle/pins.json`, src/lifecycle/pins.ts): a file that cannot be
 * read is kept as it is, never saved over, and said so at error level.
 */
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, expect, test } from 'vitest';
import { Pins, PinsUnreadableError } from '../../src/lifecycle/pins.js';
import type { ImageRef } from '../../src/lifecycle/types.js';
import { parseRepository, parseTag } from '../../src/oci/reference.js';
import { FilesystemDriver } from '../../src/storage/filesystem-driver.js';
import { capturedLog } from '../helpers/pullcache.js';

const ref = (repository: string, tag: string): ImageRef => ({
  upstream: 'docker.io',
  repository: parseRepository(repository),
  tag: parseTag(tag),
  reference: `docker.io/${repository}:${tag}`,
});

let root: string;
beforeEach(() => {
  root = mkdtempSync(join(tmpdir(), 'pullcache-pins-'));
});
afterEach(() => rmSync(root, { recursive: true, force: true }));

test('an unreadable pins file is kept as it is: pin and unpin are refused, the pins last read stay, and the log says so once', async () => {
  const file = join(root, 'lifecycle', 'pins.json');
  const { log, lines } = capturedLog('info');
  const pins = new Pins(new FilesystemDriver(root), [], log);
  await pins.add([ref('org/a', 'v1'), ref('org/b', 'v1')]);
  expect(pins.list()).toEqual(['docker.io/org/a:v1', 'docker.io/org/b:v1']);

  // Torn (a power loss), or edited by hand into something else.
  for (const content of ['', '[{"upstream":"docker.io","repository":"org/a"', '{"pins":[]}']) {
    writeFileSync(file, content);
    await pins.load();
    // The pins read before stay in force.
    expect(pins.list()).toEqual(['docker.io/org/a:v1', 'docker.io/org/b:v1']);
    await expect(pins.add([ref('org/c', 'v1')])).rejects.toBeInstanceOf(PinsUnreadableError);
    await expect(pins.remove([ref('org/a', 'v1')])).rejects.toThrow(
      /pins file \(lifecycle\/pins\.json in storage\) cannot be read .*fix it or remove it/,
    );
    // Never saved over: what the operator has to recover is still there.
    expect(readFileSync(file, 'utf8')).toBe(content);
  }
  // One error per content, however often it is read.
  await pins.load();
  const errors = lines.filter((l) => l.level === 50);
  expect(errors.length).toBe(3);
  expect(errors[0]).toMatchObject({ file: 'lifecycle/pins.json', reason: 'it is empty' });
  expect(String(errors[0]!.msg)).toMatch(/pins file cannot be read/);

  // A process that never read it whole has no pins from it, and refuses the same.
  const fresh = new Pins(new FilesystemDriver(root), [ref('org/conf', 'v1')], log);
  await fresh.load();
  expect(fresh.list()).toEqual(['docker.io/org/conf:v1']);
  await expect(fresh.add([ref('org/c', 'v1')])).rejects.toBeInstanceOf(PinsUnreadableError);
  expect(readFileSync(file, 'utf8')).toBe('{"pins":[]}');

  // Fixed by hand: read again, and pinning works on it.
  writeFileSync(file, JSON.stringify([ref('org/b', 'v1')]));
  await pins.add([ref('org/c', 'v1')]);
  expect(pins.list()).toEqual(['docker.io/org/b:v1', 'docker.io/org/c:v1']);
  // Removed by hand: no pins, and pinning starts afresh.
  rmSync(file);
  await pins.add([ref('org/d', 'v1')]);
  expect(pins.list()).toEqual(['docker.io/org/d:v1']);
});
