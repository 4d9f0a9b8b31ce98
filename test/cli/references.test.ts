/**
 * The image references and upstream names of a command line, as a newcomer types them: one the
 * command cannot use (malformed, or a registry host that is not a configured upstream, or an
 * `ls --upstream` that is not one) is the command used wrongly: exit 2, one line each on stderr,
 * before any work. Before, a typo looked like an empty cache, or a failure found halfway, or
 * went to the default upstream.
 */
import { existsSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { cli, configFile, hasStackTrace, tmp } from '../helpers/cli.js';
import { storedBlobPath } from '../helpers/files.js';
import { makeImage, pushImage, type Image } from '../helpers/images.js';
import { startPullcache } from '../helpers/pullcache.js';
import { Recorder } from '../helpers/recorder.js';
import { TestRegistry } from '../helpers/registry.js';

const CONFIGURED = '(configured: docker.io, ghcr.io)';

let registry: TestRegistry;
let recorder: Recorder;
let image: Image;
let root: string;
let config: string;

beforeAll(async () => {
  registry = await TestRegistry.start();
  image = makeImage('org/a', 'v1', 'oci', [20_000]);
  await pushImage(registry, image);
  recorder = await Recorder.start(registry.url);
  root = tmp('root');
  config = configFile(root, {
    'docker.io': { url: recorder.url },
    'ghcr.io': { url: 'http://registry.invalid' },
  });
});
afterAll(async () => {
  await recorder?.close();
  await registry?.close();
  rmSync(root, { recursive: true, force: true });
});

/** Exit 2, nothing on stdout, and exactly these lines on stderr. */
function expectUsageError(
  r: { code: number | null; stdout: Buffer; stderr: string },
  lines: (RegExp | string)[],
) {
  expect(hasStackTrace(r.stderr)).toBe(false);
  expect(r.stdout.toString()).toBe('');
  const said = r.stderr.split('\n').slice(0, -1);
  expect(said, r.stderr).toHaveLength(lines.length);
  lines.forEach((line, i) =>
    typeof line === 'string'
      ? expect(said[i], r.stderr).toBe(line)
      : expect(said[i], r.stderr).toMatch(line),
  );
  expect(r.code, r.stderr).toBe(2);
}

/** How many of the image's manifest and blobs storage holds: none after a refused command. */
const stored = () =>
  [image.digest, ...image.blobs.map((b) => b.digest)].filter((d) =>
    existsSync(storedBlobPath(root, d)),
  ).length;

describe('ls --upstream', () => {
  test('an upstream not configured is a usage error naming the configured ones', async () => {
    for (const json of [[], ['--json']]) {
      const r = await cli('ls', '-c', config, '--upstream', 'nope', ...json);
      expectUsageError(r, [`pullcache: no upstream nope is configured ${CONFIGURED}`]);
    }
    // A configured one with nothing cached is still an empty list.
    const empty = await cli('ls', '-c', config, '--upstream', 'ghcr.io', '--json');
    expect(empty.code, empty.stderr).toBe(0);
    expect(JSON.parse(empty.stdout.toString())).toEqual([]);
  });
});

describe('malformed references', () => {
  const invalid = (reference: string) =>
    new RegExp(`^pullcache: invalid reference ${JSON.stringify(reference)}: invalid .+$`);

  test('prefetch refuses every one, once each, before it fetches any image', async () => {
    const before = recorder.requests.length;
    const r = await cli('prefetch', '-c', config, 'org/a:v1', 'Alpine:3.20', '::bad');
    expectUsageError(r, [invalid('Alpine:3.20'), invalid('::bad')]);
    // The good reference was not fetched either: nothing reached the upstream or storage.
    expect(recorder.requests.length).toBe(before);
    expect(stored()).toBe(0);

    // The same for the references of a file.
    const file = join(tmp('refs'), 'images.txt');
    writeFileSync(file, 'org/a:v1\nNope:1 # a typo\n');
    const f = await cli('prefetch', '-c', config, '-f', file);
    expectUsageError(f, [invalid('Nope:1')]);
    expect(recorder.requests.length).toBe(before);
  });

  test('pin, unpin, rm and export refuse them: exit 2, one line each', async () => {
    for (const args of [
      ['pin', '::bad'],
      ['unpin', 'org/a:v1', 'Bad:ref'],
      ['rm', 'org/a@sha256:nothex', '--dry-run'],
    ]) {
      const r = await cli(args[0]!, '-c', config, ...args.slice(1));
      expectUsageError(r, [/^pullcache: invalid reference ".+": invalid .+$/]);
    }
    const output = join(tmp('export'), 'b.tar');
    const e = await cli('export', '-c', config, '-o', output, 'Bad:ref');
    expectUsageError(e, [invalid('Bad:ref')]);
    expect(existsSync(output)).toBe(false);
  });

  test('beside a running server, refused before its admin API is asked', async () => {
    const serverRoot = tmp('served');
    const pc = await startPullcache(
      { upstreams: { 'docker.io': { url: recorder.url } } },
      serverRoot,
    );
    try {
      const served = configFile(serverRoot, { 'docker.io': { url: recorder.url } });
      const r = await cli('pin', '-c', served, '::bad');
      expectUsageError(r, [invalid('::bad')]);
      expect(await pc.runtime.lifecycle.pinned()).toEqual([]);
    } finally {
      await pc.stop();
      rmSync(serverRoot, { recursive: true, force: true });
    }
  });
});

describe('a registry host that is not a configured upstream', () => {
  const noUpstream = (name: string) => `pullcache: no upstream ${name} is configured ${CONFIGURED}`;

  test('prefetch refuses it rather than asking the default upstream for it', async () => {
    const before = recorder.requests.length;
    const r = await cli('prefetch', '-c', config, 'nosuch.io/foo:1');
    expectUsageError(r, [noUpstream('nosuch.io')]);
    expect(recorder.requests.length).toBe(before);
  });

  test('export, pin, unpin and rm refuse it: a dot, a port, or localhost', async () => {
    const output = join(tmp('export'), 'b.tar');
    for (const args of [
      ['export', '-o', output, 'quay.io/org/app:v1'],
      ['pin', 'localhost:5000/foo:1'],
      ['unpin', 'localhost/foo'],
      ['rm', '--dry-run', 'registry.example.com/org/app'],
    ]) {
      const r = await cli(args[0]!, '-c', config, ...args.slice(1));
      const host = args.at(-1)!.split('/')[0]!;
      expectUsageError(r, [noUpstream(host)]);
    }
    expect(existsSync(output)).toBe(false);
  });

  test('a configured upstream, or a plain name, is taken as before', async () => {
    const pin = await cli('pin', '-c', config, 'ghcr.io/org/app:v1', 'org/a:v1');
    expect(pin.stderr).toBe('');
    expect(pin.code).toBe(0);
    expect(pin.stdout.toString()).toBe('pinned: ghcr.io/org/app:v1, org/a:v1\n');
    const unpin = await cli('unpin', '-c', config, 'ghcr.io/org/app:v1', 'org/a:v1');
    expect(unpin.code, unpin.stderr).toBe(0);
  });
});

test('without routing.default, a reference must name an upstream', async () => {
  const two = configFile(tmp('root'), {
    'ghcr.io': { url: 'http://registry.invalid' },
    'quay.io': { url: 'http://registry.invalid' },
  });
  const r = await cli('pin', '-c', two, 'org/a:v1');
  expectUsageError(r, [
    'pullcache: "org/a:v1" names no upstream, and there is no routing.default ' +
      '(configured: ghcr.io, quay.io)',
  ]);
});
