/**
 * The Link header's grammar (RFC 8288 section 3, https://www.rfc-editor.org/rfc/rfc8288#section-3),
 * read far enough to replace each link's target and keep everything else as it was written:
 *
 *   Link       = #link-value
 *   link-value = "<" URI-Reference ">" *( OWS ";" OWS link-param )
 *   link-param = token BWS [ "=" BWS ( token / quoted-string ) ]
 *
 * `#` is a comma-separated list that may hold empty elements (RFC 9110 section 5.6.1). A
 * URI-Reference holds no `<`, `>` or space; a token no `<`, `>`, `,`, `;` or `"`; a quoted-string
 * may hold any of them, `\` escaping the next character. Parsing into objects and formatting
 * them again (http-link-header) would change what a proxy should leave alone: it splits
 * `rel="next prev"` into two links, percent-encodes a quoted title, drops repeated parameters.
 */

/**
 * `value` with the target of each link replaced by what `rewrite` makes of it (kept as it is
 * when `rewrite` returns undefined); parameters, separators and whitespace are kept byte for
 * byte. Resolves to undefined when `value` is not a Link header by the grammar above (no `<`
 * where a link starts, a `<` or `>` outside a target or a quoted string, an unterminated one):
 * nothing in it can be told apart from a target, so nothing in it can be rewritten.
 */
export function rewriteLinkTargets(
  value: string,
  rewrite: (target: string) => string | undefined,
): string | undefined {
  let out = '';
  let at = 0;
  while (at < value.length) {
    const c = value[at]!;
    if (c === ' ' || c === '\t' || c === ',') {
      out += c; // between link-values
      at++;
      continue;
    }
    if (c !== '<') return undefined;
    const end = value.indexOf('>', at + 1);
    if (end < 0) return undefined;
    const target = value.slice(at + 1, end);
    out += `<${rewrite(target) ?? target}>`;
    // Its parameters, up to the comma that ends the link-value (a quoted one is not a separator).
    const params = end + 1;
    at = params;
    while (at < value.length && value[at] !== ',') {
      const p = value[at]!;
      if (p === '<' || p === '>') return undefined;
      if (p === '"') {
        at++;
        while (at < value.length && value[at] !== '"') at += value[at] === '\\' ? 2 : 1;
        if (at >= value.length) return undefined;
      }
      at++;
    }
    const rest = value.slice(params, at);
    if (!/^[ \t]*(?:;|$)/.test(rest)) return undefined; // `<a>b`: no parameter starts there
    out += rest;
  }
  return out;
}
