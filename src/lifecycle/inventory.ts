/**
 * What is cached, as the commands and the admin API show it: images with their full references,
 * sizes and last pull, what the graph holds in all, and which images a reference names.
 */
import { isTag } from '../oci/reference.js';
import type { RepositoryKey } from '../storage/types.js';
import type { Image, ImageGraph, RepositoryNode } from './image-graph.js';
import type { ImageInfo, ImageRef, Usage } from './types.js';

/** Full references of an image: `docker.io/library/node:20`, or by digest when untagged. */
export function imageReferences(repo: RepositoryKey, image: Image): string[] {
  const base = `${repo.upstream}/${repo.repository}`;
  return image.tags.length > 0
    ? image.tags.map((tag) => `${base}:${tag}`)
    : [`${base}@${image.digest}`];
}

/** Every image of the graph, as `ls --json` prints it. */
export function imageInfos(
  graph: ImageGraph,
  pinned: (node: RepositoryNode, image: Image) => boolean,
): ImageInfo[] {
  const out: ImageInfo[] = [];
  for (const node of graph.repositories.values()) {
    for (const root of graph.roots(node)) {
      const image = graph.image(node, root);
      out.push({
        references: imageReferences(node.key, image),
        upstream: node.key.upstream,
        repository: node.key.repository,
        digest: image.digest,
        size: image.ownBytes + image.sharedBytes,
        ownBytes: image.ownBytes,
        sharedBytes: image.sharedBytes,
        lastPulled: new Date(image.pulledAt).toISOString(),
        pinned: pinned(node, image),
      });
    }
  }
  return out;
}

/** What the graph holds, as `du` prints it: bytes, blobs, images and blobs no image holds. */
export function graphUsage(
  graph: ImageGraph,
): Pick<Usage, 'bytes' | 'blobs' | 'images' | 'orphanBlobs'> {
  let images = 0;
  let orphans = 0;
  for (const node of graph.repositories.values()) images += graph.roots(node).length;
  for (const _ of graph.orphans()) orphans++;
  return { bytes: graph.bytes, blobs: graph.blobs.size, images, orphanBlobs: orphans };
}

/** The images of a repository a reference names: by tag, by digest, or all without either. */
export function matchingImages(graph: ImageGraph, node: RepositoryNode, ref: ImageRef): Image[] {
  const images = graph.roots(node).map((root) => graph.image(node, root));
  if (ref.digest) return images.filter((i) => i.manifests.includes(ref.digest!));
  if (ref.tag && isTag(ref.tag)) {
    const target = node.tags.get(ref.tag);
    return target ? images.filter((i) => i.manifests.includes(target)) : [];
  }
  return images;
}
