// Bounded concurrency for gc/'s store requests (HEADs, GETs, deletes of many keys).

/** Run `work` over `items`, at most `n` at a time. */
export async function eachLimit<T>(items: readonly T[], n: number, work: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  await Promise.all(Array.from({ length: Math.min(n, items.length) }, async () => {
    while (next < items.length) await work(items[next++]);
  }));
}
