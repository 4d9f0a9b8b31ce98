/** What the config tests share: the problems a load reports, and a YAML file to load. */
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ConfigError } from '../../src/config/load.js';

/** The problems `fn` (a parse or a load) reports; [] when it reports none. */
export function problems(fn: () => unknown): string[] {
  try {
    fn();
  } catch (err) {
    if (err instanceof ConfigError) return err.problems;
    throw err;
  }
  return [];
}

/** `text` in a config.yaml of a new temporary directory. */
export function yamlFile(text: string): string {
  const file = join(mkdtempSync(join(tmpdir(), 'pullcache-config-')), 'config.yaml');
  writeFileSync(file, text);
  return file;
}
