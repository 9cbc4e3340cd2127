// The reference model of one volume's bytes, at 512-byte units. Each unit holds the id
// of the write that last filled it (0: zeros); the bytes of write w at unit u are a
// pattern of (w, u), so a read tells which write it sees, or that it sees garbage.

export const UNIT = 512;

/** The bytes write `w` puts at unit `u` (zeros for w = 0). */
export function fillUnit(dst: Buffer, at: number, w: number, u: number): void {
  if (w === 0) {
    dst.fill(0, at, at + UNIT);
    return;
  }
  for (let i = 0; i < UNIT; i += 8) {
    dst.writeUInt32LE(w, at + i);
    dst.writeUInt32LE(u, at + i + 4);
  }
}

/** The write id unit `u` holds in `src` at `at`, or -1 for bytes no write made. */
export function decodeUnit(src: Buffer, at: number, u: number): number {
  const w = src.readUInt32LE(at);
  for (let i = 0; i < UNIT; i += 8) {
    if (src.readUInt32LE(at + i) !== w || src.readUInt32LE(at + i + 4) !== (w === 0 ? 0 : u)) return -1;
  }
  return w;
}

/** Per snapshot holding open units (-1): the writes each of them may hold in that manifest. */
export const openInSnapshot = new WeakMap<Int32Array, Map<number, number[]>>();

export class VolumeModel {
  /** What each unit reads now; -1 where a crash left it open which candidate survived. */
  val: Int32Array;
  /** What each unit held at the last FLUSH that succeeded (survives any crash). */
  floor: Int32Array;
  /** Per unit: values written since the floor (acknowledged or possibly landed). */
  since = new Map<number, number[]>();
  /** Per unit left open by a crash: the values it may read. */
  open = new Map<number, number[]>();
  /** Content of every manifest this volume may have in the store, by sequence. */
  snapshots = new Map<number, Int32Array[]>();
  /** Content of each checkpoint taken. */
  checkpoints = new Map<string, Int32Array>();
  /** The host slot holding the writable copy (undefined: only the store has it). */
  home: number | undefined;
  /** A resize in flight when its host died or failed: the size the volume may have. */
  maybeSize = 0;
  /**
   * The size no crash can undo: that of the last acknowledged resize, FLUSH or drain (or
   * of the store's copy taken). A resize that was never answered may have reached the
   * journal without a sync: a restart can show it, and a later crash undo it.
   */
  sizeFloor: number;
  /** A purge was started: its local state may be gone. */
  purging = false;
  /** Flush mode `durable`: its FLUSHes wait for the store, so the floor survives the loss of its host. */
  durable = false;

  constructor(
    readonly name: string,
    public size: number,
    content?: Int32Array,
  ) {
    this.val = content ? Int32Array.from(content) : new Int32Array(size / UNIT);
    this.floor = Int32Array.from(this.val);
    this.sizeFloor = size;
  }

  get units(): number {
    return this.size / UNIT;
  }

  /** A write (or zero) of `w` over units [first, first + count) was issued; `acked` once it returned. */
  write(first: number, count: number, w: number): void {
    for (let u = first; u < first + count; u++) {
      this.val[u] = w;
      const list = this.since.get(u);
      if (list) list.push(w);
      else this.since.set(u, [w]);
    }
  }

  /** A write of `w` over units from `first` failed part-way: each unit holds what it had (`before`) or w. */
  unsure(first: number, before: Int32Array, w: number): void {
    for (let i = 0; i < before.length; i++) {
      const u = first + i;
      const prior = this.open.get(u) ?? [this.floor[u]];
      this.open.set(u, [...new Set([...prior, ...(before[i] >= 0 ? [before[i]] : []), w])]);
      this.val[u] = -1;
    }
  }

  /** A FLUSH issued when the content was `at` succeeded (nothing was written meanwhile). */
  flushed(): void {
    this.sizeFloor = this.size;
    for (let u = 0; u < this.val.length; u++) {
      if (this.val[u] < 0) continue; // never read back since a crash or a failed write: still open
      this.floor[u] = this.val[u];
      this.since.delete(u);
      this.open.delete(u);
    }
  }

  /** The serving host crashed: each unit may read its floor or anything written since. */
  crashed(): void {
    for (const [u, list] of this.since) {
      const prior = this.open.get(u);
      this.open.set(u, [...new Set([...(prior ?? [this.floor[u]]), this.floor[u], ...list])]);
      this.val[u] = -1;
    }
    this.since.clear();
    // What was open stays open (the floor is still the floor).
    for (const u of this.open.keys()) this.val[u] = -1;
  }

  /**
   * The content is known again (the store's copy was taken): exactly, except the units
   * `content` leaves open (-1), which may read any of `open`'s candidates for them.
   */
  settle(content: Int32Array, open?: Map<number, number[]>): void {
    this.val = Int32Array.from(content);
    this.floor = Int32Array.from(content);
    this.since.clear();
    this.open.clear();
    for (const [u, list] of open ?? []) if (u < this.val.length && this.val[u] < 0) this.open.set(u, list);
    this.sizeFloor = this.size;
  }

  /** The volume is `size` bytes now; `acknowledged`: by a resize that was answered, so no crash undoes it. */
  grow(size: number, acknowledged = false): void {
    if (acknowledged) this.sizeFloor = size;
    const next = new Int32Array(size / UNIT);
    next.set(this.val);
    const floor = new Int32Array(size / UNIT);
    floor.set(this.floor);
    this.val = next;
    this.floor = floor;
    this.size = size;
  }

  /**
   * A host recovered the volume after a crash with `size`: any size from the floor up to
   * the largest resize attempted (an unanswered resize may or may not have landed).
   * Returns false for a size the product never promised.
   */
  recovered(size: number): boolean {
    if (size < this.sizeFloor || size > Math.max(this.size, this.maybeSize)) return false;
    if (size > this.size) this.grow(size);
    else if (size < this.size) this.shrink(size);
    return true;
  }

  /** An unacknowledged resize was undone by a crash: the units past `size` are gone, none of them flushed. */
  private shrink(size: number): void {
    const units = size / UNIT;
    for (let u = units; u < this.floor.length; u++) {
      if (this.floor[u] !== 0) throw new Error(`model of ${this.name}: unit ${u} past the size floor ${this.sizeFloor} holds flushed write ${this.floor[u]}`);
    }
    this.val = this.val.slice(0, units);
    this.floor = this.floor.slice(0, units);
    for (const u of [...this.since.keys()]) if (u >= units) this.since.delete(u);
    for (const u of [...this.open.keys()]) if (u >= units) this.open.delete(u);
    this.size = size;
  }

  /** Drop the snapshots recorded at sequences past `sequence` (a crash took them back; they will be reused for other content). */
  forgetAbove(sequence: number): void {
    for (const s of [...this.snapshots.keys()]) if (s > sequence) this.snapshots.delete(s);
  }

  snapshot(sequence: number): Int32Array {
    const copy = Int32Array.from(this.val);
    // A unit left open (a failed write, a crash not read back yet) is in the manifest as any of its candidates.
    const open = new Map<number, number[]>();
    for (let u = 0; u < copy.length; u++) if (copy[u] < 0) open.set(u, this.open.get(u) ?? [this.floor[u]]);
    if (open.size > 0) openInSnapshot.set(copy, open);
    const list = this.snapshots.get(sequence) ?? [];
    list.push(copy);
    this.snapshots.set(sequence, list);
    return copy;
  }

  /**
   * Check bytes read from units [first, ...) against the model; a unit left open by a
   * crash takes the value read (reads must then be stable). Returns a problem or undefined.
   */
  check(first: number, data: Buffer): string | undefined {
    const count = data.length / UNIT;
    for (let i = 0; i < count; i++) {
      const u = first + i;
      const got = decodeUnit(data, i * UNIT, u);
      const want = this.val[u];
      if (want >= 0) {
        if (got !== want) return `volume ${this.name}: unit ${u} (byte ${u * UNIT}) reads ${got < 0 ? 'garbage' : `write ${got}`}, expected write ${want}`;
        continue;
      }
      const allowed = this.open.get(u) ?? [this.floor[u]];
      if (got < 0 || !allowed.includes(got)) {
        return `volume ${this.name}: after a crash unit ${u} (byte ${u * UNIT}) reads ${got < 0 ? 'garbage' : `write ${got}`}; allowed: writes ${allowed.join(',')} (flushed: ${this.floor[u]})`;
      }
      this.val[u] = got;
    }
    return undefined;
  }

  /** After a full read-back following a crash: what was read is the new floor candidate set's resolution. */
  resolved(): boolean {
    for (let u = 0; u < this.val.length; u++) if (this.val[u] < 0) return false;
    return true;
  }
}
