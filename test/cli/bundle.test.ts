/**
 * `pullcache export` and `import` as a user runs them: to and from files, through a pipe, into a
 * cache whose upstreams have other names, and when something goes wrong. Real parts throughout:
 * a real upstream registry for the prefetch, the real command in a child process, real storage,
 * and skopeo pulling what was imported.
 */
import { spawn } from 'node:child_process';
import {
  readFileSync,
  readdirSync,
  rmSync,
  statSync,
  truncateSync,
  utimesSync,
  writeFileSync,
} from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test, vi } from 'vitest';
import { makeImage, pushImage, type Image } from '../helpers/images.js';
import { startPullcache } from '../helpers/pullcache.js';
import { TestRegistry } from '../helpers/registry.js';
import { expectDirHolds, skopeoCopy } from '../helpers/skopeo.js';
import {
  PULLCACHE,
  cli,
  cliIn,
  configFile,
  hasStackTrace,
  quote,
  sh,
  tmp,
} from '../helpers/cli.js';
import { snapshot, storedBlobPath } from '../helpers/files.js';

/** A tar archive's entries, with their sizes, in order. */
function tarFiles(bytes: Buffer): { name: string; size: number }[] {
  const files: { name: string; size: number }[] = [];
  for (let at = 0; at + 512 <= bytes.length;) {
    const header = bytes.subarray(at, at + 512);
    if (header.every((b) => b === 0)) break;
    const name = header.subarray(0, 100).toString('utf8').replace(/\0.*$/s, '');
    const size = parseInt(header.subarray(124, 136).toString('utf8').replace(/\0.*$/s, ''), 8);
    files.push({ name, size });
    at += 512 + Math.ceil(size / 512) * 512;
  }
  return files;
}

/** The names of a tar archive's entries, in order. */
function tarEntries(bytes: Buffer): string[] {
  const names: string[] = [];
  for (let at = 0; at + 512 <= bytes.length;) {
    const header = bytes.subarray(at, at + 512);
    if (header.every((b) => b === 0)) break;
    names.push(header.subarray(0, 100).toString('utf8').replace(/\0.*$/s, ''));
    const size = parseInt(header.subarray(124, 136).toString('utf8').replace(/\0.*$/s, ''), 8);
    at += 512 + Math.ceil(size / 512) * 512;
  }
  return names;
}

const offline = { url: 'http://registry.invalid' };

describe('export and import', () => {
  let registry: TestRegistry;
  let alpine: Image;
  let app: Image;
  const cache = tmp('cache');
  let config: string;
  /** Every image in the cache: docker.io/library/alpine:3.20 and lab.local/org/app:v1. */
  let bundle: string;
  /** Only lab.local/org/app:v1. */
  let labBundle: string;

  beforeAll(async () => {
    registry = await TestRegistry.start();
    alpine = makeImage('library/alpine', '3.20', 'docker', [600_000, 20_000]);
    app = makeImage('org/app', 'v1', 'oci', [40_000, 5_000]);
    for (const image of [alpine, app]) await pushImage(registry, image);
    config = configFile(cache, {
      'docker.io': { url: registry.url },
      'lab.local': { url: registry.url },
    });
    const prefetched = await cli('prefetch', '-c', config, 'alpine:3.20', 'lab.local/org/app:v1');
    expect(prefetched.stderr).toContain('2 of 2 images complete');
    await registry.stop();
    bundle = join(tmp('bundle'), 'all.tar');
    labBundle = join(tmp('bundle'), 'lab.tar');
    expect((await cli('export', '-c', config, '-o', bundle, '--all')).code).toBe(0);
    expect((await cli('export', '-c', config, '-o', labBundle, 'lab.local/org/app:v1')).code).toBe(
      0,
    );
  });
  afterAll(async () => registry?.close());

  describe('export', () => {
    test('into a directory that does not exist fails in one line and writes nothing', async () => {
      const parent = tmp('out');
      const output = join(parent, 'missing', 'b.tar');
      const r = await cli('export', '-c', config, '-o', output, '--all');
      expect(r.code).toBe(1);
      expect(r.stderr).toBe(`pullcache: cannot write ${output}: no such directory\n`);
      expect(readdirSync(parent)).toEqual([]);
    });

    test('that fails while writing leaves no partial file behind', async () => {
      const dir = tmp('out');
      const output = join(dir, 'b.tar');
      // A file size limit of 100 KiB (200 blocks of 512 bytes), a third of the bundle: the write that passes it fails (EFBIG), like a full disk.
      const r = await sh(
        `ulimit -f 200; exec $PULLCACHE export -c ${quote(config)} -o ${quote(output)} --all`,
      );
      expect(r.code).toBe(1);
      expect(r.stderr).toMatch(
        new RegExp(`\\npullcache: cannot write ${output}: file too large\\n$`),
      );
      expect(hasStackTrace(r.stderr)).toBe(false);
      expect(readdirSync(dir)).toEqual([]);
    });

    test('over an existing bundle replaces it only when the new one is complete', async () => {
      const dir = tmp('out');
      const output = join(dir, 'b.tar');
      writeFileSync(output, 'the old bundle');
      const failed = await sh(
        `ulimit -f 200; exec $PULLCACHE export -c ${quote(config)} -o ${quote(output)} --all`,
      );
      expect(failed.code).toBe(1);
      expect(readdirSync(dir)).toEqual(['b.tar']);
      expect(readFileSync(output, 'utf8')).toBe('the old bundle');
      const r = await cli('export', '-c', config, '-o', output, '--all');
      expect(r.code).toBe(0);
      expect(readFileSync(output).equals(readFileSync(bundle))).toBe(true);
    });

    test('says it exported each blob (it fetches nothing)', async () => {
      const r = await cli('export', '-c', config, '-o', join(tmp('out'), 'b.tar'), '--all');
      expect(r.code).toBe(0);
      expect(r.stderr).toMatch(/exported sha256:[a-f0-9]{12}/);
      expect(r.stderr).not.toContain('fetched');
    });

    test('-o - writes the bundle, and only the bundle, to standard output', async () => {
      const cwd = tmp('cwd');
      const r = await cliIn(cwd, 'export', '-c', config, '-o', '-', '--all');
      expect(r.code).toBe(0);
      expect(r.stdout.equals(readFileSync(bundle))).toBe(true);
      expect(r.stderr).toMatch(/wrote the bundle to standard output: 2 images, 8 blobs/);
      expect(readdirSync(cwd)).toEqual([]);
    });

    test('names every image before its blobs, so an import can refuse it before reading them', () => {
      const entries = tarEntries(readFileSync(bundle));
      expect(entries.slice(0, 2)).toEqual(['oci-layout', 'index.json']);
      expect(entries.slice(2).every((e) => e.startsWith('blobs/sha256/'))).toBe(true);
    });

    test('-o - refuses to write a bundle to a terminal', async () => {
      // script(1) runs the command with a terminal as its standard input and output.
      const command = `$PULLCACHE export -c ${quote(config)} -o - --all`;
      const r = await sh(`exec script -qec ${quote(command)} /dev/null`);
      expect(r.code).toBe(1);
      expect(r.stdout.toString()).toContain(
        'pullcache: refusing to write a bundle to a terminal: redirect standard output',
      );
    });

    test('to a reader that goes away fails in one line', async () => {
      // sh reports a pipeline's last command: export's own exit code is echoed.
      const r = await sh(
        `{ $PULLCACHE export -c ${quote(config)} -o - --all; echo "exit $?" >&2; } | head -c 1000 >/dev/null`,
      );
      expect(r.stderr).toMatch(
        /(^|\n)pullcache: cannot write standard output: the reader closed it\nexit 1\n$/,
      );
      expect(hasStackTrace(r.stderr)).toBe(false);
    });
  });

  describe('import', () => {
    test('- reads a bundle from a pipe: export -o - | import -, and the cache serves it', async () => {
      const root = tmp('piped');
      const upstreams = { 'docker.io': offline, 'lab.local': offline };
      const target = configFile(root, upstreams);
      const r = await sh(
        `$PULLCACHE export -c ${quote(config)} -o - --all | $PULLCACHE import -c ${quote(target)} -`,
      );
      expect(r.code).toBe(0);
      expect(r.stderr).toMatch(/wrote the bundle to standard output: 2 images/);
      expect(r.stderr).toMatch(/imported the bundle from standard input: 2 images/);
      const pc = await startPullcache({ upstreams }, root);
      try {
        const d1 = tmp('pull');
        await skopeoCopy(pc.host, 'alpine:3.20', d1);
        expectDirHolds(d1, alpine);
        const d2 = tmp('pull');
        await skopeoCopy(pc.host, 'lab.local/org/app:v1', d2);
        expectDirHolds(d2, app);
      } finally {
        await pc.stop();
      }
    });

    test('- refuses to read a bundle from a terminal', async () => {
      const target = configFile(tmp('root'), { 'docker.io': offline });
      const r = await sh(
        `exec script -qec ${quote(`$PULLCACHE import -c ${quote(target)} -`)} /dev/null`,
      );
      expect(r.code).toBe(1);
      expect(r.stdout.toString()).toContain(
        'pullcache: refusing to read a bundle from a terminal: redirect standard input',
      );
    });

    test('of a bundle whose upstream is not configured is refused, naming it, and writes nothing', async () => {
      const root = tmp('root');
      const r = await cli('import', '-c', configFile(root, { 'docker.io': offline }), labBundle);
      expect(r.code).toBe(1);
      expect(r.stderr).toBe(
        `pullcache: ${labBundle}: its images are from upstream lab.local, which is not configured here (configured: docker.io); add it, or map it with --upstream-map lab.local=<upstream>\n`,
      );
      expect(snapshot(root)).toEqual({});
      expect(readdirSync(root).filter((d) => d !== 'uploads')).toEqual([]);
    });

    test('of a bundle read to its end before the missing upstream is known writes nothing', async () => {
      // A bundle from another tool may name its images last: the refusal then comes after the
      // blobs were read and staged, and the staged uploads are removed.
      const bytes = readFileSync(labBundle);
      const entries = tarEntries(bytes);
      expect(entries[1]).toBe('index.json');
      const indexSize = Number.parseInt(bytes.subarray(1024 + 124, 1024 + 136).toString(), 8);
      const layoutEnd = 1024;
      const indexEnd = layoutEnd + 512 + Math.ceil(indexSize / 512) * 512;
      const end = bytes.length - 1024;
      const reordered = Buffer.concat([
        bytes.subarray(0, layoutEnd),
        bytes.subarray(indexEnd, end),
        bytes.subarray(layoutEnd, indexEnd),
        bytes.subarray(end),
      ]);
      expect(tarEntries(reordered).at(-1)).toBe('index.json');
      const file = join(tmp('bundle'), 'index-last.tar');
      writeFileSync(file, reordered);
      const root = tmp('root');
      const r = await cli('import', '-c', configFile(root, { 'docker.io': offline }), file);
      expect(r.code).toBe(1);
      expect(r.stderr).toContain('upstream lab.local, which is not configured here');
      expect(snapshot(root)).toEqual({});
    });

    test('of a bundle for a passthrough upstream is refused: nothing would serve it', async () => {
      const root = tmp('root');
      const target = configFile(root, { 'lab.local': { ...offline, mode: 'passthrough' } });
      const r = await cli('import', '-c', target, labBundle);
      expect(r.code).toBe(1);
      expect(r.stderr).toContain(
        'its images are from upstream lab.local, which is a passthrough upstream here (nothing is cached for it)',
      );
      expect(snapshot(root)).toEqual({});
    });

    test('--upstream-map puts a bundle upstream under a configured one, and the cache serves it', async () => {
      const root = tmp('root');
      const upstreams = { 'registry.internal': offline };
      const r = await cli(
        'import',
        '-c',
        configFile(root, upstreams),
        '--upstream-map',
        'lab.local=registry.internal',
        labBundle,
      );
      expect(r.code).toBe(0);
      expect(r.stderr).toMatch(/1 tags set/);
      const pc = await startPullcache({ upstreams }, root);
      try {
        const dir = tmp('pull');
        await skopeoCopy(pc.host, 'registry.internal/org/app:v1', dir);
        expectDirHolds(dir, app);
      } finally {
        await pc.stop();
      }
    });

    test('--upstream-map takes several mappings, repeated or comma-separated', async () => {
      const upstreams = { 'a.internal': offline, 'b.internal': offline };
      for (const maps of [
        ['--upstream-map', 'docker.io=a.internal,lab.local=b.internal'],
        ['--upstream-map', 'docker.io=a.internal', '--upstream-map', 'lab.local=b.internal'],
      ]) {
        const root = tmp('root');
        const r = await cli('import', '-c', configFile(root, upstreams), ...maps, bundle);
        expect(r.code, maps.join(' ')).toBe(0);
        const pc = await startPullcache({ upstreams }, root);
        try {
          const accept = 'application/vnd.docker.distribution.manifest.v2+json';
          const a = await fetch(`${pc.url}/v2/a.internal/library/alpine/manifests/3.20`, {
            headers: { accept },
          });
          expect(a.headers.get('docker-content-digest')).toBe(alpine.digest);
          const b = await fetch(`${pc.url}/v2/b.internal/org/app/manifests/v1`, {
            headers: { accept: 'application/vnd.oci.image.manifest.v1+json' },
          });
          expect(b.headers.get('docker-content-digest')).toBe(app.digest);
        } finally {
          await pc.stop();
        }
      }
    });

    test('--upstream-map without name=name is a usage error; to an unknown upstream it fails', async () => {
      const root = tmp('root');
      const target = configFile(root, { 'docker.io': offline });
      const malformed = await cli('import', '-c', target, '--upstream-map', 'lab.local', labBundle);
      expect(malformed.code).toBe(2);
      expect(malformed.stderr).toContain(
        "option '--upstream-map <from=to>' argument 'lab.local' is invalid",
      );
      const unknown = await cli(
        'import',
        '-c',
        target,
        '--upstream-map',
        'lab.local=nowhere.internal',
        labBundle,
      );
      expect(unknown.code).toBe(1);
      expect(unknown.stderr).toBe(
        'pullcache: --upstream-map lab.local=nowhere.internal: nowhere.internal is not a configured upstream (configured: docker.io)\n',
      );
      expect(snapshot(root)).toEqual({});
    });

    test('prints each error once', async () => {
      const truncated = join(tmp('bundle'), 'truncated.tar');
      writeFileSync(truncated, readFileSync(bundle));
      truncateSync(truncated, Math.floor(statSync(bundle).size * 0.6));
      const root = tmp('root');
      const target = configFile(root, { 'docker.io': offline, 'lab.local': offline });
      const r = await cli('import', '-c', target, truncated);
      expect(r.code).toBe(1);
      const last = r.stderr.trimEnd().split('\n').at(-1)!;
      expect(last).toMatch(/^pullcache: .*truncated\.tar is truncated/);
      const reason = last.replace(/^pullcache: /, '');
      expect(r.stderr.split(reason).length - 1).toBe(1);
      expect(r.stderr).not.toMatch(/^FAILED/m);
    });

    test('on a terminal, draws the bytes and blobs read so far (it knows no total)', async () => {
      const target = configFile(tmp('root'), { 'docker.io': offline, 'lab.local': offline });
      const r = await sh(
        `exec script -qec ${quote(`$PULLCACHE import -c ${quote(target)} ${quote(bundle)}`)} /dev/null`,
      );
      expect(r.code).toBe(0);
      const screen = r.stdout.toString();
      // Drawn live (a bar), not line by line.
      expect(screen).toMatch(new RegExp(`done \\[#{24}\\] [\\d.]+ KiB {2}8 blobs {2}${bundle}`));
      expect(screen).not.toContain(' / 0 B');
    });

    test('reports the bytes it read and what of them it added, each once', async () => {
      const root = tmp('root');
      const target = configFile(root, { 'docker.io': offline, 'lab.local': offline });
      const size = (text: string) => /([\d.]+ (?:B|KiB|MiB))/.exec(text)?.[1];
      const first = await cli('import', '-c', target, bundle);
      expect(first.code).toBe(0);
      const done = /^done +\S+ +8 blobs, (.+)$/m.exec(first.stderr)?.[1];
      expect(done).toBeDefined();
      expect(done).not.toBe('0 B');
      expect(first.stderr).toContain(
        `imported ${bundle}: 2 images, 8 blobs (${done}): 8 added (${done}), 0 already present; 2 tags set`,
      );
      expect(first.stderr).toMatch(/^ {2}added {3}sha256:/m);
      const again = await cli('import', '-c', target, bundle);
      expect(again.code).toBe(0);
      expect(size(/^done .*$/m.exec(again.stderr)![0])).toBe(done);
      expect(again.stderr).toContain(
        `imported ${bundle}: 2 images, 8 blobs (${done}): 0 added (0 B), 8 already present; 0 tags set`,
      );
      expect(again.stderr).toMatch(/^ {2}present sha256:/m);
    });

    test('of a bundle read slowly: blobs staged long before its end are committed as used now, so that no sweep takes them before their links', async () => {
      // A blob's last use is its data's modification time, and the sweep of a server beside the
      // import collects a blob no repository links once that is 10 minutes old: reading a large
      // bundle takes longer than that, and every blob is staged before any is committed.
      const root = tmp('root');
      const target = configFile(root, { 'lab.local': offline });
      const bytes = readFileSync(labBundle);
      const blobs = tarFiles(bytes).filter((f) => f.name.startsWith('blobs/'));
      const child = spawn('sh', ['-c', `exec $PULLCACHE import -c ${quote(target)} -`], {
        cwd: tmp('cwd'),
        env: { ...process.env, PULLCACHE },
        stdio: ['pipe', 'ignore', 'pipe'],
      });
      let stderr = '';
      child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
      const exited = new Promise<number | null>((resolve) => child.on('close', resolve));
      // Everything but the archive's end: every blob is read, verified and staged.
      child.stdin.write(bytes.subarray(0, bytes.length - 1024));
      const uploads = join(root, 'uploads');
      const staged = () =>
        readdirSync(uploads)
          .filter((id) => /^[0-9a-f-]{36}$/.test(id))
          .map((id) => join(uploads, id, 'data'));
      await vi.waitFor(
        () =>
          expect(
            staged()
              .map((f) => statSync(f).size)
              .sort(),
          ).toEqual(blobs.map((b) => b.size).sort()),
        { timeout: 30_000, interval: 50 },
      );
      // The bundle took an hour to read so far.
      const hourAgo = new Date(Date.now() - 3_600_000);
      for (const file of staged()) utimesSync(file, hourAgo, hourAgo);
      const committing = Date.now();
      child.stdin.end(bytes.subarray(bytes.length - 1024));
      expect(await exited, stderr).toBe(0);
      for (const blob of blobs) {
        const digest = blob.name.replace('blobs/sha256/', 'sha256:');
        expect(statSync(storedBlobPath(root, digest)).mtimeMs, digest).toBeGreaterThanOrEqual(
          committing - 1000,
        );
      }
    });

    test('of blobs the cache holds unlinked and unused for long: they are used now, so that no sweep takes them before their links', async () => {
      const root = tmp('root');
      const target = configFile(root, { 'lab.local': offline });
      expect((await cli('import', '-c', target, labBundle)).code).toBe(0);
      // What a pull interrupted long ago leaves: blobs, and no repository linking them.
      rmSync(join(root, 'repositories'), { recursive: true });
      const blobs = tarEntries(readFileSync(labBundle))
        .filter((name) => name.startsWith('blobs/'))
        .map((name) => name.replace('blobs/sha256/', 'sha256:'));
      const hourAgo = new Date(Date.now() - 3_600_000);
      for (const digest of blobs) utimesSync(storedBlobPath(root, digest), hourAgo, hourAgo);
      const importing = Date.now();
      const again = await cli('import', '-c', target, labBundle);
      expect(again.code).toBe(0);
      expect(again.stderr).toMatch(/0 added \(0 B\), \d+ already present/);
      // Every layer and config is fresh (the manifests are held by their links at once).
      const manifest = JSON.parse(readFileSync(storedBlobPath(root, app.digest), 'utf8')) as {
        config: { digest: string };
        layers: { digest: string }[];
      };
      for (const digest of [manifest.config.digest, ...manifest.layers.map((l) => l.digest)])
        expect(statSync(storedBlobPath(root, digest)).mtimeMs, digest).toBeGreaterThanOrEqual(
          importing - 1000,
        );
    });
  });
});
