/**
 * The fleet's deployment examples, validated as files: no cluster and no nginx here. The
 * Kubernetes manifest's pullcache config goes through the project's own loader with the
 * environment its Deployment gives the container, as a pod would start with it.
 */
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parse as parseYaml, parseAllDocuments } from 'yaml';
import { afterAll, describe, expect, test } from 'vitest';
import { loadConfig } from '../../src/config/load.js';

const MANIFEST = 'deploy/kubernetes/pullcache.yaml';
const NGINX = 'deploy/nginx/pullcache.conf';
/** Where the image reads its config (PULLCACHE_CONFIG in the Dockerfile). */
const IMAGE_CONFIG = '/etc/pullcache/config.yaml';
/** A pod's address, as the downward API would give it. */
const POD_IP = '10.244.1.7';
/** What one pullcache process peaks at (docs/memory.md: 150.5 MB at most over the benchmark). */
const PROCESS_PEAK_BYTES = 150e6;

interface Manifest {
  kind: string;
  metadata: { name: string; labels?: Record<string, string> };
  spec?: Record<string, unknown>;
  data?: Record<string, string>;
}

interface EnvVar {
  name: string;
  value?: string;
  valueFrom?: {
    fieldRef?: { fieldPath: string };
    secretKeyRef?: { name: string; key: string };
  };
}

interface Probe {
  httpGet?: { path: string; port: number | string };
}

interface Container {
  name: string;
  image: string;
  ports?: { name?: string; containerPort: number }[];
  env?: EnvVar[];
  readinessProbe?: Probe;
  livenessProbe?: Probe;
  lifecycle?: { preStop?: { exec?: { command: string[] } } };
  resources?: { limits?: { memory?: string } };
  securityContext?: { readOnlyRootFilesystem?: boolean };
  volumeMounts?: { name: string; mountPath: string; subPath?: string }[];
}

interface PodSpec {
  terminationGracePeriodSeconds?: number;
  securityContext?: { runAsNonRoot?: boolean; runAsUser?: number };
  containers: Container[];
  volumes?: { name: string; configMap?: { name: string }; emptyDir?: object }[];
}

interface DeploymentSpec {
  replicas: number;
  selector: { matchLabels: Record<string, string> };
  template: { metadata: { labels: Record<string, string> }; spec: PodSpec };
}

interface ServiceSpec {
  type?: string;
  selector: Record<string, string>;
  ports: { port: number; targetPort?: number | string }[];
}

const manifestText = readFileSync(MANIFEST, 'utf8');
const documents = parseAllDocuments(manifestText);
const objects = documents.map((d) => d.toJS() as Manifest);

function find(kind: string, name: string): Manifest {
  const found = objects.find((o) => o.kind === kind && o.metadata.name === name);
  if (!found) throw new Error(`${MANIFEST} has no ${kind} ${name}`);
  return found;
}

const deployment = find('Deployment', 'pullcache');
const deploymentSpec = deployment.spec as unknown as DeploymentSpec;
const pod = deploymentSpec.template.spec;
const container = pod.containers.find((c) => c.name === 'pullcache')!;

/** A container port by number or by name, as a probe or a Service's targetPort gives it. */
function containerPort(port: number | string | undefined): number | undefined {
  if (typeof port === 'number') return port;
  return container.ports?.find((p) => p.name === port)?.containerPort;
}

/** A Kubernetes quantity of bytes ("256Mi", "1G", "300000000") as a number. */
function bytes(quantity: string): number {
  const m = /^(\d+)(Ki|Mi|Gi|k|M|G)?$/.exec(quantity);
  if (!m) throw new Error(`not a quantity of bytes: ${quantity}`);
  const unit = { Ki: 2 ** 10, Mi: 2 ** 20, Gi: 2 ** 30, k: 1e3, M: 1e6, G: 1e9 };
  return Number(m[1]) * (m[2] ? unit[m[2] as keyof typeof unit] : 1);
}

/**
 * The container's environment as the kubelet makes it: $(NAME) of an earlier variable expanded
 * ($$ escapes), a secret's key as a stand-in value, and the pod's IP from the downward API.
 */
function containerEnv(): { env: Record<string, string>; secrets: Map<string, string> } {
  const env: Record<string, string> = {};
  const secrets = new Map<string, string>(); // variable -> "secret/key"
  for (const v of container.env ?? []) {
    if (v.value !== undefined) {
      env[v.name] = v.value.replace(/\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)/g, (ref, name?: string) =>
        name === undefined ? '$' : (env[name] ?? ref),
      );
    } else if (v.valueFrom?.fieldRef) {
      expect(v.valueFrom.fieldRef.fieldPath).toBe('status.podIP');
      env[v.name] = POD_IP;
    } else if (v.valueFrom?.secretKeyRef) {
      const { name, key } = v.valueFrom.secretKeyRef;
      secrets.set(v.name, `${name}/${key}`);
      env[v.name] = `stand-in for ${name}/${key}`;
    } else {
      throw new Error(`env ${v.name}: neither a value nor a source this test knows`);
    }
  }
  return { env, secrets };
}

/** The ConfigMap's config file, as mounted in the pod. */
const configDir = mkdtempSync(join(tmpdir(), 'pullcache-fleet-'));
const configFile = join(configDir, 'config.yaml');
writeFileSync(configFile, find('ConfigMap', 'pullcache').data?.['config.yaml'] ?? '');
afterAll(() => rmSync(configDir, { recursive: true, force: true }));

/** The pullcache config of the ConfigMap, loaded as the pod loads it. */
function podConfig() {
  return loadConfig({ file: configFile, env: containerEnv().env });
}

describe(MANIFEST, () => {
  test('is valid YAML of a ConfigMap, a Deployment of several replicas, and a Service', () => {
    for (const d of documents) expect(d.errors.map((e) => e.message)).toEqual([]);
    const kinds = objects.map((o) => o.kind);
    expect(kinds).toContain('ConfigMap');
    expect(kinds).toContain('Deployment');
    expect(kinds).toContain('Service');
    expect(deploymentSpec.replicas).toBeGreaterThanOrEqual(2);
  });

  test('mounts the ConfigMap where the image reads its config', () => {
    const volume = pod.volumes?.find((v) => v.configMap?.name === 'pullcache');
    expect(volume).toBeDefined();
    const mount = container.volumeMounts?.find((m) => m.name === volume?.name);
    expect(mount).toBeDefined();
    // The whole map as a directory (its key is the file name), or one key by subPath.
    const path = mount?.subPath ? mount.mountPath : `${mount?.mountPath}/config.yaml`;
    expect(path).toBe(IMAGE_CONFIG);
    expect(readFileSync('Dockerfile', 'utf8')).toContain(`PULLCACHE_CONFIG=${IMAGE_CONFIG}`);
  });

  test("the ConfigMap's config loads with the Deployment's environment: replicas on Redis and S3, advertising the pod's IP", () => {
    // loadConfig also refuses a PULLCACHE_* variable that names no key, as start-up would.
    const config = podConfig();
    expect(config.server.advertise).toBe(`http://${POD_IP}:5000`);
    expect(config.cache.store).toBe('redis');
    expect(config.storage.driver).toBe('s3');

    const [host, port] = config.server.listen.split(':');
    expect(host).toBe('0.0.0.0');
    expect(container.ports?.map((p) => p.containerPort)).toContain(Number(port));
    // Other replicas dial the advertised address: the port the container listens on.
    expect(new URL(config.server.advertise).port).toBe(port);
  });

  test('the secrets the config names by variable come from the Secret that the comment creates', () => {
    const config = podConfig();
    const { secrets } = containerEnv();
    const named = [
      config.server.peerSecretEnv,
      config.storage.s3.accessKeyEnv,
      config.storage.s3.secretKeyEnv,
    ];
    expect(config.server.peerSecret).toBe('');
    for (const variable of named) {
      expect(variable).not.toBe('');
      expect(secrets.get(variable), variable).toMatch(/^pullcache\//);
    }
    // The `kubectl create secret generic pullcache` example makes every key the pod reads.
    const created = [...manifestText.matchAll(/--from-literal=([\w-]+)=/g)].map((m) => m[1]);
    expect(manifestText).toMatch(/kubectl .*create secret generic pullcache/);
    for (const ref of secrets.values()) expect(created).toContain(ref.slice('pullcache/'.length));
  });

  test("the commented Docker Hub credentials, once uncommented, load as the upstream's", () => {
    // The commented `- name:` entries of the container's env, as the reader would uncomment them.
    const block = /^(\s*)# - name: PULLCACHE_UPSTREAMS_DOCKER_IO_USERNAME\n(?:\1#.*\n)+/m.exec(
      manifestText,
    );
    expect(block).not.toBeNull();
    const uncommented = block![0].replace(/^(\s*)# ?/gm, '$1');
    const extra = parseYaml(uncommented) as EnvVar[];
    const env = { ...containerEnv().env };
    for (const v of extra) {
      if (v.value !== undefined) env[v.name] = v.value;
      else if (v.valueFrom?.secretKeyRef) env[v.name] = 'stand-in';
    }
    const hub = loadConfig({ file: configFile, env }).upstreams['docker.io']!;
    expect(hub.username).toBe('someone');
    const token = extra.find((v) => v.name === hub.passwordEnv);
    expect(token?.valueFrom?.secretKeyRef?.name).toBe('pullcache');
  });

  test('probes /readyz for readiness and /healthz for liveness, on the port pullcache listens on', () => {
    const port = Number(podConfig().server.listen.split(':')[1]);
    expect(container.readinessProbe?.httpGet?.path).toBe('/readyz');
    expect(containerPort(container.readinessProbe?.httpGet?.port)).toBe(port);
    expect(container.livenessProbe?.httpGet?.path).toBe('/healthz');
    expect(containerPort(container.livenessProbe?.httpGet?.port)).toBe(port);
  });

  test('a stopping pod leaves the Service before its SIGTERM, and is not killed while it drains', () => {
    const preStop = container.lifecycle?.preStop?.exec?.command ?? [];
    expect(preStop[0]).toBe('sleep');
    const sleep = Number(preStop[1]);
    expect(sleep).toBeGreaterThanOrEqual(2);
    // The kubelet's grace period covers preStop, the drain, and the rest of closing (cli.ts: 10 s).
    const grace = (pod.terminationGracePeriodSeconds ?? 30) * 1000;
    expect(grace).toBeGreaterThanOrEqual(sleep * 1000 + podConfig().server.drainTimeout + 10_000);
  });

  test("the Service selects the Deployment's pods and reaches their port", () => {
    const service = find('Service', 'pullcache').spec as unknown as ServiceSpec;
    expect(service.type ?? 'ClusterIP').toBe('ClusterIP');
    const labels = deploymentSpec.template.metadata.labels;
    expect(Object.keys(service.selector).length).toBeGreaterThan(0);
    for (const [k, v] of Object.entries(service.selector)) expect(labels[k], k).toBe(v);
    for (const [k, v] of Object.entries(deploymentSpec.selector.matchLabels))
      expect(labels[k], k).toBe(v);
    const port = Number(podConfig().server.listen.split(':')[1]);
    expect(service.ports.map((p) => containerPort(p.targetPort ?? p.port))).toContain(port);
  });

  test('Redis is there under the name the config dials', () => {
    const url = new URL(podConfig().cache.redis.url);
    const redis = find('Service', url.hostname).spec as unknown as ServiceSpec;
    expect(redis.ports.map((p) => p.port)).toContain(Number(url.port || 6379));
  });

  test("a memory limit that holds the config's processes, non-root as a number, and a writable spool", () => {
    const config = podConfig();
    // The limit is sized for one process per pod (workers: 0 would be one per node core).
    expect(config.server.workers).toBe(1);
    const limit = container.resources?.limits?.memory;
    expect(limit).toBeDefined();
    expect(bytes(limit!)).toBeGreaterThanOrEqual(1.5 * PROCESS_PEAK_BYTES);

    // The image's USER is a name, which the kubelet cannot check for runAsNonRoot: a uid must
    // be given (else every pod fails to start with "image has non-numeric user").
    expect(readFileSync('Dockerfile', 'utf8')).toMatch(/^USER [a-z]+$/m);
    expect(pod.securityContext?.runAsNonRoot).toBe(true);
    expect(pod.securityContext?.runAsUser).toBeGreaterThan(0);

    // S3 spools blobs being fetched to the temporary directory: with a read-only root, /tmp
    // must be a volume.
    if (container.securityContext?.readOnlyRootFilesystem) {
      const tmp = container.volumeMounts?.find((m) => m.mountPath === '/tmp');
      expect(pod.volumes?.find((v) => v.name === tmp?.name)?.emptyDir).toBeDefined();
    }
  });
});

describe(NGINX, () => {
  const conf = readFileSync(NGINX, 'utf8').replace(/#.*$/gm, '');

  /** The value of each `directive value;` in the file, comments left out. */
  const values = (directive: string) =>
    [...conf.matchAll(new RegExp(`^\\s*${directive}\\s+([^;]*);`, 'gm'))].map((m) => m[1]!.trim());

  /** Whether an nginx location (its modifier and pattern) takes `path`. */
  function takes(modifier: string | undefined, pattern: string, path: string): boolean {
    if (modifier === '~*') return new RegExp(pattern, 'i').test(path);
    if (modifier === '~') return new RegExp(pattern).test(path);
    if (modifier === '=') return path === pattern;
    return path.startsWith(pattern);
  }

  test('refuses the peer endpoint to every client, whatever the case of the path', () => {
    const blocks = [...conf.matchAll(/location\s+(~\*?|\^~|=)?\s*(\S+)\s*\{([^}]*)\}/g)];
    const refusing = blocks.filter((b) => /^\s*return\s+403\s*;\s*$/.test(b[3]!));
    expect(refusing.length).toBeGreaterThan(0);
    const refused = (path: string) => refusing.some(([, m, pattern]) => takes(m, pattern!, path));
    const digest = `sha256:${'a'.repeat(64)}`;
    expect(refused(`/_pullcache/v1/peer/blobs/${digest}`)).toBe(true);
    // Express routes ignore case: so must the block.
    expect(refused(`/_PullCache/V1/Peer/blobs/${digest}`)).toBe(true);
    // Clients' own paths, the admin API's included, are not refused.
    expect(refused('/v2/library/alpine/manifests/3.20')).toBe(false);
    expect(refused('/_pullcache/v1/images')).toBe(false);
  });

  test('streams: no buffering either way, HTTP/1.1 with keepalive to the replicas', () => {
    expect(values('proxy_buffering')).toEqual(['off']);
    expect(values('proxy_request_buffering')).toEqual(['off']);
    expect(values('proxy_http_version')).toEqual(['1.1']);
    expect(values('proxy_set_header')).toContain('Connection ""');
    expect(values('keepalive').length).toBe(1);
  });

  test('passes the host with its port and the client address, and waits longer than pullcache does', () => {
    const headers = values('proxy_set_header');
    expect(headers).toContain('Host $http_host');
    expect(headers).toContain('X-Forwarded-For $proxy_add_x_forwarded_for');
    expect(headers).toContain('X-Forwarded-Proto $scheme');
    // Longer than an upstream's headers timeout and bodyIdle together (30 s each by default).
    const [timeout] = values('proxy_read_timeout');
    const m = /^(\d+)(s|m)?$/.exec(timeout ?? '');
    expect(m).not.toBeNull();
    expect(Number(m![1]) * (m![2] === 'm' ? 60 : 1)).toBeGreaterThan(60);
  });

  test('balances over several replicas and terminates TLS', () => {
    const upstream = /upstream\s+(\S+)\s*\{([^}]*)\}/.exec(conf);
    expect(upstream).not.toBeNull();
    expect([...upstream![2]!.matchAll(/^\s*server\s+\S+/gm)].length).toBeGreaterThanOrEqual(2);
    expect(values('proxy_pass')).toContain(`http://${upstream![1]}`);
    expect(values('listen')).toContain('443 ssl');
    expect(values('ssl_certificate').length).toBe(1);
    expect(values('ssl_certificate_key').length).toBe(1);
  });
});

describe('the fleet documentation', () => {
  test('links to both examples from the README and docs/fleet.md', () => {
    const readme = readFileSync('README.md', 'utf8');
    const fleet = readFileSync('docs/fleet.md', 'utf8');
    for (const file of [MANIFEST, NGINX]) {
      expect(readme.includes(`](${file})`), `README.md links ${file}`).toBe(true);
      expect(fleet.includes(`](../${file})`), `docs/fleet.md links ${file}`).toBe(true);
    }
    expect(readme.includes('](docs/fleet.md)'), 'README.md links docs/fleet.md').toBe(true);
  });
});
