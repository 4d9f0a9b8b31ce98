import { expect, test } from 'vitest';
import { UpstreamHealth } from '../../src/upstream/health.js';

function clock() {
  let t = 1000;
  return { now: () => t, advance: (ms: number) => (t += ms) };
}

test('opens after consecutive failures, lets one probe through after the interval, closes on success', () => {
  const c = clock();
  const h = new UpstreamHealth({ threshold: 3, baseInterval: 1000, maxInterval: 8000, now: c.now });
  for (let i = 0; i < 3; i++) {
    expect(h.admit()).toBe(true);
    h.failure();
  }
  expect(h.state).toBe('open');
  expect(h.admit()).toBe(false);
  c.advance(1001);
  expect(h.state).toBe('half-open');
  expect(h.admit()).toBe(true); // the probe
  expect(h.admit()).toBe(false); // only one at a time
  h.success();
  expect(h.state).toBe('closed');
  expect(h.admit()).toBe(true);
});

test('a failed probe doubles the interval, up to the maximum', () => {
  const c = clock();
  const h = new UpstreamHealth({ threshold: 1, baseInterval: 1000, maxInterval: 3000, now: c.now });
  h.failure();
  const waits: number[] = [];
  for (let round = 0; round < 4; round++) {
    let waited = 0;
    while (!h.admit()) {
      c.advance(100);
      waited += 100;
    }
    waits.push(waited);
    h.failure();
  }
  expect(waits[0]).toBeGreaterThanOrEqual(1000);
  expect(waits[1]).toBeGreaterThanOrEqual(2000);
  expect(waits[2]).toBeGreaterThanOrEqual(3000);
  expect(waits[3]).toBeLessThan(3200);
});

test('a success before the threshold resets the count', () => {
  const h = new UpstreamHealth({ threshold: 2 });
  h.failure();
  h.success();
  h.failure();
  expect(h.state).toBe('closed');
});
