// The lease that keeps one writer per volume (DESIGN.md: Formats, lease; invariant 4): taking
// it, renewing it, the holder's own deadline, and the check before every manifest write
// that fences a host which lost it. Lease expiry is judged on the store's clock by takers
// and on the monotonic clock, less `clock_skew_margin_s`, by the holder.
import { errorMessage } from '../log.js';
import { isPreconditionFailed } from '../objectstore/types.js';
import { decodeLease, encodeLease, leaseBody, leaseIsLiveAt } from '../store/lease.js';
import { leaseKey } from '../store/manifest.js';
import type { Volume } from '../volume/volume.js';
import { FencedError, LeaseHeldError, type StoreContext, type StoreState } from './store-state.js';

/**
 * Test-only pause hook: with UPDRAFT_PAUSE_AT=NAME the process stops itself (SIGSTOP) the
 * first time it reaches pause point NAME, as a host frozen at that step would; the test
 * resumes it with SIGCONT. Lets a test order two hosts' lease requests exactly.
 */
const pauseSpec = process.env.UPDRAFT_PAUSE_AT;
let pausedOnce = false;
function pausePoint(name: string): void {
  if (pauseSpec !== name || pausedOnce) return;
  pausedOnce = true;
  process.stderr.write(`UPDRAFT_PAUSE_AT: stopping at ${name}\n`);
  process.kill(process.pid, 'SIGSTOP');
}

/** What the lease asks of the link it belongs to. */
export interface LeaseOwner {
  save(): void;
  /** Rewrite the manifest under a new generation (see StoreLink.refence). */
  refence(): Promise<void>;
  /** Finish a release that stopped between its steps. */
  release(): Promise<unknown>;
}

export class LeaseHolder {
  private renewing = false;
  /** The lease renewal in flight (putRenewal). */
  renewal: Promise<boolean> | undefined;
  /** A release is under way: writes are refused even though the state still says writable. */
  releasing = false;
  /** A promotion is replaying the previous holder's log: clients' writes wait for its manifest. */
  promoting = false;
  /** The holder's own deadline passed without a renewal: writes are refused until one lands. */
  private expired = false;
  /**
   * When the PUT of the lease this host holds was sent (performance.now(), a monotonic
   * clock that no wall-clock step moves); undefined after a restart, until the first
   * renewal. The store stamped the lease after this instant, so the lease cannot expire in
   * the store's clock before this + TTL.
   */
  private leaseSentAt: number | undefined;

  constructor(
    private readonly volume: Volume,
    private readonly state: StoreState,
    private readonly ctx: StoreContext,
    private readonly owner: LeaseOwner,
  ) {}

  private get name(): string {
    return this.volume.name;
  }

  /** Writes are refused while the volume is not this host's, a release runs, or the lease lapsed here. */
  applyReadOnly(): void {
    this.volume.readOnly = this.state.readOnly || this.releasing || this.expired || this.promoting;
  }

  /**
   * Ms left of the held lease by this host's reckoning, margin taken off. After a restart,
   * until its first renewal, it goes by the expiry it saved (its own wall clock when it
   * sent that lease PUT, read again by the same clock); -Infinity when it saved none.
   */
  leftMs(now = performance.now()): number {
    if (this.leaseSentAt === undefined) return (this.state.leaseExpires ?? -Infinity) - this.ctx.clockSkewMarginMs - Date.now();
    return this.leaseSentAt + this.ctx.leaseTtlMs - this.ctx.clockSkewMarginMs - now;
  }

  /** The generation was given up (a release): no lease is held here any more. */
  forget(): void {
    this.leaseSentAt = undefined;
  }

  /** Another host writes the manifest now: stop writing and say so. */
  fence(why: string): never {
    this.stopWriting('fenced: volume is read-only on this host', why);
    throw new FencedError(this.name, why);
  }

  /** The volume is read-only here from now on (until promoted again). */
  stopWriting(message: string, why: string): void {
    this.state.readOnly = true;
    this.state.generation = 0;
    this.state.leaseEtag = undefined;
    this.state.lostLease = why;
    this.leaseSentAt = undefined;
    this.applyReadOnly();
    this.owner.save();
    this.ctx.log.error(message, { volume: this.name, why });
  }

  /**
   * Before this host writes the volume's manifest, or a snapshot of it (a checkpoint, a
   * consistent fork), after the snapshot is cut: take or renew the lease when it is due,
   * then read the lease object and require that it still names this host with its
   * generation. Otherwise the volume becomes read-only here and FencedError is thrown.
   *
   * S3 has no write conditional on another object, so this check cannot be atomic with the
   * write after it; what closes the race is its order with the manifest's If-Match. The
   * check passing means no host took the lease before it, so the snapshot (cut earlier) is
   * of the volume while this host was its only writer. A host that takes the lease after the
   * check rewrites the manifest (refence) conditionally on the latest ETag before it accepts
   * a write, so this host's If-Match write either lands first (and is what the new holder
   * loads and builds on) or fails. A released lease is taken without that rewrite, but its
   * releaser wrote `released` in the lease and saved read-only first, so its check fails
   * from then on, across restarts. A checkpoint or fork is a new immutable name
   * (If-None-Match): landing late, it holds the volume as this host held it, and overwrites
   * nothing of the new holder.
   */
  async checkWriter(op: string, take: boolean): Promise<void> {
    if (this.state.readOnly) throw new FencedError(this.name, `${op}: the volume is read-only on this host`);
    const key = leaseKey(this.name);
    if (this.state.generation === 0) {
      if (take) {
        // The volume's first manifest from this host: take the lease (read, then a conditional put).
        const { bumped, first } = await this.acquire();
        if (bumped && !first && this.state.manifestEtag !== undefined) await this.owner.refence();
        return;
      }
      // Never leased here: nobody else may have leased the volume either.
      const current = await this.ctx.store.get(key);
      if (current === undefined) return;
      const lease = decodeLease(key, current.body);
      this.loseLease(op, `the lease names host ${lease.owner} generation ${lease.generation}`);
    }
    const current = await this.ctx.store.get(key);
    const lease = current === undefined ? undefined : decodeLease(key, current.body);
    if (current === undefined || lease === undefined) this.loseLease(op, 'the lease is gone from the store');
    if (lease.owner !== this.ctx.hostId || lease.generation !== this.state.generation || lease.released === true) {
      this.loseLease(op, lease.released === true && lease.owner === this.ctx.hostId
        ? `this host released generation ${lease.generation}`
        : `another host took the lease: host ${lease.owner} generation ${lease.generation}`);
    }
    // Still ours; renew it now if a third of it is left, so it outlives the write.
    if (this.leftMs() <= this.ctx.leaseTtlMs / 3 && !(await this.putRenewal(current.etag))) {
      this.loseLease(op, 'the lease changed while this host renewed it');
    }
  }

  /**
   * Before the blocks of a snapshot go up: a host whose lease time ran out by its own
   * reckoning (it may have been paused past it) checks the lease first, so a host that
   * lost it puts no packs either. checkWriter after the snapshot is what fences.
   */
  async checkBeforeUpload(op: string, take: boolean): Promise<void> {
    if (this.state.readOnly) throw new FencedError(this.name, `${op}: the volume is read-only on this host`);
    if (this.state.generation > 0 && this.leftMs() <= 0) await this.checkWriter(op, take);
  }

  /** The lease is not this host's any more: stop writing, say so, and refuse `op`. */
  private loseLease(op: string, why: string): never {
    this.stopWriting('lost the lease: volume is read-only on this host', why);
    throw new FencedError(this.name, `${op}: ${why}`);
  }

  /**
   * Take or renew the lease with a conditional put. Returns whether the generation
   * changed hands (a new holder must fence the previous one) and whether this is the
   * volume's first lease ever (nobody to fence). Throws LeaseHeldError
   * when another host holds a live lease.
   */
  async acquire(fresh = false): Promise<{ bumped: boolean; first: boolean; released: boolean }> {
    const key = leaseKey(this.name);
    for (let attempt = 0; attempt < 3; attempt++) {
      // A volume this host just made (a fork) has no lease yet: the first try puts one
      // with If-None-Match and no GET before it; a lease left there by an earlier volume of
      // the name fails the condition and the next try reads it.
      const current = fresh && attempt === 0 ? undefined : await this.ctx.store.get(key);
      const lease = current === undefined ? undefined : decodeLease(key, current.body);
      const now = Date.now();
      let generation: number;
      if (lease === undefined) generation = 1;
      else if (lease.owner === this.ctx.hostId && lease.generation === this.state.generation && !lease.released) generation = lease.generation;
      else if (lease.owner !== this.ctx.hostId && !lease.released && leaseIsLiveAt(lease, current!.lastModified, (await this.ctx.clock.now()).earliest)) {
        throw new LeaseHeldError(this.name, lease);
      }
      else generation = lease.generation + 1;
      const body = encodeLease(leaseBody(this.name, this.ctx.hostId, generation, now, this.ctx.leaseTtlMs));
      pausePoint('lease-acquire-put');
      const sent = performance.now();
      try {
        const etag = await this.ctx.store.put(key, body, current === undefined ? { ifNoneMatch: '*' } : { ifMatch: current.etag });
        return { bumped: this.adopt(generation, etag, now, sent), first: current === undefined, released: lease?.released === true };
      } catch (err) {
        if (!isPreconditionFailed(err)) throw err;
        const after = await this.ctx.store.get(key);
        if (after !== undefined && after.body.equals(body)) {
          return { bumped: this.adopt(generation, after.etag, now, sent), first: current === undefined, released: lease?.released === true };
        }
        // Someone else wrote the lease meanwhile: look again.
      }
    }
    throw new Error(`volume ${this.name}: the lease keeps changing under this host; try again`);
  }

  /** Hold the lease of `generation` just put (sent at `sent`); whether the generation changed. */
  private adopt(generation: number, etag: string, now: number, sent: number): boolean {
    const bumped = generation !== this.state.generation;
    this.state.generation = generation;
    this.state.leaseEtag = etag;
    this.state.leaseExpires = now + this.ctx.leaseTtlMs;
    this.leaseSentAt = sent;
    this.expired = false;
    this.applyReadOnly();
    this.owner.save();
    return bumped;
  }

  /**
   * Put the held lease again (same generation, a fresh expiry), conditional on `ifMatch`.
   * False when the lease in the store is no longer this host's generation. One at a time:
   * a caller that finds a renewal in flight gets its outcome.
   */
  putRenewal(ifMatch: string | undefined): Promise<boolean> {
    this.renewal ??= this.renewOnce(ifMatch).finally(() => {
      this.renewal = undefined;
    });
    return this.renewal;
  }

  private async renewOnce(ifMatch: string | undefined): Promise<boolean> {
    const key = leaseKey(this.name);
    for (let attempt = 0; ; attempt++) {
      const now = Date.now();
      const generation = this.state.generation;
      const body = encodeLease(leaseBody(this.name, this.ctx.hostId, generation, now, this.ctx.leaseTtlMs));
      pausePoint('lease-renew-put');
      const sent = performance.now();
      let etag: string;
      try {
        etag = await this.ctx.store.put(key, body, ifMatch === undefined ? { ifNoneMatch: '*' } : { ifMatch });
      } catch (err) {
        if (!isPreconditionFailed(err)) throw err;
        const current = await this.ctx.store.get(key);
        if (current === undefined) return false;
        // A retried put whose first attempt landed ends here too: the lease is then exactly ours.
        if (!current.body.equals(body)) {
          // Still this host's generation (only this host writes it: a taker bumps it), put by
          // a renewal whose ETag a crash kept from the state file: renew over it, once.
          const lease = decodeLease(key, current.body);
          if (attempt > 0 || lease.owner !== this.ctx.hostId || lease.generation !== this.state.generation || lease.released === true) return false;
          ifMatch = current.etag;
          continue;
        }
        etag = current.etag;
      }
      // Fenced or released meanwhile: that stands.
      if (this.state.generation !== generation) return false;
      this.adopt(generation, etag, now, sent);
      return true;
    }
  }

  /**
   * Renew a held lease once a third of its time has passed; losing it makes the volume
   * read-only. Past this host's own deadline (the TTL less the skew margin, from when its
   * last lease PUT was sent) writes are refused until a renewal lands. A release that
   * stopped between its steps (a crash) is finished.
   */
  async renewIfDue(): Promise<void> {
    const state = this.state;
    if (state.generation === 0 || this.releasing) return;
    // Checked on every tick, also while a renewal hangs in retries.
    const left = this.leftMs();
    if (left <= 0 && !this.expired && !state.readOnly && left !== -Infinity) {
      this.expired = true;
      this.applyReadOnly();
      this.ctx.log.error('lease not renewed in time; writes are refused until it is renewed', { volume: this.name });
    }
    if (this.renewing) return;
    this.renewing = true;
    try {
      if (state.releasing === true) {
        await this.owner.release();
        return;
      }
      // Read-only with a generation: a promotion is between taking the lease and its manifest.
      if (state.readOnly) return;
      // A third of the TTL after the last lease PUT was sent (before the deadline: the margin is under a third).
      if (left > (this.ctx.leaseTtlMs * 2) / 3 - this.ctx.clockSkewMarginMs) return;
      if (!(await this.putRenewal(state.leaseEtag))) {
        const key = leaseKey(this.name);
        const current = await this.ctx.store.get(key);
        const lease = current === undefined ? undefined : decodeLease(key, current.body);
        this.stopWriting('lost the lease: volume is read-only on this host', lease === undefined ? 'the lease is gone from the store' : `another host took the lease: host ${lease.owner} generation ${lease.generation}`);
      }
    } catch (err) {
      this.ctx.log.warn('lease renewal failed; retrying', { volume: this.name, error: errorMessage(err) });
    } finally {
      this.renewing = false;
    }
  }
}
