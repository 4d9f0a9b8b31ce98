/** Human units in config: durations ("500ms", "30s", "5m", "1h", "7d") and sizes ("4MiB", "50GiB", "1GB"). */

const DURATION_UNITS: Record<string, number> = {
  ms: 1,
  s: 1000,
  m: 60_000,
  h: 3_600_000,
  d: 86_400_000,
};
const SIZE_UNITS: Record<string, number> = {
  b: 1,
  kb: 1e3,
  mb: 1e6,
  gb: 1e9,
  tb: 1e12,
  kib: 1024,
  mib: 1024 ** 2,
  gib: 1024 ** 3,
  tib: 1024 ** 4,
};

/** Milliseconds from "5m" or a bare number of milliseconds; undefined if not a duration. */
export function parseDuration(value: string | number): number | undefined {
  // Whole milliseconds, as "1.5ms" is read: 1.5 would print as "1.5ms" and load back as 2.
  if (typeof value === 'number')
    return Number.isFinite(value) && value >= 0 ? Math.round(value) : undefined;
  // A bare number is milliseconds here; the schema refuses one other than 0 in a config.
  const m = /^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$/.exec(value);
  if (!m) return undefined;
  return Math.round(Number(m[1]) * DURATION_UNITS[m[2] ?? 'ms']!);
}

/**
 * Bytes from "4MiB" or a bare number of bytes; undefined if not a size. It may be beyond
 * Number.MAX_SAFE_INTEGER ("99999999999TiB"), where bytes no longer count exactly: the schema
 * refuses that with its own message.
 */
export function parseSize(value: string | number): number | undefined {
  if (typeof value === 'number') return Number.isInteger(value) && value >= 0 ? value : undefined;
  const m = /^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*$/i.exec(value);
  if (!m) return undefined;
  return Math.round(Number(m[1]) * SIZE_UNITS[(m[2] ?? 'b').toLowerCase()]!);
}

/** A share of a whole from "90%" or a bare number (0.9); undefined if not one. */
export function parseShare(value: string | number): number | undefined {
  if (typeof value === 'number') return Number.isFinite(value) ? value : undefined;
  const m = /^\s*(\d+(?:\.\d+)?)\s*%\s*$/.exec(value);
  return m ? Number(m[1]) / 100 : undefined;
}

/**
 * "90%" for 0.9: the shortest percentage that parseShare reads back as the very same number,
 * else the number itself (which it takes as is): 0.3333 is "33.33%", never a rounded "33.3%".
 */
export function formatShare(share: number): string | number {
  for (let digits = 0; digits <= 16; digits++) {
    const percent = String(Number((share * 100).toFixed(digits)));
    // An exponent ("1e-7") is no percentage parseShare takes.
    if (/^\d+(\.\d+)?$/.test(percent) && parseShare(`${percent}%`) === share) return `${percent}%`;
  }
  return share;
}

export function formatBytes(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = bytes;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${i === 0 ? v : v.toFixed(1)} ${units[i]}`;
}

/** "5m" for 300000: the largest unit that states `ms` exactly, so that parseDuration reads it back. */
export function formatDuration(ms: number): string {
  for (const unit of ['d', 'h', 'm', 's'] as const) {
    const n = DURATION_UNITS[unit]!;
    if (ms >= n && ms % n === 0) return `${ms / n}${unit}`;
  }
  return ms === 0 ? '0s' : `${ms}ms`;
}

/** "4MiB" for 4194304: binary units first, then decimal ones, else bytes; parseSize reads it back. */
export function formatSize(bytes: number): string {
  for (const unit of ['TiB', 'GiB', 'MiB', 'KiB', 'TB', 'GB', 'MB', 'kB'] as const) {
    const n = SIZE_UNITS[unit.toLowerCase()]!;
    if (bytes >= n && bytes % n === 0) return `${bytes / n}${unit}`;
  }
  return `${bytes}B`;
}
