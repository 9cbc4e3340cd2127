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

  /** The content is known again, exactly (the store's copy was taken). */
  settle(content: Int32Array): void {
    this.val = Int32Array.from(content);
    this.floor = Int32Array.from(content);
    this.since.clear();
    this.open.clear();
  }

  grow(size: number): void {
    const next = new Int32Array(size / UNIT);
    next.set(this.val);
    const floor = new Int32Array(size / UNIT);
    floor.set(this.floor);
    this.val = next;
    this.floor = floor;
    this.size = size;
  }

  snapshot(sequence: number): Int32Array {
    const copy = Int32Array.from(this.val);
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
