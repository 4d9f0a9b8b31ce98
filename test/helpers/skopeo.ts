import { execFile } from 'node:child_process';
import { promisify } from 'node:util';

const run = promisify(execFile);

/** Runs skopeo against plain-HTTP registries; rejects with its stderr on failure. */
export async function skopeo(...args: string[]): Promise<string> {
  try {
    const { stdout } = await run('skopeo', ['--insecure-policy', ...args], {
      timeout: 120_000,
      maxBuffer: 64 * 1024 * 1024,
    });
    return stdout;
  } catch (err) {
    const e = err as { stderr?: string; message: string };
    throw new Error(`skopeo ${args.join(' ')} failed: ${e.stderr || e.message}`);
  }
}

/** `skopeo copy docker://HOST/REF dir:DEST` from an insecure (http) registry. */
export function skopeoCopy(
  host: string,
  ref: string,
  dest: string,
  ...extra: string[]
): Promise<string> {
  return skopeo(
    'copy',
    '--src-tls-verify=false',
    ...extra,
    `docker://${host}/${ref}`,
    `dir:${dest}`,
  );
}
