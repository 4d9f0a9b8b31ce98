/**
 * The shape of the config keys, read off the zod schema: which keys are sections, which is the
 * map of upstreams, and what each leaf is (a list, a duration, a size, a secret). Environment
 * names, error messages and `pullcache config`'s units all follow it, so no key is listed twice.
 */
import { configMeta, type KeyMeta } from './key-types.js';
import { configSchema } from './schema.js';

export type KeyTree =
  | { kind: 'object'; children: Map<string, KeyTree> }
  | { kind: 'record'; item: KeyTree }
  | { kind: 'leaf'; list: boolean; meta: KeyMeta };

interface ZodLike {
  _zod: { def: Record<string, unknown> };
}

function keyTree(schema: ZodLike): KeyTree {
  let node = schema;
  let meta: KeyMeta = {};
  // Unwrap defaults, optionals and transforms down to the structural type, collecting the marks
  // made on any of the wrappers.
  for (;;) {
    meta = { ...configMeta.get(node as never), ...meta };
    const def = node._zod.def;
    if (def.innerType) node = def.innerType as ZodLike;
    else if (def.type === 'pipe') node = def.in as ZodLike;
    else break;
  }
  const def = node._zod.def;
  if (def.type === 'object') {
    const children = new Map<string, KeyTree>();
    for (const [key, value] of Object.entries(def.shape as Record<string, ZodLike>))
      children.set(key, keyTree(value));
    return { kind: 'object', children };
  }
  if (def.type === 'record') return { kind: 'record', item: keyTree(def.valueType as ZodLike) };
  return { kind: 'leaf', list: def.type === 'array', meta };
}

let cached: KeyTree | undefined;

/** The tree of every config key. */
export function configShape(): KeyTree {
  cached ??= keyTree(configSchema as unknown as ZodLike);
  return cached;
}

/** The node at a key path (`['upstreams', 'docker.io', 'tagTTL']`), if the path names one. */
export function shapeAt(path: readonly PropertyKey[]): KeyTree | undefined {
  let node: KeyTree | undefined = configShape();
  for (const key of path) {
    if (node?.kind === 'object') node = node.children.get(String(key));
    else if (node?.kind === 'record') node = node.item;
    else return undefined;
  }
  return node;
}
