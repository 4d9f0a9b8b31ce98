/**
 * Manifests per second with client authentication on (issue 14): a pullcache process with an
 * htpasswd file (every user may pull everything), the manifest by digest asked by wrk with a token
 * of pullcache's realm (what docker, podman and containerd send after logging in) and with Basic
 * credentials (a containerd hosts.toml header, scripts). Both are answered from memory after the
 * first request: a verified password is remembered, a token is checked by its HMAC.
 */
import { execFileSync } from 'node:child_process';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { curlGet, wrk } from './measure.js';
import { startPullcacheProcess } from './servers.js';

export interface AuthFigures {
  tokenRps: number;
  basicRps: number;
  errors: number;
}

export async function measureAuthenticated(
  dir: string,
  upstreamUrl: string,
  manifestPath: string,
  accept: string,
): Promise<AuthFigures> {
  mkdirSync(dir, { recursive: true });
  const htpasswd = join(dir, 'htpasswd');
  execFileSync('htpasswd', ['-cbB', htpasswd, 'bench', 'bench-pw'], { stdio: 'pipe' });
  const server = await startPullcacheProcess(join(dir, 'server'), upstreamUrl, { htpasswd });
  try {
    const basic = `Basic ${Buffer.from('bench:bench-pw').toString('base64')}`;
    const res = await fetch(`${server.url}/_pullcache/token`, {
      headers: { Authorization: basic },
    });
    const token = `Bearer ${((await res.json()) as { token: string }).token}`;
    const url = `${server.url}${manifestPath}`;
    // The manifest cached and the password verified before measuring.
    for (const authorization of [basic, token]) {
      const t = await curlGet(url, { Accept: accept, Authorization: authorization });
      if (t.status !== 200) throw new Error(`authenticated manifest GET gave HTTP ${t.status}`);
    }
    const byToken = await wrk(url, { Accept: accept, Authorization: token });
    const byBasic = await wrk(url, { Accept: accept, Authorization: basic });
    return {
      tokenRps: byToken.rps,
      basicRps: byBasic.rps,
      errors: byToken.errors + byBasic.errors,
    };
  } finally {
    await server.stop();
  }
}
