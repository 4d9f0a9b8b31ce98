/**
 * What a cache admits from a bundle, checked before anything of it is made visible: the
 * `--upstream-map` targets, the upstream each image is kept under here (mapped or the same name,
 * never a passthrough one), the upstreams' allow/deny lists, and the `retention.maxSize` budget.
 * Each refusal is a BundleError, and the import it stops leaves the cache as it was.
 */
import { repositoryLists } from '../access/repositories.js';
import { formatBytes } from '../config/units.js';
import { formatLocation } from '../routing.js';
import type { Runtime } from '../runtime.js';
import type { IndexEntry } from './bundle.js';
import { BundleError } from './bundle-io.js';

/**
 * With a `retention.maxSize`, refuses (BundleError, with the figures) an import that would take
 * storage past it: the budget would evict what was imported, and an offline cache cannot fetch
 * it again.
 */
export async function checkBudget(runtime: Runtime, file: string, adding: number): Promise<void> {
  const { maxSize } = runtime.config.retention;
  if (maxSize <= 0 || adding === 0) return;
  let stored = 0;
  if (runtime.lifecycle.ready) stored = (await runtime.lifecycle.usage()).bytes;
  else for await (const blob of runtime.blobs.list()) stored += blob.size;
  if (stored + adding <= maxSize) return;
  throw new BundleError(
    `${file}: it adds ${formatBytes(adding)} to the ${formatBytes(stored)} stored, past retention.maxSize (${formatBytes(maxSize)}): the budget would evict it; raise retention.maxSize, or import fewer images`,
  );
}

/** Every target of the map is an upstream whose images are cached; throws BundleError if not. */
export function checkUpstreamMap(runtime: Runtime, map: ReadonlyMap<string, string>): void {
  for (const [from, to] of map) {
    if (runtime.services.has(to)) continue;
    throw new BundleError(
      `--upstream-map ${from}=${to}: ${to} ${runtime.passthrough.has(to) ? 'is a passthrough upstream (nothing is cached for it)' : `is not a configured upstream (configured: ${configuredUpstreams(runtime)})`}`,
    );
  }
}

/**
 * The bundle's images under the upstreams they are kept under here (mapped or the same name);
 * throws BundleError naming every upstream of the bundle that has no place here.
 */
export function placeImages(
  runtime: Runtime,
  images: IndexEntry[],
  map: ReadonlyMap<string, string>,
  file: string,
): IndexEntry[] {
  const placed = images.map((image) => ({
    ...image,
    upstream: map.get(image.upstream) ?? image.upstream,
  }));
  const unplaced = [...new Set(placed.map((image) => image.upstream))].filter(
    (upstream) => !runtime.services.has(upstream),
  );
  const passthrough = unplaced.filter((upstream) => runtime.passthrough.has(upstream));
  const missing = unplaced.filter((upstream) => !runtime.passthrough.has(upstream));
  const mapHint = (names: string[]) =>
    `--upstream-map ${names.map((name) => `${name}=<upstream>`).join(',')}`;
  if (missing.length > 0) {
    const one = missing.length === 1;
    throw new BundleError(
      `${file}: its images are from ${one ? 'upstream' : 'upstreams'} ${missing.join(', ')}, which ${one ? 'is' : 'are'} not configured here (configured: ${configuredUpstreams(runtime)}); add ${one ? 'it' : 'them'}, or map ${one ? 'it' : 'them'} with ${mapHint(missing)}`,
    );
  }
  if (passthrough.length > 0) {
    const one = passthrough.length === 1;
    throw new BundleError(
      `${file}: its images are from ${one ? 'upstream' : 'upstreams'} ${passthrough.join(', ')}, which ${one ? 'is a passthrough upstream' : 'are passthrough upstreams'} here (nothing is cached for ${one ? 'it' : 'them'}); map ${one ? 'it' : 'them'} with ${mapHint(passthrough)}`,
    );
  }
  // Outside an upstream's allow/deny lists: refused, and nothing of the bundle is kept.
  const lists = repositoryLists(runtime.config);
  for (const image of placed) {
    const verdict = lists.verdict(image.upstream, image.repository);
    if (!verdict.allowed)
      throw new BundleError(`${file}: ${formatLocation(image)} is refused: ${verdict.reason}`);
  }
  return placed;
}

function configuredUpstreams(runtime: Runtime): string {
  return [...runtime.services.keys()].join(', ') || 'none';
}
