// The host's recent events for operators (the dashboard's timeline): drains, forks,
// checkpoints, migrations, promotions, fencing and errors, with their times. A bounded
// ring in memory: the oldest event is dropped once MAX_HOST_EVENTS are kept. Not a log
// (that is stderr), and gone at restart.
import type { Fields, Logger } from '../log.js';

export type HostEventKind = 'drain' | 'fork' | 'checkpoint' | 'migration' | 'promotion' | 'fencing' | 'error';

export interface HostEvent {
  /** Increases by one per event recorded on this host since start: a reader asks for what came after the last it saw. */
  id: number;
  /** When it happened, ms since the epoch. */
  at: number;
  kind: HostEventKind;
  /** The volume it is about; undefined for a host-wide event. */
  volume: string | undefined;
  message: string;
}

/** Events kept; a busy host overwrites the oldest first. */
export const MAX_HOST_EVENTS = 1000;

/** Longest message kept (a long error is cut, not stored whole). */
const MAX_MESSAGE_CHARS = 500;

export class HostEvents {
  private readonly ring: Array<HostEvent | undefined>;
  private next = 1;

  constructor(readonly capacity = MAX_HOST_EVENTS) {
    if (!Number.isInteger(capacity) || capacity < 1) throw new Error(`host events: capacity ${capacity} is not a positive integer`);
    this.ring = new Array<HostEvent | undefined>(capacity);
  }

  record(kind: HostEventKind, volume: string | undefined, message: string): HostEvent {
    const event: HostEvent = { id: this.next++, at: Date.now(), kind, volume, message: message.length > MAX_MESSAGE_CHARS ? `${message.slice(0, MAX_MESSAGE_CHARS - 1)}…` : message };
    this.ring[event.id % this.capacity] = event;
    return event;
  }

  /**
   * `work`, with its outcome recorded: `describe(result)` as a `kind` event when it
   * succeeds, its error as an 'error' event when it fails (and rethrown).
   */
  async track<T>(kind: HostEventKind, volume: string, work: Promise<T>, describe: (result: T) => string): Promise<T> {
    try {
      const result = await work;
      this.record(kind, volume, describe(result));
      return result;
    } catch (err) {
      this.record('error', volume, `${kind} failed: ${err instanceof Error ? err.message : String(err)}`);
      throw err;
    }
  }

  /** The id the next event will get. */
  get nextId(): number {
    return this.next;
  }

  /** The events kept with an id above `after`, oldest first (at most `capacity`). */
  since(after = 0): HostEvent[] {
    const first = Math.max(after + 1, this.next - this.capacity, 1);
    const out: HostEvent[] = [];
    for (let id = first; id < this.next; id++) {
      const event = this.ring[id % this.capacity];
      if (event === undefined || event.id !== id) throw new Error(`host events: ring slot ${id % this.capacity} holds ${event?.id ?? 'nothing'}, not event ${id}`);
      out.push(event);
    }
    return out;
  }
}

/** An error line's volume and what went wrong, from its fields. */
function errorText(message: string, fields: Fields | undefined): { volume: string | undefined; text: string } {
  const volume = typeof fields?.volume === 'string' ? fields.volume : undefined;
  const why = fields?.error ?? fields?.why;
  return { volume, text: why === undefined || why === null ? message : `${message}: ${String(why)}` };
}

/**
 * `log` (and every child of it) recording each error line as an event as well: a lost
 * lease or fencing (lease-holder's "fenced: …", "lost the lease: …", "lease not renewed
 * …" lines) as 'fencing', anything else as 'error'.
 */
export function recordingErrors(log: Logger, events: HostEvents): Logger {
  return {
    debug: (m, f) => log.debug(m, f),
    info: (m, f) => log.info(m, f),
    warn: (m, f) => log.warn(m, f),
    error: (m, f) => {
      const { volume, text } = errorText(m, f);
      events.record(/^(fenced|lost the lease|lease not renewed)/.test(m) ? 'fencing' : 'error', volume, text);
      log.error(m, f);
    },
    child: (component) => recordingErrors(log.child(component), events),
  };
}
