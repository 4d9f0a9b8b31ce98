/**
 * Counters and histograms for the hot paths, whose values live in plain "cells" bound once to
 * their labels: a request adds to a number (`cell.value += n`) instead of prom-client's `inc`,
 * which builds a label hash string and validates the labels on every call. They are prom-client
 * metrics all the same (registered, scraped and printed by its registry): only `get` differs,
 * reading the cells at scrape time.
 */
import { Counter, Histogram, type Registry } from 'prom-client';

/** One labelled counter value. */
export interface CounterCell {
  value: number;
}

/** One labelled histogram: counts per bucket (not cumulative), their sum and count. */
export class HistogramCell {
  readonly counts: number[];
  sum = 0;
  count = 0;

  constructor(private readonly bounds: readonly number[]) {
    this.counts = new Array<number>(bounds.length).fill(0);
  }

  observe(value: number): void {
    this.sum += value;
    this.count++;
    const bounds = this.bounds;
    for (let i = 0; i < bounds.length; i++) {
      if (value <= bounds[i]!) {
        this.counts[i]!++;
        return;
      }
    }
  }
}

/** Label values in a fixed order, joined: the key of a cell. */
const keyOf = (values: readonly (string | number)[]) => values.join('\u0000');

export class CellCounter<L extends string> extends Counter<L> {
  private readonly cells = new Map<string, { labels: Record<L, string>; cell: CounterCell }>();
  private readonly names: readonly L[];

  constructor(options: {
    name: string;
    help: string;
    labelNames: readonly L[];
    registry: Registry;
  }) {
    super({
      name: options.name,
      help: options.help,
      labelNames: options.labelNames,
      registers: [options.registry],
    });
    this.names = options.labelNames;
  }

  /** The cell of these label values (in `labelNames` order), made on first use. */
  cell(...values: (string | number)[]): CounterCell {
    const key = keyOf(values);
    let entry = this.cells.get(key);
    if (!entry) {
      const labels = Object.fromEntries(this.names.map((n, i) => [n, String(values[i])]));
      entry = { labels: labels as Record<L, string>, cell: { value: 0 } };
      this.cells.set(key, entry);
    }
    return entry.cell;
  }

  /** Every cell with its labels, for sums (the status page). */
  *entries(): Iterable<[Record<L, string>, CounterCell]> {
    for (const { labels, cell } of this.cells.values()) yield [labels, cell];
  }

  override async get() {
    const base = await super.get();
    return {
      ...base,
      values: [...this.cells.values()].map(({ labels, cell }) => ({ labels, value: cell.value })),
    };
  }
}

export class CellHistogram<L extends string> extends Histogram<L> {
  private readonly cells = new Map<string, { labels: Record<L, string>; cell: HistogramCell }>();
  private readonly names: readonly L[];
  private readonly bounds: readonly number[];
  private readonly metricName: string;
  private readonly helpText: string;

  constructor(options: {
    name: string;
    help: string;
    labelNames: readonly L[];
    buckets: number[];
    registry: Registry;
  }) {
    super({
      name: options.name,
      help: options.help,
      labelNames: options.labelNames,
      buckets: options.buckets,
      registers: [options.registry],
    });
    this.names = options.labelNames;
    this.bounds = [...options.buckets].sort((a, b) => a - b);
    this.metricName = options.name;
    this.helpText = options.help;
  }

  cell(...values: (string | number)[]): HistogramCell {
    const key = keyOf(values);
    let entry = this.cells.get(key);
    if (!entry) {
      const labels = Object.fromEntries(this.names.map((n, i) => [n, String(values[i])]));
      entry = { labels: labels as Record<L, string>, cell: new HistogramCell(this.bounds) };
      this.cells.set(key, entry);
    }
    return entry.cell;
  }

  override async get() {
    const { bounds, metricName: name } = this;
    const values: Awaited<ReturnType<Histogram<L>['get']>>['values'] = [];
    // `le` is no label name of ours, but of every bucket line.
    const withBound = (labels: Record<L, string>, le: number | string) =>
      ({ ...labels, le }) as Record<L, string>;
    for (const { labels, cell } of this.cells.values()) {
      let cumulative = 0;
      bounds.forEach((bound, i) => {
        cumulative += cell.counts[i]!;
        values.push({
          metricName: `${name}_bucket`,
          labels: withBound(labels, bound),
          value: cumulative,
        });
      });
      values.push({
        metricName: `${name}_bucket`,
        labels: withBound(labels, '+Inf'),
        value: cell.count,
      });
      values.push({ metricName: `${name}_sum`, labels, value: cell.sum });
      values.push({ metricName: `${name}_count`, labels, value: cell.count });
    }
    // Not super.get(): prom-client's own reads the values through getForPromString, below.
    const metric = { name, help: this.helpText, type: 'histogram', aggregator: 'sum', values };
    return metric as unknown as Awaited<ReturnType<Histogram<L>['get']>>;
  }

  /** prom-client's registry prints a histogram from this when it exists. */
  getForPromString() {
    return this.get();
  }
}
