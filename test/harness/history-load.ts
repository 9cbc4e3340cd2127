// Clients that put a recorded load on a volume through real NBD connections (unix socket
// and TCP), for the history checker (history.ts): each write carries a payload naming its
// client, operation and sector; every operation is recorded with its start, end and
// outcome. A client follows the volume's writer: when the test moves the volume (or a
// daemon dies), it reconnects to the host `target()` names.

import type { Daemon } from './daemon.js';
import { NbdClient, NbdCommandError } from './nbd-client.js';
import { decodeSector, encodeSector, SECTOR, type Fault, type History, type Op, type OpKind, type Outcome } from './history.js';

/** mulberry32: a seeded PRNG, so a seed names a run's choices. */
export class Rng {
  private state: number;
  constructor(seed: number) {
    this.state = seed >>> 0;
  }
  u32(): number {
    this.state = (this.state + 0x6d2b79f5) >>> 0;
    let z = this.state;
    z = Math.imul(z ^ (z >>> 15), z | 1);
    z ^= z + Math.imul(z ^ (z >>> 7), z | 61);
    return (z ^ (z >>> 14)) >>> 0;
  }
  int(lo: number, hi: number): number {
    return lo + Math.floor((this.u32() / 2 ** 32) * (hi - lo + 1));
  }
  chance(p: number): boolean {
    return this.u32() / 2 ** 32 < p;
  }
  pick<T>(items: readonly T[]): T {
    return items[this.int(0, items.length - 1)];
  }
}

/** The history being recorded, on one clock (ms since the recorder was made). */
export class Recorder {
  readonly ops: Op[] = [];
  readonly faults: Fault[] = [];
  private nextId = 1;
  private readonly t0 = performance.now();

  now(): number {
    return performance.now() - this.t0;
  }

  /** Starts an operation; the returned op is finished with finish(). */
  begin(fields: { client: number; host: string; kind: OpKind; sector?: number; fua?: boolean }): Op {
    const op: Op = { id: this.nextId++, ...fields, start: this.now(), end: Infinity, outcome: 'info' };
    this.ops.push(op);
    return op;
  }

  finish(op: Op, outcome: Outcome, error?: string): void {
    op.end = this.now();
    op.outcome = outcome;
    if (error !== undefined) op.error = error;
  }

  fault(fault: Fault): void {
    this.faults.push(fault);
  }

  history(): History {
    return { ops: this.ops, faults: this.faults };
  }
}

export type Transport = 'unix' | 'tcp';

export interface LoadOptions {
  volume: string;
  /** Sectors the clients use (indices of 4 KiB sectors). */
  sectors: readonly number[];
  /** Share of operations per kind; the rest are reads. */
  writeShare: number;
  flushShare: number;
  fuaShare: number;
}

/**
 * One client: one connection, `depth` operations in flight on it. Outcomes: a reply is
 * `ok`; an error reply is `fail` (the server refused: nothing happened); a connection that
 * dies first leaves the operation `info` (a write may have landed), and the client
 * reconnects to the host `target()` names.
 */
export class LoadClient {
  private conn: NbdClient | null = null;
  private connHost: Daemon | null = null;
  private stopped = false;
  private loops: Promise<void>[] = [];
  private connecting: Promise<NbdClient | null> | null = null;
  /** The host of each connection made. */
  private readonly hostOf = new WeakMap<NbdClient, Daemon>();
  /** Connections made. */
  connects = 0;

  constructor(
    readonly id: number,
    readonly transport: Transport,
    private readonly recorder: Recorder,
    private readonly rng: Rng,
    private readonly opts: LoadOptions,
    /** The host to talk to now; null: wait. */
    private readonly target: () => Daemon | null,
    private readonly hostName: (d: Daemon) => string,
  ) {}

  /** Starts `depth` operation streams pipelined on the one connection (replies may come out of order). */
  start(depth = 2): void {
    for (let i = 0; i < depth; i++) this.loops.push(this.run());
  }

  /** Drops the connection when it is to another host than `want`: its operation in flight ends indeterminate. */
  abandonOther(want: Daemon): void {
    const conn = this.conn;
    if (!conn || this.connHost === want) return;
    this.conn = null;
    this.connHost = null;
    conn.close();
  }

  /** Stops the streams and disconnects; a second call does nothing more. */
  async stop(): Promise<void> {
    this.stopped = true;
    await Promise.all(this.loops);
    await this.drop(true);
  }

  private async drop(polite = false): Promise<void> {
    const conn = this.conn;
    this.conn = null;
    this.connHost = null;
    if (!conn) return;
    if (polite && !conn.broken) await conn.disconnect().catch(() => conn.close());
    else conn.close();
  }

  /** The connection to the current target; one connect at a time for all streams. */
  private async connection(): Promise<NbdClient | null> {
    this.connecting ??= this.connect().finally(() => (this.connecting = null));
    return this.connecting;
  }

  private async connect(): Promise<NbdClient | null> {
    const want = this.target();
    if (this.conn && (this.conn.broken || this.connHost !== want)) await this.drop(this.conn.broken === null);
    if (this.conn || !want) return this.conn;
    try {
      const where = this.transport === 'unix' ? { path: want.socket } : { host: want.tcp.host, port: want.tcp.port };
      this.conn = await NbdClient.connect({ ...where, exportName: this.opts.volume, timeoutMs: 2000, commandTimeoutMs: 60_000 });
      this.connHost = want;
      this.hostOf.set(this.conn, want);
      this.connects++;
    } catch {
      this.conn = null;
    }
    return this.conn;
  }

  private async run(): Promise<void> {
    while (!this.stopped) {
      const conn = await this.connection();
      if (!conn) await sleep(20);
      else await this.one(conn, this.hostName(this.hostOf.get(conn)!));
    }
  }

  private async one(conn: NbdClient, host: string): Promise<void> {
    const roll = this.rng.u32() / 2 ** 32;
    const sector = this.rng.pick(this.opts.sectors);
    if (roll < this.opts.flushShare) {
      const op = this.recorder.begin({ client: this.id, host, kind: 'flush' });
      await this.settle(op, conn.flush());
    } else if (roll < this.opts.flushShare + this.opts.writeShare) {
      const fua = this.rng.chance(this.opts.fuaShare);
      const op = this.recorder.begin({ client: this.id, host, kind: 'write', sector, fua });
      await this.settle(op, conn.write(sector * SECTOR, encodeSector(this.id, op.id, sector), { fua }));
    } else {
      await this.readSector(conn, host, sector);
    }
  }

  /** One recorded read of a sector on this client's connection. */
  async readSector(conn: NbdClient, host: string, sector: number): Promise<void> {
    const op = this.recorder.begin({ client: this.id, host, kind: 'read', sector });
    await this.settle(op, conn.read(sector * SECTOR, SECTOR).then((bytes) => {
      op.value = decodeSector(bytes);
    }));
  }

  private async settle(op: Op, done: Promise<unknown>): Promise<void> {
    try {
      await done;
      this.recorder.finish(op, 'ok');
    } catch (err) {
      // A refusal is definite; a connection that died leaves the operation open (the next connect replaces it).
      this.recorder.finish(op, err instanceof NbdCommandError ? 'fail' : 'info', (err as Error).message);
    }
  }
}

/** Reads every sector once on a fresh connection to `host`, recorded as client `client`. */
export async function sweep(recorder: Recorder, host: Daemon, hostName: string, volume: string, sectors: readonly number[], client: number): Promise<number> {
  const conn = await NbdClient.connect({ path: host.socket, exportName: volume, timeoutMs: 5000 });
  let failed = 0;
  try {
    for (let i = 0; i < sectors.length; i += 16) {
      await Promise.all(sectors.slice(i, i + 16).map(async (sector) => {
        const op = recorder.begin({ client, host: hostName, kind: 'read', sector });
        try {
          op.value = decodeSector(await conn.read(sector * SECTOR, SECTOR));
          recorder.finish(op, 'ok');
        } catch (err) {
          failed++;
          recorder.finish(op, err instanceof NbdCommandError ? 'fail' : 'info', (err as Error).message);
        }
      }));
    }
  } finally {
    await conn.disconnect().catch(() => conn.close());
  }
  return failed;
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
