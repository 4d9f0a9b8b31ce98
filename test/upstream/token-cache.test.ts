/** The upstream tokens kept per scope: reused while fresh, and bounded however many scopes. */
import { expect, test } from 'vitest';
import { TOKEN_CACHE_BYTES, TokenCache, type Token } from '../../src/upstream/auth.js';

const token = (value: string, refreshAt: number): Token => ({ value, refreshAt });

test('a token is reused until its refresh time, then fetched again', async () => {
  let now = 1_000;
  const cache = new TokenCache(() => now);
  let fetched = 0;
  const fetch = () => Promise.resolve(token(`t${++fetched}`, 2_000));
  expect((await cache.obtain('repository:a:pull', fetch)).value).toBe('t1');
  expect((await cache.obtain('repository:a:pull', fetch)).value).toBe('t1');
  now = 2_000;
  expect((await cache.obtain('repository:a:pull', fetch)).value).toBe('t2');
});

test('the tokens of scopes asked once (repository names clients made up) do not pile up', async () => {
  // A scope is one repository, and clients choose its name: 10,000 names of 2 KB tokens
  // (distribution's are 2,143 characters) were 25 MB that stayed for ever.
  const cache = new TokenCache(() => 0);
  const value = 'x'.repeat(2_048);
  for (let i = 0; i < 10_000; i++)
    await cache.obtain(`repository:lib/missing${i}:pull`, () =>
      Promise.resolve(token(`${value}${i}`, 1e15)),
    );
  expect(cache.size).toBeGreaterThan(1_000);
  expect(cache.size * value.length).toBeLessThanOrEqual(TOKEN_CACHE_BYTES);
  // The most recent are the ones kept; the oldest are fetched again when asked.
  let fetched = 0;
  const again = (i: number) =>
    cache.obtain(`repository:lib/missing${i}:pull`, () => {
      fetched++;
      return Promise.resolve(token('new', 1e15));
    });
  expect((await again(9_999)).value).toBe(`${value}9999`);
  expect(fetched).toBe(0);
  expect((await again(0)).value).toBe('new');
  expect(fetched).toBe(1);
});
