/**
 * The effective config as YAML for `pullcache config`: secrets redacted, durations and sizes in
 * the units the file takes (`tagTTL: 5m`, not 300000), so that the output loads back as the same
 * config. Which keys carry a unit is read from the schema (shape.ts).
 */
import { stringify } from 'yaml';
import { redactUserinfo } from './redact.js';
import type { Config } from './schema.js';
import { configShape, type KeyTree } from './shape.js';
import { formatDuration, formatShare, formatSize } from './units.js';

export function printConfig(config: Config): string {
  return stringify(inUnits(redactConfig(config), configShape()));
}

/** The config with every secret replaced, for `pullcache config` and logs. */
export function redactConfig(config: Config): Config {
  const copy = structuredClone(config);
  for (const upstream of Object.values(copy.upstreams)) {
    if (upstream.password !== undefined) upstream.password = '[redacted]';
  }
  if (copy.server.peerSecret !== '') copy.server.peerSecret = '[redacted]';
  copy.cache.redis.url = redactUserinfo(copy.cache.redis.url);
  return copy;
}

function inUnits(value: unknown, shape: KeyTree | undefined): unknown {
  if (typeof value === 'object' && value !== null && !Array.isArray(value)) {
    return Object.fromEntries(
      Object.entries(value).map(([key, v]) => [
        key,
        inUnits(
          v,
          shape?.kind === 'object'
            ? shape.children.get(key)
            : shape?.kind === 'record'
              ? shape.item
              : undefined,
        ),
      ]),
    );
  }
  if (typeof value !== 'number' || shape?.kind !== 'leaf') return value;
  if (shape.meta.unit === 'duration') return formatDuration(value);
  if (shape.meta.unit === 'size') return formatSize(value);
  if (shape.meta.unit === 'share') return formatShare(value);
  return value;
}
