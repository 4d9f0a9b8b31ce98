/**
 * The request headers pullcache parses itself, as clients send them and as an attacker might:
 * Range (a range or a list of them, else the whole blob) and If-None-Match. Hostile shapes are
 * answered at once: a regex that backtracked over a run of spaces held the event loop, and every
 * client with it, for seconds per request.
 */
import { describe, expect, test } from 'vitest';
import { parseRanges } from '../../src/http/range.js';
import { noneMatchHolds } from '../../src/http/manifests.js';

describe('Range', () => {
  test('the single-range forms, with the whitespace clients put around them', () => {
    expect(parseRanges('bytes=0-9')).toEqual([{ start: 0, end: 9 }]);
    expect(parseRanges('bytes=10-')).toEqual([{ start: 10 }]);
    expect(parseRanges('bytes=-10')).toEqual([{ suffix: 10 }]);
    expect(parseRanges(' BYTES = 1 - 2 ')).toEqual([{ start: 1, end: 2 }]);
    expect(parseRanges('bytes=5 -')).toEqual([{ start: 5 }]);
  });

  test('lists of ranges in the order given, empty elements skipped', () => {
    expect(parseRanges('bytes=0-1,5-6')).toEqual([
      { start: 0, end: 1 },
      { start: 5, end: 6 },
    ]);
    expect(parseRanges('bytes= 500-599 , -10,, 0-0,20-')).toEqual([
      { start: 500, end: 599 },
      { suffix: 10 },
      { start: 0, end: 0 },
      { start: 20 },
    ]);
    // What containers/image sends for a zstd:chunked layer: up to 1024 ranges at once.
    const many = Array.from(
      { length: 1024 },
      (_, i) => `${i * 3_000_000_000}-${i * 3_000_000_000 + 9}`,
    );
    expect(parseRanges(`bytes=${many.join(',')}`)).toHaveLength(1024);
  });

  test('anything else is no range (the whole blob is served)', () => {
    for (const header of [
      undefined,
      '',
      'bytes=-',
      'bytes=,',
      'bytes=9-3',
      'bytes=0-1,9-3',
      'bytes=0-1,x',
      'items=0-9',
      'bytes=a-b',
      'bytes 0-9',
      'bytes=0 1-2',
      // Longer than 1024 ranges can be: not read at all.
      `bytes=0-9${' '.repeat(40_000)}`,
    ])
      expect(parseRanges(header)).toBeUndefined();
  });

  // A guard against backtracking, not a speed target: the old regex took about 0.2 s for each of
  // these headers (cubic in the spaces; a 16 KiB one, minutes), the parser now microseconds.
  test('a header made of runs of spaces is refused at once, not backtracked over', () => {
    const started = performance.now();
    for (let i = 0; i < 10; i++) {
      expect(parseRanges(`bytes=${' '.repeat(600)}-${' '.repeat(600)}x`)).toBeUndefined();
      expect(parseRanges(`bytes=${' '.repeat(16_000)}-${' '.repeat(16_000)}x`)).toBeUndefined();
      expect(parseRanges(`bytes=0-1,${' ,'.repeat(8_000)}x`)).toBeUndefined();
    }
    expect(parseRanges(`bytes=${' '.repeat(90)}0-${' '.repeat(90)}`)).toEqual([{ start: 0 }]);
    expect(performance.now() - started).toBeLessThan(500);
  });
});

describe('If-None-Match', () => {
  const etag = '"sha256:abc"';

  test('a list of entity tags, weak or strong, `*`, or the bare digest', () => {
    expect(noneMatchHolds('"sha256:abc"', etag)).toBe(true);
    expect(noneMatchHolds('W/"sha256:abc"', etag)).toBe(true);
    expect(noneMatchHolds('"x", W/"y" ,"sha256:abc"', etag)).toBe(true);
    expect(noneMatchHolds('*', etag)).toBe(true);
    expect(noneMatchHolds('sha256:abc', etag)).toBe(true);
    expect(noneMatchHolds('"x", "y"', etag)).toBe(false);
    expect(noneMatchHolds('"sha256:abcd"', etag)).toBe(false);
    expect(noneMatchHolds(undefined, etag)).toBe(false);
  });

  // As above, a guard: about 0.2 s a header before (quadratic), microseconds now.
  test('a header made of a long run of spaces is read in linear time', () => {
    const started = performance.now();
    for (let i = 0; i < 10; i++)
      expect(noneMatchHolds(`x${' '.repeat(16_000)}y z`, etag)).toBe(false);
    expect(performance.now() - started).toBeLessThan(500);
  });
});
