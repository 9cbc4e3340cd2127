// Copies of the overlay writes since the last flush began, while they are few: a client's
// FLUSH that covers only these writes them into its journal batch and syncs the journal
// alone (journal.ts: BLOG), one device flush where the overlay's and then the journal's take two.
import type { LoggedExtent } from './journal.js';

/** Bytes of writes a FLUSH logs at most; past this it syncs the overlay instead. */
export const LOG_MAX_BYTES = 256 * 1024;

export class LoggedWrites {
  private extents: LoggedExtent[] = [];
  private bytes = 0;
  private overflowed = false;

  /** `buffers` (back to back, whole sectors) landed at `position` in the overlay: keep a copy. */
  add(position: number, buffers: readonly Buffer[], length: number): void {
    if (this.overflowed) return;
    if (this.bytes + length > LOG_MAX_BYTES) return this.overflow();
    const data = Buffer.allocUnsafe(length);
    let at = 0;
    for (const buffer of buffers) at += buffer.copy(data, at);
    this.extents.push({ position, data });
    this.bytes += length;
  }

  /** A write too large to log landed: the FLUSH that covers it syncs the overlay. */
  overflow(): void {
    this.overflowed = true;
    this.extents = [];
    this.bytes = 0;
  }

  /** The writes since the last take, oldest first (undefined: too many to log), and start over. */
  take(): LoggedExtent[] | undefined {
    const taken = this.overflowed ? undefined : this.extents;
    this.extents = [];
    this.bytes = 0;
    this.overflowed = false;
    return taken;
  }
}
