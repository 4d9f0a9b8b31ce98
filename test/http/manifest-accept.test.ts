/**
 * Manifests by the request's Accept header, as the reference registry answers them: an OCI index
 * or manifest that the header does not take is 404 MANIFEST_UNKNOWN (by tag and by digest), a
 * Docker manifest list asked by tag by a client that takes no list is its linux/amd64 image. Each
 * request is asked of the upstream itself (distribution 2.8) too, and pullcache must answer as it
 * does; where pullcache means to differ (no Accept or a wildcard: as before; nothing is rewritten
 * as schema 1), it says so.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { parseDigest } from '../../src/oci/digest.js';
import { MediaType } from '../../src/oci/media-types.js';
import { parseRepository } from '../../src/oci/reference.js';
import { ociError, rawRequest, type RawResponse } from '../helpers/http.js';
import { makeImage, makeIndex, pushImage, type Image } from '../helpers/images.js';
import { startPullcache, type TestPullcache } from '../helpers/pullcache.js';
import { TestRegistry } from '../helpers/registry.js';

const ALL = [
  MediaType.OciManifest,
  MediaType.OciIndex,
  MediaType.DockerManifest,
  MediaType.DockerManifestList,
];

/** Accept headers a script or an older tool sends, and what docker sends (all four, q values). */
const ACCEPTS = [
  MediaType.DockerManifest,
  MediaType.DockerManifestList,
  MediaType.OciManifest,
  MediaType.OciIndex,
  `${MediaType.DockerManifest}, ${MediaType.DockerManifestList}`,
  `${MediaType.OciManifest},${MediaType.OciIndex}`,
  `${MediaType.DockerManifest}, ${MediaType.OciManifest}`,
  ALL.map((t, i) => `${t}; q=0.${9 - i}`).join(', '),
];

describe('manifests by the Accept header', () => {
  let registry: TestRegistry;
  let pc: TestPullcache;
  /** amd64 second: the child is found by its platform, not its place. */
  const ociIndex = makeIndex('multi/oci', 'v1', 'oci', ['arm64', 'amd64']);
  const dockerList = makeIndex('multi/docker', 'v1', 'docker', ['arm64', 'amd64']);
  const armOnly = makeIndex('multi/arm', 'v1', 'docker', ['arm64']);
  const ociImage = makeImage('single/oci', 'v1', 'oci', [3_000]);
  const dockerImage = makeImage('single/docker', 'v1', 'docker', [3_000]);
  /** Asked through pullcache first by a client that takes no list: its child is fetched then. */
  const fresh = makeIndex('fresh/docker', 'v1', 'docker', ['amd64', 'arm64']);

  beforeAll(async () => {
    registry = await TestRegistry.start();
    for (const image of [ociIndex, dockerList, armOnly, ociImage, dockerImage, fresh])
      await pushImage(registry, image);
    pc = await startPullcache({ upstreams: { 'docker.io': { url: registry.url } } });
  });
  afterAll(async () => {
    await pc?.stop();
    await registry?.close();
  });

  const amd64 = (index: Image) => index.children!.find((c) => c.tag.endsWith('-amd64'))!;

  async function ask(
    base: 'upstream' | 'pullcache',
    method: string,
    image: Image,
    reference: string,
    headers: Record<string, string>,
  ): Promise<RawResponse> {
    const auth: Record<string, string> =
      base === 'upstream'
        ? { authorization: `Bearer ${registry.tokens.pushToken(image.repository)}` }
        : {};
    return rawRequest(
      base === 'upstream' ? registry.url : pc.url,
      method,
      `/v2/${image.repository}/manifests/${reference}`,
      { ...auth, ...headers },
    );
  }

  /** What an answer says: its status, and the digest and type served or the error code. */
  async function answer(res: RawResponse, method: string) {
    if (res.status !== 200)
      return {
        status: res.status,
        code: method === 'GET' ? await ociError(res) : undefined,
      };
    return {
      status: res.status,
      digest: res.headers['docker-content-digest'],
      type: res.headers['content-type'],
    };
  }

  /** pullcache's answer, after checking that it is the upstream's own for the same request. */
  async function sameAsUpstream(
    method: string,
    image: Image,
    reference: string,
    accept: string,
  ): Promise<Awaited<ReturnType<typeof answer>>> {
    const upstream = await answer(
      await ask('upstream', method, image, reference, { accept }),
      method,
    );
    const res = await ask('pullcache', method, image, reference, { accept });
    const ours = await answer(res, method);
    expect({ method, image: image.repository, reference, accept, ...ours }).toEqual({
      method,
      image: image.repository,
      reference,
      accept,
      ...upstream,
    });
    if (method === 'GET' && ours.status === 200) {
      const served = [image, ...(image.children ?? [])].find((i) => i.digest === ours.digest)!;
      expect(res.body.equals(served.manifest)).toBe(true);
    }
    return ours;
  }

  test('an OCI index or manifest the header does not take is 404 MANIFEST_UNKNOWN, by tag and by digest, as upstream', async () => {
    for (const image of [ociIndex, ociImage]) {
      for (const reference of [image.tag, image.digest]) {
        for (const method of ['GET', 'HEAD']) {
          for (const accept of ACCEPTS) {
            const ours = await sameAsUpstream(method, image, reference, accept);
            expect(ours.status).toBe(accept.includes(image.mediaType) ? 200 : 404);
          }
        }
      }
    }
    const refused = await ask('pullcache', 'GET', ociIndex, ociIndex.tag, {
      accept: MediaType.DockerManifest,
    });
    expect(JSON.parse(refused.body.toString())).toEqual({
      errors: [
        {
          code: 'MANIFEST_UNKNOWN',
          message: 'OCI index found, but the Accept header does not support OCI indexes',
        },
      ],
    });
    expect(refused.headers['content-type']).toBe('application/json; charset=utf-8');
    expect(refused.headers.vary).toBe('Accept');
  });

  test('a Docker list asked by tag by a client that takes no list is its linux/amd64 image, as upstream', async () => {
    const child = amd64(dockerList);
    for (const method of ['GET', 'HEAD']) {
      for (const accept of [
        MediaType.DockerManifest,
        `${MediaType.DockerManifest}, ${MediaType.OciManifest}`,
        `${MediaType.DockerManifest};q=0.5`,
      ]) {
        const ours = await sameAsUpstream(method, dockerList, dockerList.tag, accept);
        expect(ours).toEqual({ status: 200, digest: child.digest, type: MediaType.DockerManifest });
      }
      // Taking the list: the list.
      for (const accept of [MediaType.DockerManifestList, ACCEPTS.at(-1)!]) {
        const ours = await sameAsUpstream(method, dockerList, dockerList.tag, accept);
        expect(ours.digest).toBe(dockerList.digest);
      }
      // By digest the list itself whatever the header ("we can't return something not matching
      // the digest"), as a Docker image manifest always is.
      for (const accept of ACCEPTS) {
        for (const [image, reference] of [
          [dockerList, dockerList.digest],
          [dockerImage, dockerImage.digest],
          [dockerImage, dockerImage.tag],
        ] as const) {
          // (By tag, distribution 2.8 rewrites a Docker image as schema 1 for a client that does
          // not take it: pullcache serves it, as distribution 3 does.)
          if (reference === image.tag && !accept.includes(MediaType.DockerManifest)) continue;
          const ours = await sameAsUpstream(method, image, reference, accept);
          expect(ours.digest).toBe(image.digest);
        }
      }
      // A list without a linux/amd64 image: 404.
      const none = await sameAsUpstream(method, armOnly, armOnly.tag, MediaType.DockerManifest);
      expect(none.status).toBe(404);
    }
  });

  test('the linux/amd64 image of a list is fetched through the cache and kept like any manifest', async () => {
    const child = amd64(fresh);
    const repo = { upstream: 'docker.io', repository: parseRepository(fresh.repository) };
    const stored = () => pc.runtime.local.manifests.stat(repo, parseDigest(child.digest).digest);
    expect((await stored()).found).toBe(false);
    const res = await ask('pullcache', 'GET', fresh, fresh.tag, {
      accept: MediaType.DockerManifest,
    });
    expect(res.status).toBe(200);
    expect(res.headers['docker-content-digest']).toBe(child.digest);
    expect(res.body.equals(child.manifest)).toBe(true);
    const kept = await stored();
    expect(kept.found && kept.link.mediaType).toBe(MediaType.DockerManifest);
  });

  test('with no Accept header, or one that names no manifest type or a wildcard beside them, every manifest is served as stored', async () => {
    for (const image of [ociIndex, ociImage, dockerList, dockerImage]) {
      for (const method of ['GET', 'HEAD']) {
        for (const headers of [
          {} as Record<string, string>,
          { accept: '*/*' },
          { accept: 'application/json' },
          { accept: `${MediaType.DockerManifest}, */*;q=0.1` },
          { accept: `${MediaType.DockerManifest}, application/*` },
        ]) {
          const res = await ask('pullcache', method, image, image.tag, headers);
          expect({ method, headers, ...(await answer(res, method)) }).toEqual({
            method,
            headers,
            status: 200,
            digest: image.digest,
            type: image.mediaType,
          });
        }
      }
    }
  });

  test('the header is read as a list of media ranges: case, spaces and parameters aside', async () => {
    const cases: [string, number][] = [
      [`${MediaType.OciIndex};q=0.5`, 200],
      [` Application/VND.OCI.Image.Index.v1+JSON ; q=0.9 ,${MediaType.DockerManifest}`, 200],
      [`${MediaType.DockerManifest},${MediaType.OciIndex}`, 200],
      // Not the index type, only a type it begins: the header names the Docker type alone.
      [`${MediaType.OciIndex}x, ${MediaType.DockerManifest}`, 404],
      [`x${MediaType.OciIndex}, ${MediaType.DockerManifest}`, 404],
      [`text/*, ${MediaType.DockerManifest}`, 404],
    ];
    for (const [accept, status] of cases) {
      const res = await ask('pullcache', 'GET', ociIndex, ociIndex.tag, { accept });
      expect({ accept, status: res.status }).toEqual({ accept, status });
    }
  });

  test('Vary: Accept on the answers that depend on it, and If-None-Match on what is served', async () => {
    const vary = async (image: Image, reference: string, accept?: string) => {
      const headers: Record<string, string> = accept ? { accept } : {};
      return (await ask('pullcache', 'GET', image, reference, headers)).headers.vary;
    };
    expect(await vary(ociIndex, ociIndex.tag)).toBe('Accept');
    expect(await vary(ociIndex, ociIndex.digest, ALL.join(','))).toBe('Accept');
    expect(await vary(ociImage, ociImage.digest)).toBe('Accept');
    expect(await vary(dockerList, dockerList.tag, MediaType.DockerManifest)).toBe('Accept');
    expect(await vary(dockerList, dockerList.tag)).toBe('Accept');
    // The same answer for every client: one copy in a cache in front, not one per header.
    expect(await vary(dockerList, dockerList.digest, MediaType.DockerManifest)).toBeUndefined();
    expect(await vary(dockerImage, dockerImage.tag, MediaType.OciManifest)).toBeUndefined();

    const child = amd64(dockerList);
    for (const method of ['GET', 'HEAD']) {
      const conditional = (accept: string, etag: string, image = dockerList) =>
        ask('pullcache', method, image, image.tag, { accept, 'if-none-match': `"${etag}"` });
      // The child is its own representation: its digest is its ETag.
      const same = await conditional(MediaType.DockerManifest, child.digest);
      expect(same.status).toBe(304);
      expect(same.headers.etag).toBe(`"${child.digest}"`);
      expect(same.headers.vary).toBe('Accept');
      const list = await conditional(MediaType.DockerManifest, dockerList.digest);
      expect(list.status).toBe(200);
      expect(list.headers.etag).toBe(`"${child.digest}"`);
      // A refusal is not turned into 304 by a precondition (RFC 9110 section 13.2.1).
      const refused = await conditional(MediaType.DockerManifest, ociIndex.digest, ociIndex);
      expect(refused.status).toBe(404);
    }
  });
});
