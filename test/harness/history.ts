// A history checker for the volume as a set of 4 KiB registers, in the manner of Jepsen's
// checkers: a history of operations (each with its start, end and outcome) and of faults
// goes in, anomalies come out. Pure: no I/O, no clock.
//
// What the daemon promises (DESIGN.md invariant 1, the README's durability model), and
// what is checked, per sector:
// - Every read returns the initial zeros or the bytes of one write of that sector that was
//   invoked before the read ended and not refused (a refused write never happened).
// - Between faults the sector is an atomic register: a read never returns a value that a
//   write completed before the read started has superseded, and two reads in order never
//   go back (the first saw W1, the later one a value that W1 is known to follow).
// - A SIGKILL (`crash`) may lose acknowledged writes, but only unflushed ones: a write is
//   flushed when its ack came before the start of a successful FLUSH (any connection of the
//   volume: CAN_MULTI_CONN), a drain or a release, or it was a FUA write. After the crash
//   the sector holds one value of the candidates (values of before, writes in flight or
//   acknowledged) that no flushed write is known to follow; that value is then stable:
//   every read returns it until a write replaces it, and a value the recovered volume
//   dropped never comes back after a later crash.
// - A failover (the holder paused, another host promoted over its lease) is the same with
//   the store as the durable medium: only drains and releases flush. The paused holder's
//   operations from its pause on are a dead branch: its writes are never visible on the
//   new holder. Until the new holder's promotion answered, its reads are replica reads of
//   the manifest it woke from (not required to be fresh, nor to agree with its reads after).
// - A handover (release, then promote on the other host) loses nothing; the releasing
//   host acknowledges no write once its release answered, and its reads from then on
//   are replica reads (not required to be fresh).

export const SECTOR = 4096;
/** A sector's payload repeats one 32-byte record this many times (one per 512 bytes, so a torn sector shows). */
const RECORDS_PER_SECTOR = 8;
const RECORD_STRIDE = SECTOR / RECORDS_PER_SECTOR;
const RECORD_MAGIC = 0x48495354; // "HIST"

export type OpKind = 'write' | 'read' | 'flush' | 'drain' | 'release';
/** Jepsen's three outcomes: `fail` definitely did not happen, `info` may or may not have. */
export type Outcome = 'ok' | 'fail' | 'info';

/** What a read returned for its sector. */
export type ReadValue =
  | { kind: 'zero' }
  | { kind: 'write'; client: number; op: number; sector: number }
  /** Records of several writes (or zeros) in one sector. */
  | { kind: 'torn'; parts: string[] }
  /** Bytes that are no record at all. */
  | { kind: 'garbage'; detail: string };

export interface Op {
  /** Unique in the history; a write's payload carries it. */
  id: number;
  client: number;
  /** The daemon the operation went to. */
  host: string;
  kind: OpKind;
  /** Writes and reads: the sector index (byte offset / 4096). */
  sector?: number;
  /** Writes: with NBD_CMD_FLAG_FUA. */
  fua?: boolean;
  /** Reads with outcome ok: what came back. */
  value?: ReadValue;
  start: number;
  /** When the reply came (or the connection was seen to fail). */
  end: number;
  outcome: Outcome;
  error?: string;
}

export type Fault =
  /** SIGKILL of `host` (then a restart): what was flushed survives. */
  | { kind: 'crash'; host: string; at: number }
  /** `from` was paused at `at` and `to` promoted over its lease: what was drained survives. */
  | { kind: 'failover'; from: string; to: string; at: number; promoted?: number }
  /** `from` answered its release at `at`; `to` promotes: nothing is lost. */
  | { kind: 'handover'; from: string; to: string; at: number; promoted?: number };

/**
 * `promoted` (failover, handover): when `to`'s promotion answered. Reads on `to` that started
 * before it are replica reads; unset, `to` is taken to write the volume from `at` on.
 */
export interface History {
  ops: Op[];
  faults: Fault[];
}

export type AnomalyKind =
  | 'garbage-read' // bytes no write of this sector wrote
  | 'phantom-read' // a record naming a write that does not exist or is of another sector/client
  | 'future-read' // the value of a write invoked after the read ended
  | 'failed-write-read' // the value of a write the daemon refused
  | 'fenced-write-visible' // the value of a write the paused old holder took after the failover
  | 'stale-read' // a value a completed write (or an earlier read) is known to have superseded
  | 'lost-flushed-write' // after a fault, a value older than a flushed write
  | 'resurrected-write' // after a fault, a value an earlier recovery had already dropped
  | 'unstable-read' // after a fault, two reads disagree about the recovered value
  | 'torn-read' // records of several writes in one sector with no write in flight
  | 'write-after-release'; // a write acknowledged by a host after its release answered

export interface Anomaly {
  kind: AnomalyKind;
  sector?: number;
  /** The operations involved (the read first). */
  ops: number[];
  message: string;
}

export interface CheckResult {
  /** Operations by kind and outcome, e.g. `write:ok`. */
  counts: Record<string, number>;
  /** Reads checked against the register model. */
  readsChecked: number;
  /** Torn reads that overlapped a write of their sector (NBD promises no atomicity there). */
  tornConcurrent: number;
  /** Sectors whose first read after a crash or failover returned an older value than the last write acknowledged before it (allowed when unflushed). */
  rolledBack: number;
  anomalies: Anomaly[];
}

// ---- payloads ---------------------------------------------------------------------------

/** The bytes write `op` of `client` puts in `sector`: one record, repeated. */
export function encodeSector(client: number, op: number, sector: number): Buffer {
  const record = Buffer.alloc(32);
  record.writeUInt32BE(RECORD_MAGIC, 0);
  record.writeUInt32BE(client, 4);
  record.writeUInt32BE(op, 8);
  record.writeUInt32BE(sector, 12);
  record.writeUInt32BE(checksum(client, op, sector), 16);
  const out = Buffer.alloc(SECTOR, 0x5a);
  for (let i = 0; i < RECORDS_PER_SECTOR; i++) record.copy(out, i * RECORD_STRIDE);
  return out;
}

function checksum(client: number, op: number, sector: number): number {
  return (Math.imul(client ^ 0x9e3779b9, 0x85ebca6b) ^ Math.imul(op, 0xc2b2ae35) ^ Math.imul(sector + 1, 0x27d4eb2f)) >>> 0;
}

/** What a 4 KiB sector read back holds. */
export function decodeSector(bytes: Buffer): ReadValue {
  if (bytes.length !== SECTOR) return { kind: 'garbage', detail: `${bytes.length} bytes, not ${SECTOR}` };
  const parts: string[] = [];
  const values: ReadValue[] = [];
  for (let i = 0; i < RECORDS_PER_SECTOR; i++) {
    const piece = bytes.subarray(i * RECORD_STRIDE, (i + 1) * RECORD_STRIDE);
    let value: ReadValue;
    if (piece.every((b) => b === 0)) value = { kind: 'zero' };
    else {
      const magic = piece.readUInt32BE(0);
      const client = piece.readUInt32BE(4);
      const op = piece.readUInt32BE(8);
      const sector = piece.readUInt32BE(12);
      const fill = piece.subarray(32).every((b) => b === 0x5a) && piece.subarray(20, 32).every((b) => b === 0);
      if (magic !== RECORD_MAGIC || piece.readUInt32BE(16) !== checksum(client, op, sector) || !fill) {
        return { kind: 'garbage', detail: `512-byte piece ${i} is no record (starts ${piece.subarray(0, 16).toString('hex')})` };
      }
      value = { kind: 'write', client, op, sector };
    }
    values.push(value);
    const name = describe(value);
    if (!parts.includes(name)) parts.push(name);
  }
  return parts.length === 1 ? values[0] : { kind: 'torn', parts };
}

function describe(value: ReadValue): string {
  switch (value.kind) {
    case 'zero': return 'zero';
    case 'write': return `w${value.op}`;
    case 'torn': return `torn(${value.parts.join(',')})`;
    case 'garbage': return `garbage(${value.detail})`;
  }
}

// ---- the checker --------------------------------------------------------------------------

/** A register value: the initial zeros or a write. */
type Val = 'zero' | Op;
const ZERO_END = -Infinity;

/** When a value's write is known complete (an indeterminate write never is). */
const endOf = (v: Val): number => (v === 'zero' ? ZERO_END : v.outcome === 'ok' ? v.end : Infinity);
const startOf = (v: Val): number => (v === 'zero' ? ZERO_END : v.start);
const nameOf = (v: Val): string => (v === 'zero' ? 'zero' : `w${v.id}(c${v.client}@${v.host})`);

const BARRIERS: Record<'crash' | 'failover', ReadonlySet<OpKind>> = {
  crash: new Set<OpKind>(['flush', 'drain', 'release']),
  failover: new Set<OpKind>(['drain', 'release']),
};

export function checkHistory(history: History): CheckResult {
  const anomalies: Anomaly[] = [];
  const counts: Record<string, number> = {};
  for (const op of history.ops) counts[`${op.kind}:${op.outcome}`] = (counts[`${op.kind}:${op.outcome}`] ?? 0) + 1;
  const byId = new Map(history.ops.map((op) => [op.id, op]));

  // Where each op stands: live (the volume's lineage), replica (a released host's reads), dead (a paused holder's branch).
  // The last move of the volume before an op decides: its host gave the volume up, or took it.
  const moves = history.faults.filter((f): f is Extract<Fault, { kind: 'failover' | 'handover' }> => f.kind !== 'crash').sort((x, y) => x.at - y.at);
  // A read on the new holder before its promotion answered is served by the replica (the
  // manifest it woke from); a write there that was acknowledged came after the promotion.
  const role = (op: Op): 'live' | 'replica' | 'dead' => {
    let r: 'live' | 'replica' | 'dead' = 'live';
    for (const f of moves) {
      if (f.at > op.start) continue;
      if (op.host === f.from) r = f.kind === 'failover' ? 'dead' : 'replica';
      else if (op.host === f.to) r = op.kind === 'read' && f.promoted !== undefined && op.start < f.promoted ? 'replica' : 'live';
    }
    return r;
  };
  const roles = new Map(history.ops.map((op) => [op.id, role(op)]));

  for (const op of history.ops) {
    if (op.kind === 'write' && op.outcome === 'ok' && roles.get(op.id) === 'replica') {
      anomalies.push({ kind: 'write-after-release', sector: op.sector, ops: [op.id], message: `${nameOf(op)} to sector ${op.sector} was acknowledged at ${op.end} by ${op.host} after its release answered` });
    }
  }

  const boundaries = history.faults.filter((f): f is Extract<Fault, { kind: 'crash' | 'failover' }> => f.kind !== 'handover').sort((a, b) => a.at - b.at);
  const epochOf = (t: number): number => {
    let e = 0;
    while (e < boundaries.length && boundaries[e].at <= t) e++;
    return e;
  };
  const barriers = history.ops.filter((op) => op.outcome === 'ok' && op.kind !== 'write' && op.kind !== 'read' && roles.get(op.id) === 'live');

  const sectors = new Map<number, { writes: Op[]; reads: Op[] }>();
  const sectorOf = (s: number) => {
    let entry = sectors.get(s);
    if (!entry) sectors.set(s, (entry = { writes: [], reads: [] }));
    return entry;
  };
  for (const op of history.ops) {
    if (op.sector === undefined) continue;
    if (op.kind === 'write') sectorOf(op.sector).writes.push(op);
    else if (op.kind === 'read') sectorOf(op.sector).reads.push(op);
  }

  let readsChecked = 0;
  let tornConcurrent = 0;
  let rolledBack = 0;
  for (const [sector, { writes, reads }] of sectors) {
    const add = (kind: AnomalyKind, ops: Op[], message: string) => anomalies.push({ kind, sector, ops: ops.map((o) => o.id), message: `sector ${sector}: ${message}` });
    // Values the sector may hold at the start of each epoch, and why others were dropped.
    let candidates: Val[] = ['zero'];
    /** The write acknowledged last in the epoch before (to count rollbacks). */
    let lastAcked: Op | undefined;
    const dropped = new Map<Val, { why: 'flushed' | 'recovered'; by: Op | Val }>();
    for (let epoch = 0; epoch <= boundaries.length; epoch++) {
      const lo = epoch === 0 ? -Infinity : boundaries[epoch - 1].at;
      const hi = epoch < boundaries.length ? boundaries[epoch].at : Infinity;
      const inEpoch = (op: Op) => op.start >= lo && op.start < hi;
      const epochWrites = writes.filter((w) => inEpoch(w) && w.outcome !== 'fail' && roles.get(w.id) === 'live');
      const okWrites = epochWrites.filter((w) => w.outcome === 'ok');
      const epochReads = reads.filter((r) => inEpoch(r) && r.outcome === 'ok').sort((a, b) => a.start - b.start);
      const isEpochWrite = (v: Val) => v !== 'zero' && epochWrites.includes(v);
      const observed: Array<{ read: Op; value: Val }> = [];
      let initial: Val | undefined;
      let initialRead: Op | undefined;

      for (const read of epochReads) {
        const value = read.value!;
        const live = roles.get(read.id) === 'live';
        if (value.kind === 'garbage') { add('garbage-read', [read], `${nameOf(read)} read ${describe(value)}`); continue; }
        if (value.kind === 'torn') {
          const concurrent = writes.some((w) => w.outcome !== 'fail' && w.start < read.end && endOf(w) > read.start);
          if (concurrent) tornConcurrent++;
          else add('torn-read', [read], `read r${read.id} returned ${describe(value)} with no write of the sector in flight`);
          continue;
        }
        let v: Val;
        if (value.kind === 'zero') v = 'zero';
        else {
          const w = byId.get(value.op);
          if (!w || w.kind !== 'write' || w.client !== value.client || w.sector !== value.sector || value.sector !== sector) {
            add('phantom-read', [read], `read r${read.id} returned a record of client ${value.client} op ${value.op} sector ${value.sector}, which no write of this sector wrote`);
            continue;
          }
          v = w;
          if (w.start > read.end) { add('future-read', [read, w], `read r${read.id} (ended ${read.end}) returned ${nameOf(w)}, invoked at ${w.start}`); continue; }
          if (w.outcome === 'fail') { add('failed-write-read', [read, w], `read r${read.id} returned ${nameOf(w)}, which the daemon refused (${w.error ?? 'error'})`); continue; }
          // Live reads, and replica reads on another host than the paused one (the new holder before its promotion answered).
          if (roles.get(w.id) === 'dead' && (live || read.host !== w.host)) { add('fenced-write-visible', [read, w], `read r${read.id} on ${read.host} returned ${nameOf(w)}, written on the paused old holder after the failover`); continue; }
        }
        if (!live) continue;
        readsChecked++;
        if (!isEpochWrite(v)) {
          if (!candidates.includes(v)) {
            const drop = dropped.get(v);
            if (drop?.why === 'flushed') add('lost-flushed-write', [read, drop.by as Op], `read r${read.id} returned ${nameOf(v)}, but ${nameOf(drop.by as Op)} was flushed after it and before the fault`);
            else if (drop?.why === 'recovered') add('resurrected-write', [read], `read r${read.id} returned ${nameOf(v)}, which an earlier recovery had dropped for ${nameOf(drop.by as Val)}`);
            else add('stale-read', [read], `read r${read.id} returned ${nameOf(v)}, which is no value the sector could hold in this epoch`);
            continue;
          }
          if (initial !== undefined && initial !== v) {
            add('unstable-read', [read, initialRead!], `after the fault, read r${initialRead!.id} returned ${nameOf(initial)} and read r${read.id} ${nameOf(v)}`);
            continue;
          }
          if (initial === undefined && lastAcked !== undefined && v !== lastAcked) rolledBack++;
          initial = v;
          initialRead = read;
        }
        // Superseded by a write completed before this read started?
        const newer = okWrites.find((w) => w !== v && w.end < read.start && (!isEpochWrite(v) || endOf(v) < w.start));
        if (newer) { add('stale-read', [read, newer], `read r${read.id} (started ${read.start}) returned ${nameOf(v)}, but ${nameOf(newer)} completed at ${newer.end} after it`); continue; }
        // Going back behind what an earlier read saw?
        const earlier = observed.find((o) => o.read.end < read.start && o.value !== v && (isEpochWrite(o.value) && (!isEpochWrite(v) || endOf(v) < startOf(o.value))));
        if (earlier) { add('stale-read', [read, earlier.read], `read r${read.id} returned ${nameOf(v)} after read r${earlier.read.id} had returned the newer ${nameOf(earlier.value)}`); continue; }
        observed.push({ read, value: v });
      }

      if (epoch === boundaries.length) break;
      // The fault that ends this epoch: what may the sector hold after it?
      const fault = boundaries[epoch];
      const kinds = BARRIERS[fault.kind];
      const flushed = okWrites.filter((w) => (w.fua === true && kinds.has('flush')) || barriers.some((b) => kinds.has(b.kind) && b.start > w.end && b.end < fault.at));
      const before = initial !== undefined ? [initial] : candidates;
      if (initial !== undefined) for (const c of candidates) if (c !== initial) dropped.set(c, { why: 'recovered', by: initial });
      const next: Val[] = [];
      for (const v of [...before, ...epochWrites.filter((w) => w.start < fault.at)]) {
        const over = flushed.find((f) => f !== v && endOf(v) < f.start);
        if (over) dropped.set(v, { why: 'flushed', by: over });
        else next.push(v);
      }
      candidates = next;
      lastAcked = okWrites.filter((w) => w.start < fault.at).sort((x, y) => y.end - x.end)[0];
    }
  }
  return { counts, readsChecked, tornConcurrent, rolledBack, anomalies };
}

/** One line per anomaly kind with a count and the first example. */
export function summarize(result: CheckResult): string {
  const ops = Object.entries(result.counts).sort().map(([k, n]) => `${k}=${n}`).join(' ');
  const byKind = new Map<AnomalyKind, Anomaly[]>();
  for (const a of result.anomalies) byKind.set(a.kind, [...(byKind.get(a.kind) ?? []), a]);
  const lines = [`ops ${ops}; reads checked ${result.readsChecked}; torn reads during a write ${result.tornConcurrent}; rolled back by a fault ${result.rolledBack}; anomalies ${result.anomalies.length}`];
  for (const [kind, list] of byKind) lines.push(`  ${kind} x${list.length}: ${list[0].message}`);
  return lines.join('\n');
}
