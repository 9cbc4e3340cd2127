// Large read replies of every connection go into their sockets at most TURN_BYTES per turn
// of the event loop. Writing a reply copies it into the socket on the event loop, and the
// reads of a stream of 1 MiB requests finish together on the thread pool: written at once,
// they held every other connection's requests until the last was copied
// (docs/benchmarks.md, "Large reads beside small ones"). Between turns the event loop polls
// the sockets, so another volume's small request waits for one turn's bytes at most. With
// no other connection sending requests, replies go at once: turns would only slow a lone
// stream.

/** Bytes of large replies written in one turn of the event loop (the reply that crosses it included). */
export const TURN_BYTES = 1024 * 1024;
/** Replies are paced while a connection other than the last one sent a request this recently. */
export const SHARED_MS = 100;

/** The replies' budget, shared by every connection of the server. */
export class ReplyPacer {
  /** Bytes written since the turn began. */
  private spent = 0;
  private readonly waiting: Array<{ bytes: number; go: () => void }> = [];
  private scheduled = false;
  /** The connection that sent the last request, and when a different one last did. */
  private lastSender: object | undefined;
  private otherSenderAt = -Infinity;

  constructor(private readonly turnBytes = TURN_BYTES) {}

  /** `sender` parsed a request at `now` (performance.now()). */
  request(sender: object, now: number): void {
    if (sender === this.lastSender) return;
    // The first sender the server sees is no other one.
    if (this.lastSender !== undefined) this.otherSenderAt = now;
    this.lastSender = sender;
  }

  /** For a reply of `bytes` at `now`: undefined to write it now, or a promise that resolves in the turn it may be written in. */
  take(bytes: number, now: number): Promise<void> | undefined {
    if (this.waiting.length === 0 && now - this.otherSenderAt > SHARED_MS) return undefined;
    this.schedule();
    if (this.waiting.length === 0 && this.spent < this.turnBytes) {
      this.spent += bytes;
      return undefined;
    }
    return new Promise((go) => this.waiting.push({ bytes, go }));
  }

  private schedule(): void {
    if (this.scheduled) return;
    this.scheduled = true;
    setImmediate(this.turn);
  }

  /** After the event loop's poll: a new budget, for the replies waiting first. */
  private readonly turn = (): void => {
    this.scheduled = false;
    this.spent = 0;
    while (this.waiting.length > 0 && this.spent < this.turnBytes) {
      const next = this.waiting.shift()!;
      this.spent += next.bytes;
      next.go();
    }
    // What went now counts against the next poll's replies: one more turn resets it.
    if (this.spent > 0) this.schedule();
  };
}
