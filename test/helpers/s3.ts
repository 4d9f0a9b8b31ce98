/**
 * A real S3 server for the tests: Ceph's RADOS Gateway (Debian's radosgw, ceph-mon, ceph-osd) as a
 * throw-away single-node cluster in a temporary directory: one monitor, one in-memory OSD
 * (memstore), no manager, cephx off, everything on 127.0.0.1 on free ports. It starts in about
 * two seconds. `stopGateway`/`startGateway` take the S3 endpoint away and bring it back (the
 * monitor and OSD keep running, so the data stays). One server per test file; `bucket()` makes a
 * fresh bucket. A missing radosgw is a failure, not a skip.
 */
import { execFile as execFileCb } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { randomUUID } from 'node:crypto';
import { CreateBucketCommand, S3Client } from '@aws-sdk/client-s3';
import { freePort, waitFor } from './net.js';

const execFile = promisify(execFileCb);

export const S3_ACCESS_KEY = 'pullcache-test';
export const S3_SECRET_KEY = 'pullcache-test-secret';

export interface TestS3 {
  /** http://127.0.0.1:<port> */
  endpoint: string;
  accessKey: string;
  secretKey: string;
  /** A client with full access, for the tests' own looks at the bucket. */
  client: S3Client;
  /** Creates a fresh, empty bucket and resolves to its name. */
  bucket(): Promise<string>;
  /** The S3 endpoint goes away (radosgw killed; connections refused). */
  stopGateway(signal?: NodeJS.Signals): Promise<void>;
  /** The endpoint comes back on the same port, with the same data. */
  startGateway(): Promise<void>;
  stop(): Promise<void>;
}

export async function startS3(): Promise<TestS3> {
  const dir = mkdtempSync(join(tmpdir(), 'pullcache-rgw-'));
  const [rgwPort, monPort] = [await freePort(), await freePort()];
  for (const sub of ['mon.a', 'osd.0', 'rgw', 'run', 'log']) mkdirSync(join(dir, sub));
  const fsid = randomUUID();
  const conf = join(dir, 'ceph.conf');
  // The settings without which it fails or is slow (see the project's docs/s3.md): auth none
  // needs `ms mon client mode = crc`; a 0.1 s paxos interval makes radosgw's pool creation quick.
  writeFileSync(
    conf,
    `[global]
fsid = ${fsid}
mon host = [v2:127.0.0.1:${monPort}]
mon initial members = a
auth cluster required = none
auth service required = none
auth client required = none
run dir = ${dir}/run
admin socket = ${dir}/run/$name.asok
pid file = ${dir}/run/$name.pid
log file = ${dir}/log/$name.log
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 1
mon data avail crit = 0
ms bind ipv6 = false
ms mon client mode = crc
[mon]
mon data = ${dir}/mon.$id
paxos propose interval = 0.1
paxos min wait = 0.01
[osd]
osd data = ${dir}/osd.$id
osd objectstore = memstore
memstore device bytes = 4294967296
osd memory target = 536870912
[client.rgw.a]
rgw frontends = beast endpoint=127.0.0.1:${rgwPort}
rgw data = ${dir}/rgw
rgw thread pool size = 64
rgw gc obj min wait = 60
rgw gc processor period = 60
`,
  );
  const c = ['-c', conf];
  const run = async (cmd: string, args: string[]) => {
    try {
      return (await execFile(cmd, args, { timeout: 60_000 })).stdout;
    } catch (err) {
      const e = err as NodeJS.ErrnoException & { stderr?: string };
      if (e.code === 'ENOENT')
        throw new Error(
          `cannot run ${cmd} (apt-get install radosgw ceph-mon ceph-osd): ${e.message}`,
        );
      throw new Error(`${cmd} ${args.join(' ')} failed: ${e.stderr ?? e.message}`);
    }
  };
  const pidOf = (name: string): number | undefined => {
    try {
      return Number(readFileSync(join(dir, 'run', `${name}.pid`), 'utf8').trim());
    } catch {
      return undefined;
    }
  };
  const kill = async (name: string, signal: NodeJS.Signals = 'SIGTERM') => {
    const pid = pidOf(name);
    if (!pid) return;
    try {
      process.kill(pid, signal);
    } catch {
      return;
    }
    await waitFor(
      async () => {
        try {
          process.kill(pid, 0);
          return false;
        } catch {
          return true;
        }
      },
      `${name} to exit`,
      20_000,
    ).catch(() => process.kill(pid, 'SIGKILL'));
    rmSync(join(dir, 'run', `${name}.pid`), { force: true });
  };
  const endpoint = `http://127.0.0.1:${rgwPort}`;
  const gatewayUp = () =>
    waitFor(
      async () => {
        const res = await fetch(endpoint);
        await res.arrayBuffer();
        return true;
      },
      `radosgw on ${endpoint} (its log: ${dir}/log)`,
      60_000,
    );
  const startGateway = async () => {
    // radosgw daemonizes; it blocks (not fails) when it cannot reach the monitor, hence the timeout.
    await run('radosgw', [...c, '-n', 'client.rgw.a']);
    await gatewayUp();
  };
  const stopAll = async () => {
    process.off('exit', killAllNow);
    for (const name of ['client.rgw.a', 'osd.0', 'mon.a']) await kill(name);
  };
  // The daemons run detached: a test process that ends without stop() must not leave them.
  const killAllNow = () => {
    for (const name of ['client.rgw.a', 'osd.0', 'mon.a']) {
      const pid = pidOf(name);
      if (pid)
        try {
          process.kill(pid, 'SIGKILL');
        } catch {
          // gone already
        }
    }
  };
  process.on('exit', killAllNow);
  try {
    const monmap = join(dir, 'monmap');
    await run('monmaptool', [
      '--create',
      '--fsid',
      fsid,
      '--addv',
      'a',
      `[v2:127.0.0.1:${monPort}]`,
      monmap,
    ]);
    await run('ceph-mon', [...c, '--mkfs', '-i', 'a', '--monmap', monmap]);
    await run('ceph-mon', [...c, '-i', 'a']);
    const osdUuid = randomUUID();
    const osdId = (await run('ceph', [...c, 'osd', 'new', osdUuid])).trim();
    await run('ceph-osd', [...c, '-i', osdId, '--mkfs', '--osd-uuid', osdUuid]);
    await run('ceph-osd', [...c, '-i', osdId]);
    await waitFor(
      async () => (await run('ceph', [...c, 'osd', 'stat'])).includes('1 up'),
      'the ceph osd',
      30_000,
    );
    await startGateway();
    await run('radosgw-admin', [
      ...c,
      'user',
      'create',
      '--uid=pullcache',
      '--display-name=pullcache',
      `--access-key=${S3_ACCESS_KEY}`,
      `--secret-key=${S3_SECRET_KEY}`,
    ]);
  } catch (err) {
    await stopAll();
    rmSync(dir, { recursive: true, force: true });
    throw err;
  }
  const client = new S3Client({
    endpoint,
    region: 'us-east-1',
    forcePathStyle: true,
    credentials: { accessKeyId: S3_ACCESS_KEY, secretAccessKey: S3_SECRET_KEY },
  });
  return {
    endpoint,
    accessKey: S3_ACCESS_KEY,
    secretKey: S3_SECRET_KEY,
    client,
    async bucket() {
      const name = `test-${randomUUID().slice(0, 13)}`;
      // A gateway that has just started, on a machine busy with other test files, has once
      // answered the first CreateBucket with a body that is not XML (CI, stop 21): it is asked
      // again for a while, and a lasting failure names the status the gateway answered with.
      await waitFor(
        async () => {
          try {
            await client.send(new CreateBucketCommand({ Bucket: name }));
          } catch (err) {
            if ((err as { name?: string }).name === 'BucketAlreadyOwnedByYou') return true;
            const status = (err as { $metadata?: { httpStatusCode?: number } }).$metadata
              ?.httpStatusCode;
            throw new Error(`HTTP ${status ?? '-'}: ${String(err)}`);
          }
          return true;
        },
        `CreateBucket ${name}`,
        30_000,
      );
      return name;
    },
    stopGateway: (signal) => kill('client.rgw.a', signal),
    startGateway,
    async stop() {
      client.destroy();
      await stopAll();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}
