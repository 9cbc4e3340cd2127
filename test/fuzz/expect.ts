// What every decoder target asserts: a bad input is refused with the module's own error
// type, naming the object; anything else thrown is a finding (Jazzer reports the throw).

/** Run `decode`; return its result, or undefined when it threw an `ErrorType` whose message names `object`. */
export function refusedOr<T>(decode: () => T, ErrorType: abstract new (...args: never[]) => Error, object: string): T | undefined {
  try {
    return decode();
  } catch (err) {
    // Error itself stands for "a plain Error": a TypeError or RangeError is a bug, not a refusal.
    if (!(err instanceof ErrorType) || (ErrorType === Error && (err as Error).constructor !== Error)) {
      throw new Error(`expected a ${ErrorType.name} naming ${object}, got: ${err instanceof Error ? `${err.name}: ${err.message}` : String(err)}`, { cause: err });
    }
    if (!err.message.includes(object)) throw new Error(`${ErrorType.name} does not name ${object}: ${err.message}`, { cause: err });
    return undefined;
  }
}

/** Throw when `a` and `b` differ as JSON values (Buffers and typed arrays as hex/arrays). */
export function sameValue(what: string, a: unknown, b: unknown): void {
  const plain = (v: unknown) =>
    JSON.stringify(v, (_k, x) => (ArrayBuffer.isView(x) ? Buffer.from(x.buffer, x.byteOffset, x.byteLength).toString('hex') : x?.type === 'Buffer' && Array.isArray(x.data) ? Buffer.from(x.data).toString('hex') : x));
  const left = plain(a);
  const right = plain(b);
  if (left !== right) throw new Error(`${what}: round trip changed the value:\n  ${left.slice(0, 2000)}\n  ${right.slice(0, 2000)}`);
}
