/**
 * `pullcache export` over a cache as a pull-through cache leaves it: tags whose layers were never
 * all pulled, indexes that list a manifest many times or nest deep, temporary files of killed
 * runs beside the output; and an export stopped by ^C. The cache is filled in-process through
 * the runtime's own stores; the command runs as a user runs it (test/helpers/cli.ts).
 */
import { spawn } from 'node:child_process';
import { readdirSync, rmSync, utimesSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, test } from 'vitest';
import { exportBundle } from '../../src/commands/bundle-export.js';
import { Progress, type BlobOutcome } from '../../src/commands/progress.js';
import { parseConfig } from '../../src/config/load.js';
import { silentLogger } from '../../src/log/logger.js';
import { parseDigest } from '../../src/oci/digest.js';
import { parseRepository, parseTag } from '../../src/oci/reference.js';
import { createRuntime, type Runtime } from '../../src/runtime.js';
import { sha256, makeImage, type Image } from '../helpers/images.js';
import { PULLCACHE, cli, configFile, quote, sh, tmp } from '../helpers/cli.js';

const upstreams = { 'docker.io': { url: 'http://registry.invalid', offline: true } };
const made: string[] = [];
const dir = (what: string) => {
  const d = tmp(what);
  made.push(d);
  return d;
};
afterAll(() => {
  for (const d of made) rmSync(d, { recursive: true, force: true });
});

function openCache(root: string): Promise<Runtime> {
  return createRuntime(
    parseConfig({ storage: { filesystem: { root } }, upstreams }),
    silentLogger(),
  );
}

/**
 * Stores `image` (its manifest, its children, the blobs of each but those in `skip`) in
 * docker.io/REPOSITORY, tagged when `tag` is given.
 */
async function store(
  runtime: Runtime,
  image: Image,
  tag?: string,
  skip: string[] = [],
): Promise<void> {
  const repo = { upstream: 'docker.io', repository: parseRepository(image.repository) };
  for (const blob of image.blobs)
    if (!skip.includes(blob.digest))
      await runtime.blobs.put(blob.bytes, parseDigest(blob.digest).digest);
  for (const child of image.children ?? []) await store(runtime, child, undefined, skip);
  const digest = parseDigest(image.digest).digest;
  await runtime.local.manifests.put(repo, image.manifest, digest, image.mediaType);
  if (tag) await runtime.local.tags.tag(repo, parseTag(tag), digest);
}

/** Stores each `[image, tag, blobs left out]` in a cache at `root`, as `store` does. */
async function fill(root: string, ...images: [Image, string, string[]?][]): Promise<void> {
  const runtime = await openCache(root);
  try {
    for (const [image, tag, skip] of images) await store(runtime, image, tag, skip);
  } finally {
    await runtime.close();
  }
}

/** An OCI index listing each of `children` `times` times. */
function indexOf(repository: string, children: Image[], times: number): Image {
  const manifest = Buffer.from(
    JSON.stringify({
      schemaVersion: 2,
      mediaType: 'application/vnd.oci.image.index.v1+json',
      manifests: children.flatMap((c) =>
        Array.from({ length: times }, () => ({
          mediaType: c.mediaType,
          size: c.manifest.length,
          digest: c.digest,
          platform: { architecture: 'amd64', os: 'linux' },
        })),
      ),
    }),
  );
  return {
    repository,
    tag: '',
    manifest,
    digest: sha256(manifest),
    mediaType: 'application/vnd.oci.image.index.v1+json',
    blobs: [],
    children,
  };
}

describe('export of a cache holding some images in part', () => {
  const root = dir('partial-cache');
  const config = configFile(root, upstreams);
  const whole = makeImage('org/whole', 'v1', 'oci', [20_000]);
  const partial = makeImage('org/partial', 'v1', 'oci', [20_000, 10_000]);
  const missing = partial.blobs[2]!.digest;
  const filled = fill(root, [whole, 'v1'], [partial, 'v1', [missing]]); // a layer never pulled

  test('--all leaves an incomplete image out with a note, and writes the others', async () => {
    await filled;
    const output = join(dir('out'), 'b.tar');
    const r = await cli('export', '-c', config, '-o', output, '--all');
    expect(r.stderr).toContain(
      `note: docker.io/org/partial:v1: blob ${missing} is not in the cache (prefetch the image first), left out`,
    );
    expect(r.stderr).toMatch(/wrote .*b\.tar: 1 images, 3 blobs/);
    expect(r.code).toBe(0);
  });

  test('an incomplete image named is refused in one line', async () => {
    await filled;
    const out = dir('out');
    const r = await cli('export', '-c', config, '-o', join(out, 'b.tar'), 'org/partial:v1');
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(
      new RegExp(
        `(^|\\n)pullcache: docker\\.io/org/partial:v1: blob ${missing} is not in the cache`,
      ),
    );
    expect(readdirSync(out)).toEqual([]);
  });
});

describe('export of a platform left out of an index, named on its own', () => {
  test('is refused, not written as an image the bundle lacks', async () => {
    const root = dir('platform-cache');
    const config = configFile(root, upstreams);
    const amd64 = makeImage('org/multi', 'amd64', 'oci', [4_000]);
    const arm64 = makeImage('org/multi', 'arm64', 'oci', [4_000]);
    const index = indexOf('org/multi', [amd64, arm64], 1);
    await fill(root, [index, 'v1', [arm64.blobs[1]!.digest]]); // arm64 never pulled whole
    const out = dir('out');
    // The index first: its walk finds arm64 incomplete (left out) and remembers it.
    const r = await cli(
      'export',
      '-c',
      config,
      '-o',
      join(out, 'b.tar'),
      'org/multi:v1',
      `org/multi@${arm64.digest}`,
    );
    expect(r.stderr).toMatch(
      new RegExp(
        `(^|\\n)pullcache: docker\\.io/org/multi@${arm64.digest}: it is not whole in the cache`,
      ),
    );
    expect(r.code).toBe(1);
    expect(readdirSync(out)).toEqual([]);
  });
});

describe('export of nested indexes', () => {
  test('walks a manifest listed many times at every level once', async () => {
    const root = dir('wide-cache');
    const leaf = makeImage('org/wide', 'leaf', 'oci', [5_000]);
    // 7 levels of 20 listings each: 20^7 walks without remembering what was walked.
    let top = leaf;
    for (let level = 0; level < 7; level++) top = indexOf('org/wide', [top], 20);
    await fill(root, [top, 'v1']);
    const r = await sh(
      `exec $PULLCACHE export -c ${quote(configFile(root, upstreams))} -o ${quote(join(dir('out'), 'b.tar'))} --all`,
      { timeout: 30_000 },
    );
    expect(r.stderr).toMatch(/wrote .*b\.tar: 1 images, 10 blobs/);
    expect(r.code).toBe(0);
  });

  test('refuses indexes nested deeper than 8, saying so', async () => {
    const root = dir('deep-cache');
    let top = makeImage('org/deep', 'leaf', 'oci', [5_000]);
    for (let level = 0; level < 9; level++) top = indexOf('org/deep', [top], 1);
    await fill(root, [top, 'v1']);
    const out = dir('out');
    const r = await cli(
      'export',
      '-c',
      configFile(root, upstreams),
      '-o',
      join(out, 'b.tar'),
      'org/deep:v1',
    );
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(
      /pullcache: docker\.io\/org\/deep:v1.*: indexes nested more than 8 deep\n$/,
    );
    expect(readdirSync(out)).toEqual([]);
  });
});

describe('export and what it leaves', () => {
  const root = dir('cache');
  const config = configFile(root, upstreams);
  /** A layer large enough for an export of it to take a while. */
  const large = Buffer.alloc(128 * 1024 * 1024, 'pullcache ');
  const image = makeImage('org/app', 'v1', 'oci', [20_000]);
  const largeImage: Image = (() => {
    const config = image.blobs[0]!;
    const manifest = Buffer.from(
      JSON.stringify({
        schemaVersion: 2,
        mediaType: 'application/vnd.oci.image.manifest.v1+json',
        config: {
          mediaType: 'application/vnd.oci.image.config.v1+json',
          size: config.bytes.length,
          digest: config.digest,
        },
        layers: [
          {
            mediaType: 'application/vnd.oci.image.layer.v1.tar',
            size: large.length,
            digest: sha256(large),
          },
        ],
      }),
    );
    return {
      repository: 'org/large',
      tag: 'v1',
      manifest,
      digest: sha256(manifest),
      mediaType: 'application/vnd.oci.image.manifest.v1+json',
      blobs: [config, { digest: sha256(large), bytes: large, mediaType: '' }],
    };
  })();
  const filled = fill(root, [image, 'v1'], [largeImage, 'v1']);

  test('on a terminal, the summary stays on the screen', async () => {
    await filled;
    const output = join(dir('out'), 'b.tar');
    const r = await sh(
      `exec script -qec ${quote(`$PULLCACHE export -c ${quote(config)} -o ${quote(output)} org/app:v1`)} /dev/null`,
    );
    expect(r.code).toBe(0);
    const screen = r.stdout.toString();
    expect(screen).toMatch(/done \[#{24}\]/); // drawn live, not line by line
    const summary = screen.lastIndexOf('wrote ');
    expect(summary).toBeGreaterThan(0);
    // Nothing after it moves the cursor up or clears the screen.
    expect(screen.slice(summary)).not.toContain('\x1b[');
  });

  test('removes the temporary files killed exports to the same name left, and nothing else', async () => {
    await filled;
    const out = dir('out');
    const old = (name: string) => {
      writeFileSync(join(out, name), 'left by a killed export');
      const then = new Date(Date.now() - 10 * 60_000);
      utimesSync(join(out, name), then, then);
    };
    old('.b.tar.0123abcd.partial');
    old('.b.tar.89abcdef.partial');
    old('.other.tar.0123abcd.partial'); // another output's
    old('.b.tar.0123abcd.partial.keep'); // not a name export gives
    writeFileSync(join(out, '.b.tar.fedcba98.partial'), 'an export under way'); // fresh
    const r = await cli('export', '-c', config, '-o', join(out, 'b.tar'), 'org/app:v1');
    expect(r.code).toBe(0);
    expect(readdirSync(out).sort()).toEqual([
      '.b.tar.0123abcd.partial.keep',
      '.b.tar.fedcba98.partial',
      '.other.tar.0123abcd.partial',
      'b.tar',
    ]);
  });

  test('stopped by its signal, removes its temporary file and rejects with the reason', async () => {
    await filled;
    const out = dir('out');
    const runtime = await openCache(root);
    const stop = new AbortController();
    // Aborted once the first blob is written: the large layer is yet to come.
    class StopAfterOne extends Progress {
      override layerDone(name: string, digest: string, bytes: number, outcome: BlobOutcome) {
        super.layerDone(name, digest, bytes, outcome);
        stop.abort(new Error('stop here'));
      }
    }
    try {
      const progress = new StopAfterOne(process.stderr, false);
      await expect(
        exportBundle(
          runtime,
          runtime.config,
          {
            references: ['org/large:v1'],
            all: false,
            output: { path: join(out, 'b.tar') },
            signal: stop.signal,
          },
          progress,
        ),
      ).rejects.toThrow('stop here');
      progress.stop();
    } finally {
      await runtime.close();
    }
    expect(readdirSync(out)).toEqual([]);
  });

  test('^C or SIGTERM: removes its temporary file, says "interrupted" and exits 130', async () => {
    await filled;
    for (const signal of ['SIGINT', 'SIGTERM'] as const) {
      const out = dir('out');
      const child = spawn(
        'sh',
        [
          '-c',
          `exec $PULLCACHE export -c ${quote(config)} -o ${quote(join(out, 'b.tar'))} org/large:v1`,
        ],
        { env: { ...process.env, PULLCACHE }, stdio: ['ignore', 'ignore', 'pipe'] },
      );
      let stderr = '';
      const code = await new Promise<number | null>((resolve) => {
        child.stderr.on('data', (chunk: Buffer) => {
          stderr += chunk.toString();
          // The manifest is written; the large layer is under way.
          if (/exported/.test(stderr) && !child.killed) child.kill(signal);
        });
        child.on('close', resolve);
      });
      expect(stderr).toMatch(/(^|\n)pullcache: interrupted\n$/);
      expect(code).toBe(130);
      expect(readdirSync(out)).toEqual([]);
    }
  });
});
