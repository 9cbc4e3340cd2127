// Reading a TypeScript file's imports without a compiler: comments and string contents
// are masked first, so that neither can pass for an import.

/**
 * `text` as code only: comments blanked out, each quoted string replaced by `'#N'` where
 * N indexes `strings` (its contents), a template literal by `` `#` ``, so that neither can
 * look like an import. Regular expressions are kept (a quote in one is not a string).
 */
export function codeOf(text: string): { code: string; strings: string[] } {
  const strings: string[] = [];
  let code = '';
  let i = 0;
  // The last significant character of code: a `/` after one of these starts a regular expression.
  let last = '';
  const regexAfter = '(,=:[!&|?{};+-*%<>~^';
  /** Moves i past the literal opened by text[i] (the closing quote included). */
  const skipQuoted = (quote: string) => {
    i++;
    while (i < text.length && text[i] !== quote) {
      if (text[i] === '\\') i++;
      else if (quote === '`' && text[i] === '$' && text[i + 1] === '{') {
        // A substitution: skip to its closing brace (nested braces counted).
        let depth = 0;
        do {
          if (text[i] === '{') depth++;
          else if (text[i] === '}') depth--;
          i++;
        } while (i < text.length && depth > 0);
        continue;
      }
      i++;
    }
    i++;
  };
  while (i < text.length) {
    const c = text[i];
    const next = text[i + 1];
    if (c === '/' && next === '/') {
      while (i < text.length && text[i] !== '\n') i++;
    } else if (c === '/' && next === '*') {
      const end = text.indexOf('*/', i + 2);
      const stop = end < 0 ? text.length : end + 2;
      code += text.slice(i, stop).replace(/[^\n]/g, ' ');
      i = stop;
    } else if (c === "'" || c === '"' || c === '`') {
      const start = i;
      skipQuoted(c);
      const literal = text.slice(start, i);
      if (c === '`') code += '`#`' + '\n'.repeat(literal.split('\n').length - 1);
      else code += `${c}#${strings.push(literal.slice(1, -1)) - 1}${c}`;
      last = c;
    } else if (c === '/' && (last === '' || regexAfter.includes(last) || /\b(return|typeof|case|of|in)$/.test(code.trimEnd()))) {
      const start = i++;
      let inClass = false;
      while (i < text.length && (inClass || text[i] !== '/') && text[i] !== '\n') {
        if (text[i] === '\\') i++;
        else if (text[i] === '[') inClass = true;
        else if (text[i] === ']') inClass = false;
        i++;
      }
      i++;
      code += text.slice(start, i);
      last = '/';
    } else {
      code += c;
      if (!/\s/.test(c)) last = c;
      i++;
    }
  }
  return { code, strings };
}

/** Every module specifier `source` imports or re-exports, with the line its statement starts on. */
export function importsOf(source: string): Array<{ specifier: string; line: number }> {
  const { code, strings } = codeOf(source);
  const found: Array<{ specifier: string; line: number }> = [];
  const patterns = [
    // import x from '…', import { a } from '…', import type …, export { a } from '…', export * from '…'
    /\b(?:import|export)\s[^'"`;=()]*?\bfrom\s*(['"])#(\d+)\1/g,
    // import '…' (side effects only)
    /\bimport\s*(['"])#(\d+)\1/g,
    // import('…') and typeof import('…')
    /\bimport\s*\(\s*(['"])#(\d+)\1\s*\)/g,
  ];
  for (const pattern of patterns) {
    for (const m of code.matchAll(pattern)) {
      found.push({ specifier: strings[Number(m[2])], line: code.slice(0, m.index).split('\n').length });
    }
  }
  return found;
}

/** Dynamic imports whose module is not a string literal: they cannot be checked, so src/ has none. */
export function uncheckedImports(source: string): number[] {
  const { code } = codeOf(source);
  return [...code.matchAll(/\bimport\s*\(\s*(?!['"]#\d+['"]\s*\))/g)].map((m) => code.slice(0, m.index).split('\n').length);
}
