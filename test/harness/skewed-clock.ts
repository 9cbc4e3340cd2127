// Preloaded into a daemon (node --import) when a test gives it UPDRAFT_TEST_CLOCK_SKEW_MS:
// the process's wall clock (Date.now, new Date()) reads that many ms off, as a host whose
// clock drifted would. The monotonic clock (performance.now) and the kernel's file times
// are left alone, as they are on such a host.
const skew = Number(process.env.UPDRAFT_TEST_CLOCK_SKEW_MS);
if (!Number.isFinite(skew)) throw new Error(`UPDRAFT_TEST_CLOCK_SKEW_MS=${process.env.UPDRAFT_TEST_CLOCK_SKEW_MS} is not a number of ms`);

const RealDate = Date;
const realNow = RealDate.now.bind(RealDate);

class SkewedDate extends RealDate {
  constructor(...args: unknown[]) {
    if (args.length === 0) super(realNow() + skew);
    else super(...(args as [string | number | Date]));
  }

  static override now(): number {
    return realNow() + skew;
  }
}

globalThis.Date = SkewedDate as DateConstructor;
