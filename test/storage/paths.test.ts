/**
 * The layout read backwards (`parseRepositoryLink`), as a flat listing of an upstream's keys on S3
 * is counted: the link files of each repository, and nothing else.
 */
import { expect, test } from 'vitest';
import { parseRepositoryLink, paths } from '../../src/storage/paths.js';
import { parseRepository, parseTag } from '../../src/oci/reference.js';
import { parseDigest } from '../../src/oci/digest.js';

const hex = 'a'.repeat(64);
const digest = `sha256:${hex}`;
const parsedDigest = parseDigest(digest).digest;
const repo = { upstream: 'docker.io', repository: parseRepository('library/alpine') };
const relative = (path: string) => path.slice(`${paths.upstreamRoot('docker.io')}/`.length);

test('each link the layout writes reads back as what it is', () => {
  expect(parseRepositoryLink(relative(paths.layerLink(repo, parsedDigest)))).toEqual({
    repository: 'library/alpine',
    kind: 'blob',
    digest,
  });
  expect(parseRepositoryLink(relative(paths.manifestRevisionLink(repo, parsedDigest)))).toEqual({
    repository: 'library/alpine',
    kind: 'manifest',
    digest,
  });
  expect(parseRepositoryLink(relative(paths.tagLink(repo, parseTag('3.20'))))).toEqual({
    repository: 'library/alpine',
    kind: 'tag',
    tag: '3.20',
  });
});

test('anything else is no link: other files, bad names, digests and tags', () => {
  for (const path of [
    'library/alpine/_referrers/sha256/' + hex + '/all',
    'library/alpine/_layers/sha256/' + hex + '/data',
    'library/alpine/_layers/sha256/' + hex + '/link/more',
    'library/alpine/_layers/sha256/xyz/link',
    'library/alpine/_manifests/revisions/md5/' + hex + '/link',
    'library/alpine/_manifests/tags/-bad/current/link',
    'library/alpine/_manifests/tags/v1/index/sha256/link',
    'Library/alpine/_layers/sha256/' + hex + '/link',
    '_layers/sha256/' + hex + '/link',
    'library/alpine/link',
  ])
    expect({ path, link: parseRepositoryLink(path) }).toEqual({ path, link: undefined });
});
