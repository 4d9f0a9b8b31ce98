/**
 * `auth.rules`: who may do what, where. The first rule whose users, upstreams and repositories
 * all match decides, by its actions (an empty list refuses); no rule matching refuses. No rules
 * at all: every authenticated user may pull everything, and nobody may administer.
 *
 * Users: a name from the htpasswd file, `*` any authenticated user, `anonymous` a request without
 * credentials. Repositories are picomatch globs, as in the repository allow-lists (`*` stays
 * within one path component, `**` crosses them). A rule that names upstreams or repositories
 * matches only a target within them: what concerns the whole cache (gc) is matched by rules that
 * name neither.
 */
import picomatch from 'picomatch';
import type { RuleConfig } from '../config/schema.js';
import type { Action, Target } from './types.js';

interface CompiledRule {
  users: Set<string>;
  anyUser: boolean;
  upstreams: Set<string> | undefined;
  repositories: ((name: string) => boolean) | undefined;
  actions: Set<Action>;
}

export const ANONYMOUS = 'anonymous';

/** With no rules configured. */
const DEFAULT_RULES: RuleConfig[] = [{ users: ['*'], actions: ['pull'] }];

export class Rules {
  private readonly rules: CompiledRule[];

  constructor(rules: readonly RuleConfig[]) {
    this.rules = (rules.length === 0 ? DEFAULT_RULES : rules).map((r) => ({
      users: new Set(r.users),
      anyUser: r.users.includes('*'),
      upstreams: r.upstreams ? new Set(r.upstreams) : undefined,
      repositories: r.repositories ? picomatch(r.repositories) : undefined,
      actions: new Set(r.actions),
    }));
  }

  /** Whether the user (undefined: anonymous) may do `action` on `target`. */
  allows(user: string | undefined, action: Action, target: Target = {}): boolean {
    for (const rule of this.rules) {
      if (user === undefined ? !rule.users.has(ANONYMOUS) : !rule.anyUser && !rule.users.has(user))
        continue;
      if (rule.upstreams && (target.upstream === undefined || !rule.upstreams.has(target.upstream)))
        continue;
      if (
        rule.repositories &&
        (target.repository === undefined || !rule.repositories(target.repository))
      )
        continue;
      return rule.actions.has(action);
    }
    return false;
  }

  /** Whether any rule names anonymous callers (else `auth.anonymous` serves them nothing). */
  get mentionsAnonymous(): boolean {
    return this.rules.some((r) => r.users.has(ANONYMOUS));
  }
}
