// The simulation's clock and scheduler: setTimeout, setInterval, setImmediate, Date and
// performance.now run on virtual time, and every callback runs in the context of the
// host incarnation that scheduled it. A host that crashed never runs again: its timers,
// disk completions and store replies are dropped, as a killed process's would be.
import { AsyncLocalStorage } from 'node:async_hooks';

/** One run of one host process (a restart makes a new one). */
export interface Actor {
  name: string;
  alive: boolean;
}

const actors = new AsyncLocalStorage<Actor>();

/** The host incarnation the current code runs for; undefined for the simulation driver. */
export function currentActor(): Actor | undefined {
  return actors.getStore();
}

/** Run `work` as code of `actor` (everything it schedules stays that actor's). */
export function runAs<T>(actor: Actor, work: () => T): T {
  return actors.run(actor, work);
}

const real = {
  setTimeout: globalThis.setTimeout,
  clearTimeout: globalThis.clearTimeout,
  setInterval: globalThis.setInterval,
  clearInterval: globalThis.clearInterval,
  setImmediate: globalThis.setImmediate,
  clearImmediate: globalThis.clearImmediate,
  Date: globalThis.Date,
  performanceNow: performance.now.bind(performance),
};

/** Let every queued promise job run (no real I/O is pending in the simulation, so this is deterministic). */
export function settle(): Promise<void> {
  return new Promise((resolve) => real.setImmediate(resolve));
}

class SimTimer {
  cancelled = false;
  refed = true;
  constructor(
    readonly clock: SimClock,
    readonly id: number,
    public at: number,
    readonly seq: number,
    readonly callback: (...args: unknown[]) => void,
    readonly args: unknown[],
    readonly repeatMs: number | undefined,
    readonly actor: Actor | undefined,
  ) {}
  ref(): this {
    this.refed = true;
    return this;
  }
  unref(): this {
    this.refed = false;
    return this;
  }
  hasRef(): boolean {
    return this.refed;
  }
  refresh(): this {
    this.clock.reschedule(this);
    return this;
  }
  [Symbol.toPrimitive](): number {
    return this.id;
  }
}

const EPOCH_MS = Date.UTC(2030, 0, 1);

/** Timer callbacks one instant of virtual time may run before the run is a livelock (a failure, not a hang). */
const MAX_FIRES_AT_ONE_INSTANT = 20_000;

export class SimClock {
  now = EPOCH_MS;
  private queue: SimTimer[] = [];
  /** Callbacks run since virtual time last moved. */
  private firedAtNow = 0;
  private nextId = 1;
  private nextSeq = 0;
  private installed = false;

  /** Start again at the epoch with nothing scheduled (a new seed). */
  reset(): void {
    this.now = EPOCH_MS;
    this.queue = [];
    this.nextSeq = 0;
  }

  schedule(callback: (...args: unknown[]) => void, delayMs: number, args: unknown[] = [], repeatMs?: number): SimTimer {
    const delay = Math.max(0, Number.isFinite(delayMs) ? delayMs : 0);
    const timer = new SimTimer(this, this.nextId++, this.now + delay, this.nextSeq++, callback, args, repeatMs, currentActor());
    this.insert(timer);
    return timer;
  }

  reschedule(timer: SimTimer): void {
    this.cancel(timer);
    timer.cancelled = false;
    timer.at = this.now + (timer.repeatMs ?? 0);
    this.insert(timer);
  }

  cancel(timer: unknown): void {
    if (!(timer instanceof SimTimer)) return;
    timer.cancelled = true;
    const i = this.queue.indexOf(timer);
    if (i >= 0) this.queue.splice(i, 1);
  }

  private insert(timer: SimTimer): void {
    let lo = 0;
    let hi = this.queue.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      const t = this.queue[mid];
      if (t.at < timer.at || (t.at === timer.at && t.seq < timer.seq)) lo = mid + 1;
      else hi = mid;
    }
    this.queue.splice(lo, 0, timer);
  }

  /** When the next live callback is due, or undefined when nothing is scheduled. */
  nextAt(): number | undefined {
    while (this.queue.length > 0 && this.queue[0].actor !== undefined && !this.queue[0].actor.alive) this.queue.shift();
    return this.queue[0]?.at;
  }

  /** Run the next due callback (advancing time to it) and the promise jobs it starts. */
  async fireNext(): Promise<boolean> {
    if (this.nextAt() === undefined) return false;
    const timer = this.queue.shift()!;
    // Callbacks that keep scheduling more at the same instant: virtual time would never pass (a livelock).
    if (timer.at > this.now) this.firedAtNow = 0;
    else if (++this.firedAtNow > MAX_FIRES_AT_ONE_INSTANT) {
      throw new Error(`livelock: more than ${MAX_FIRES_AT_ONE_INSTANT} timer callbacks at one instant of virtual time (${this.now} ms); no time passes`);
    }
    this.now = Math.max(this.now, timer.at);
    if (timer.repeatMs !== undefined) {
      timer.at = this.now + Math.max(1, timer.repeatMs);
      timer.cancelled = false;
      this.insert(timer);
    }
    const run = () => timer.callback(...timer.args);
    if (timer.actor === undefined) run();
    else runAs(timer.actor, run);
    await settle();
    return true;
  }

  /** Run callbacks until `ms` of virtual time passed. */
  async advance(ms: number): Promise<void> {
    const until = this.now + ms;
    for (;;) {
      const at = this.nextAt();
      if (at === undefined || at > until) break;
      await this.fireNext();
    }
    this.now = until;
    await settle();
  }

  /** Run callbacks until `done()` or `limitMs` of virtual time passed; whether done. */
  async until(done: () => boolean, limitMs: number): Promise<boolean> {
    await settle();
    const until = this.now + limitMs;
    while (!done()) {
      const at = this.nextAt();
      if (at === undefined || at > until) return done();
      await this.fireNext();
    }
    return true;
  }

  /** Replace the global timers, Date and performance.now with this clock's. */
  install(): void {
    if (this.installed) return;
    this.installed = true;
    const clock = this;
    const g = globalThis as Record<string, unknown>;
    g.setTimeout = (cb: (...a: unknown[]) => void, ms?: number, ...args: unknown[]) => clock.schedule(cb, ms ?? 0, args);
    g.setInterval = (cb: (...a: unknown[]) => void, ms?: number, ...args: unknown[]) => clock.schedule(cb, ms ?? 0, args, Math.max(1, ms ?? 0));
    g.setImmediate = (cb: (...a: unknown[]) => void, ...args: unknown[]) => clock.schedule(cb, 0, args);
    g.clearTimeout = g.clearInterval = g.clearImmediate = (t: unknown) => clock.cancel(t);
    const RealDate = real.Date;
    class SimDate extends RealDate {
      constructor(...args: unknown[]) {
        if (args.length === 0) super(clock.now);
        else super(...(args as [number]));
      }
      static override now(): number {
        return clock.now;
      }
    }
    g.Date = SimDate;
    performance.now = () => clock.now - EPOCH_MS;
  }
}

export const clock = new SimClock();
