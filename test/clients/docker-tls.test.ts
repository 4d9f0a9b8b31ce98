/**
 * Docker Engine pulling through pullcache over HTTPS (server.tls), as users set it up: the
 * mirror as https://HOST:PORT in daemon.json, not listed as an insecure registry, and the CA
 * that signed pullcache's certificate in /etc/docker/certs.d/HOST:PORT/ca.crt. dockerd falls
 * back to Docker Hub (unreachable here) when its mirror fails, so a pull that succeeds came
 * through the mirror.
 *
 * pullcache listens on this host's first non-loopback IPv4 address, not on 127.0.0.1: dockerd
 * always treats 127.0.0.0/8 as an insecure registry, skipping certificate verification there.
 */
import { networkInterfaces } from 'node:os';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { TestDockerd, trustRegistryCa } from '../helpers/dockerd.js';
import { makeImage, pushImage, type Image } from '../helpers/images.js';
import { startPullcache, type TestPullcache } from '../helpers/pullcache.js';
import { Recorder } from '../helpers/recorder.js';
import { TestRegistry } from '../helpers/registry.js';
import { TestCa } from '../helpers/tls.js';

/** An IPv4 address of this host that dockerd does not take for an insecure registry. */
function hostAddress(): string {
  const address = Object.values(networkInterfaces())
    .flat()
    .find((a) => a && a.family === 'IPv4' && !a.internal)?.address;
  if (!address)
    throw new Error(
      'needs a non-loopback IPv4 address: dockerd would not verify certificates on 127.0.0.1',
    );
  return address;
}

describe('docker pull through pullcache over HTTPS', () => {
  let registry: TestRegistry;
  let recorder: Recorder;
  let ca: TestCa;
  let pc: TestPullcache;
  let untrust: (() => void) | undefined;
  let dockerd: TestDockerd;
  let hubImage: Image;
  let otherImage: Image;

  beforeAll(async () => {
    registry = await TestRegistry.start();
    hubImage = makeImage('library/tls-fixture', 'v1', 'docker', [200_000, 30_000]);
    otherImage = makeImage('org/tls-tool', 'v2', 'oci', [50_000]);
    await pushImage(registry, hubImage);
    await pushImage(registry, otherImage);
    recorder = await Recorder.start(registry.url);
    ca = TestCa.create();
    const address = hostAddress();
    pc = await startPullcache(
      {
        server: { listen: `${address}:0` },
        upstreams: {
          'docker.io': { url: recorder.url },
          'registry.test': { url: recorder.url },
        },
      },
      undefined,
      { tls: ca.issue({ names: [address] }) },
    );
    untrust = trustRegistryCa(pc.host, ca.pem);
    dockerd = await TestDockerd.start({ daemonConfig: { 'registry-mirrors': [pc.url] } });
  });
  afterAll(async () => {
    await dockerd?.stop();
    untrust?.();
    await pc?.stop();
    await ca?.remove();
    await recorder?.close();
    await registry?.close();
  });

  const imageId = async (ref: string) =>
    (await dockerd.docker('image', 'inspect', '--format', '{{.Id}}', ref)).trim();

  test('docker pull of a Docker Hub name goes through the https:// mirror', async () => {
    expect(pc.url).toMatch(/^https:\/\//);
    await dockerd.docker('pull', 'library/tls-fixture:v1');

    expect(await imageId('tls-fixture:v1')).toBe(hubImage.blobs[0]!.digest);
    for (const blob of hubImage.blobs)
      expect(recorder.count('GET', new RegExp(`/blobs/${blob.digest}$`))).toBe(1);
  });

  test('docker pull by pullcache address verifies its certificate with the CA in certs.d', async () => {
    const ref = `${pc.host}/registry.test/org/tls-tool:v2`;
    untrust?.();
    try {
      await expect(dockerd.docker('pull', ref)).rejects.toThrow(/certificate signed by unknown/);
    } finally {
      untrust = trustRegistryCa(pc.host, ca.pem);
    }
    await dockerd.docker('pull', ref);
    expect(await imageId(ref)).toBe(otherImage.blobs[0]!.digest);
  });
});
