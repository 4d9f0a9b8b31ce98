/**
 * `pullcache prefetch`: pulls images into the cache through the same proxy services the server
 * uses, so the result is exactly what a client's pull would have cached: the manifest or index,
 * every platform (or only those asked for), configs and layers. Safe beside a running server on
 * the same storage: every blob lands by an atomic rename of a verified upload.
 */
import { repositoryLists } from '../access/repositories.js';
import type { Config } from '../config/schema.js';
import { formatLocation, parseLocation, type ImageLocation } from '../routing.js';
import type { Digest } from '../oci/digest.js';
import type { Platform } from '../oci/descriptor.js';
import { ManifestUnknownError, RegistryError } from '../oci/errors.js';
import { parseManifest } from '../oci/manifest.js';
import { parseTag } from '../oci/reference.js';
import type { Runtime } from '../runtime.js';
import type { RepositoryKey } from '../storage/types.js';
import { MAX_DEPTH, MAX_MANIFESTS } from './bundle-plan.js';
import type { Progress } from './progress.js';

export interface PlatformFilter {
  os: string;
  architecture: string;
  variant?: string;
}

/** `linux/amd64,linux/arm64/v8` -> filters; throws on a malformed entry. */
export function parsePlatforms(value: string): PlatformFilter[] {
  return value
    .split(',')
    .map((p) => p.trim())
    .filter(Boolean)
    .map((p) => {
      const [os, architecture, variant, extra] = p.split('/');
      if (!os || !architecture || extra !== undefined)
        throw new Error(`invalid platform ${JSON.stringify(p)}: expected os/arch[/variant]`);
      return variant ? { os, architecture, variant } : { os, architecture };
    });
}

function platformMatches(platform: Platform | undefined, filters: PlatformFilter[]): boolean {
  if (filters.length === 0) return true;
  if (!platform) return false;
  return filters.some(
    (f) =>
      f.os === platform.os &&
      f.architecture === platform.architecture &&
      (f.variant === undefined || f.variant === platform.variant),
  );
}

export interface PrefetchResult {
  reference: string;
  ok: boolean;
  error?: string;
}

export async function prefetch(
  runtime: Runtime,
  config: Config,
  references: string[],
  platforms: PlatformFilter[],
  progress: Progress,
): Promise<PrefetchResult[]> {
  const results: PrefetchResult[] = [];
  for (const reference of references) {
    let name = reference;
    try {
      const location = parseLocation(config, reference);
      name = formatLocation(location);
      await prefetchImage(runtime, location, name, platforms, progress);
      progress.finish(name);
      results.push({ reference: name, ok: true });
    } catch (err) {
      progress.finish(name, err);
      results.push({ reference: name, ok: false, error: describe(err) });
    }
  }
  return results;
}

async function prefetchImage(
  runtime: Runtime,
  location: ImageLocation,
  name: string,
  platforms: PlatformFilter[],
  progress: Progress,
): Promise<void> {
  // Outside the upstream's allow/deny lists: refused before anything is fetched.
  repositoryLists(runtime.config).check(location.upstream, location.repository);
  const services = runtime.services.get(location.upstream);
  if (!services)
    throw new Error(
      `upstream ${location.upstream} is a passthrough upstream: nothing is cached for it`,
    );
  const repo: RepositoryKey = { upstream: location.upstream, repository: location.repository };
  let digest = location.digest;
  if (!digest) {
    const tag = location.tag ?? parseTag('latest');
    const resolved = await services.tags.resolve(repo, tag);
    if (!resolved.found) throw new ManifestUnknownError(`${location.repository}:${tag}`);
    digest = resolved.digest;
  }
  const item = progress.start(name);
  // Manifests first, so that the totals are known before the layers start. Each once, and
  // indexes nested at most MAX_DEPTH deep: an index naming others many times over is refused,
  // not walked for ever.
  const blobs = new Map<Digest, number>();
  const visited = new Set<Digest>();
  const walk = async (manifestDigest: Digest, depth: number): Promise<void> => {
    if (visited.has(manifestDigest)) return;
    if (depth > MAX_DEPTH)
      throw new Error(`its indexes nest more than ${MAX_DEPTH} deep (at ${manifestDigest})`);
    if (visited.size >= MAX_MANIFESTS)
      throw new Error(`it names more than ${MAX_MANIFESTS} manifests`);
    visited.add(manifestDigest);
    const manifest = await services.manifests.get(repo, manifestDigest);
    if (!manifest.found) throw new ManifestUnknownError(`${location.repository}@${manifestDigest}`);
    const parsed = parseManifest(manifest.bytes, manifest.link.mediaType);
    if (parsed.kind === 'index') {
      const children = parsed.manifests.filter((m) => platformMatches(m.platform, platforms));
      if (children.length === 0)
        throw new Error(
          `no manifest in the index matches ${platforms.map((p) => `${p.os}/${p.architecture}${p.variant ? `/${p.variant}` : ''}`).join(', ')}`,
        );
      for (const child of children) await walk(child.digest, depth + 1);
    } else {
      for (const d of [parsed.config, ...parsed.layers]) blobs.set(d.digest, d.size);
    }
  };
  await walk(digest, 0);
  item.layers = blobs.size;
  item.total = [...blobs.values()].reduce((a, b) => a + b, 0);

  // Held by the repository already; or stored for another one and confirmed by the upstream for
  // this one (which links it), never on the strength of the other's copy.
  const cached = async (blobDigest: Digest) =>
    (await runtime.local.blobs.stat(repo, blobDigest)).found ||
    ((await runtime.blobs.stat(blobDigest)).found &&
      (await services.blobs.stat(repo, blobDigest)).found);
  const queue = [...blobs.entries()];
  const worker = async () => {
    for (let next = queue.shift(); next; next = queue.shift()) {
      const [blobDigest, size] = next;
      if (await cached(blobDigest)) {
        item.done += size;
        progress.layerDone(name, blobDigest, size, 'cached');
        continue;
      }
      const opened = await services.blobs.open(repo, blobDigest);
      if (!opened.found)
        throw new RegistryError('BLOB_UNKNOWN', `blob ${blobDigest} not found upstream`);
      // Reading to the end waits for the digest check and the commit (the last byte is held until then).
      for await (const chunk of opened.stream) item.done += (chunk as Buffer).length;
      progress.layerDone(name, blobDigest, size, 'fetched');
    }
  };
  await Promise.all(Array.from({ length: Math.min(3, queue.length) }, worker));
}

function describe(err: unknown): string {
  if (err instanceof RegistryError) return `${err.code}: ${err.message}`;
  return (err as Error).message ?? String(err);
}
