/**
 * The image references of a command line (prefetch, export, pin, unpin, rm), checked before the
 * command does any work: a reference it cannot use is the command used wrongly (exit 2), told
 * once, rather than a failure found halfway (exit 1) or an image of another upstream.
 */
import type { Config } from '../config/schema.js';
import { looksLikeHost, parseLocation } from '../routing.js';

/** The configured upstreams, as the problems below list them. */
export function configuredUpstreams(config: Config): string {
  return Object.keys(config.upstreams).join(', ') || 'none';
}

/** A name as typed, quoted only when it holds a space or a control character (one line). */
const show = (name: string) => (/^[\x21-\x7e]+$/.test(name) ? name : JSON.stringify(name));

/** `--upstream NAME` and the like: the problem with a name that is not a configured upstream. */
export function upstreamProblem(config: Config, name: string): string | undefined {
  if (Object.hasOwn(config.upstreams, name)) return undefined;
  return `no upstream ${show(name)} is configured (configured: ${configuredUpstreams(config)})`;
}

/** What is wrong with each reference that cannot be used, one line each; empty when none. */
export function referenceProblems(config: Config, references: string[]): string[] {
  const problems: string[] = [];
  for (const reference of references) {
    const slash = reference.indexOf('/');
    const first = slash > 0 ? reference.slice(0, slash) : undefined;
    const named = first !== undefined && Object.hasOwn(config.upstreams, first);
    if (first !== undefined && !named && looksLikeHost(first)) {
      problems.push(upstreamProblem(config, first)!);
      continue;
    }
    if (!named && config.routing.default === undefined) {
      const configured = `configured: ${configuredUpstreams(config)}`;
      const why = `names no upstream, and there is no routing.default (${configured})`;
      problems.push(`${JSON.stringify(reference)} ${why}`);
      continue;
    }
    try {
      parseLocation(config, reference);
    } catch (err) {
      // The parser's reason quotes what it refused; the reference itself says where.
      problems.push(`invalid reference ${JSON.stringify(reference)}: ${(err as Error).message}`);
    }
  }
  return problems;
}
