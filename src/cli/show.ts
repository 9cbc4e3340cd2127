// How `updraft ls` and `updraft status` print for a person (`--json` prints the API's
// answers as they are): a table of volumes, and the store and daemon summary as lines.

/** A row of GET /api/exports. */
export interface ExportRow {
  name: string;
  size: number;
  mapped_chunks: number;
  dirty_bytes: number;
  flush_mode: string;
  read_only: boolean;
  failed: boolean;
  clients: number;
  sequence: number;
  manifest_sequence: number;
  lease_generation: number;
  lease_lost?: string;
}

export function bytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return i === 0 ? `${n} B` : `${n.toFixed(n < 10 ? 2 : 1)} ${units[i]}`;
}

/** Columns padded to their widest cell; numbers right-aligned. */
export function table(header: string[], rows: string[][], rightAligned: ReadonlySet<number>): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  const line = (cells: string[]) =>
    cells.map((c, i) => (rightAligned.has(i) ? c.padStart(widths[i]) : c.padEnd(widths[i]))).join('  ').trimEnd();
  return [line(header), ...rows.map(line)].join('\n') + '\n';
}

/** `updraft ls`: one line per volume of the running daemon. */
export function volumeTable(rows: ExportRow[], blockSize: number): string {
  if (rows.length === 0) return 'no volumes on this daemon\n';
  const header = ['NAME', 'SIZE', 'MAPPED', 'DIRTY', 'MODE', 'ACCESS', 'LEASE', 'CLIENTS', 'SEQUENCE', 'MANIFEST'];
  const cells = rows.map((v) => [
    v.name, bytes(v.size), bytes(v.mapped_chunks * blockSize), bytes(v.dirty_bytes), v.flush_mode,
    v.failed ? 'failed' : v.read_only ? 'read-only' : 'writable',
    v.lease_generation > 0 ? `gen ${v.lease_generation}` : v.lease_lost !== undefined ? 'lost' : '-',
    String(v.clients), String(v.sequence), v.manifest_sequence < 0 ? '-' : String(v.manifest_sequence),
  ]);
  return table(header, cells, new Set([1, 2, 3, 7, 8, 9]));
}

/** The daemon part of GET /api/host, as `updraft status` prints it. */
export interface HostSummary {
  host_id: string;
  uptime_s: number;
  volumes: number;
  clients: number;
  volumes_read_only: number;
  volumes_failed: number;
  cache: { memory_bytes: number; memory_capacity: number; disk_bytes: number; disk_capacity: number; memory_hits: number; disk_hits: number; misses: number };
  store: { requests: Record<string, number>; errors: Record<string, number>; bytes_up: number; bytes_down: number };
  gc: { live_packs: number | null; packs_deleted: number; last_cycle: { at: string; deleted: number } | null } | null;
  dedup: { logical_bytes: number; stored_bytes: number };
  cost: { currency: string; storage_per_month: number; requests_cost: number };
}

const sum = (counts: Record<string, number>) => Object.values(counts).reduce((a, b) => a + b, 0);
/** Two significant digits below one cent, so a small cost does not read as zero. */
const money = (n: number, currency: string) =>
  `${n.toFixed(n !== 0 && Math.abs(n) < 0.01 ? Math.min(12, 1 - Math.floor(Math.log10(Math.abs(n)))) : 2)} ${currency}`;

/** `updraft status`: label and value lines. */
export function statusLines(store: Record<string, unknown>, daemon: { url: string; host?: HostSummary; problem?: string }): string {
  const lines: Array<[string, string]> = [];
  lines.push(['store', String(store.store)]);
  if (store.id !== undefined) lines.push(['store id', `${String(store.id)}, created ${String(store.created)}`]);
  lines.push(['encryption', String(store.encryption)]);
  if (store.password !== undefined) lines.push(['password', String(store.password)]);
  const h = daemon.host;
  if (h === undefined) {
    lines.push(['daemon', `not running (${daemon.problem ?? `no answer at ${daemon.url}`})`]);
  } else {
    const lookups = h.cache.memory_hits + h.cache.disk_hits + h.cache.misses;
    const hitRate = lookups > 0 ? `${((100 * (h.cache.memory_hits + h.cache.disk_hits)) / lookups).toFixed(1)}% hits` : 'no reads yet';
    lines.push(
      ['daemon', `running at ${daemon.url}, host ${h.host_id}, up ${Math.round(h.uptime_s / 60)} min`],
      ['volumes', `${h.volumes} (${h.volumes_read_only} read-only, ${h.volumes_failed} failed), ${h.clients} clients`],
      ['cache', `memory ${bytes(h.cache.memory_bytes)} of ${bytes(h.cache.memory_capacity)}, disk ${bytes(h.cache.disk_bytes)} of ${bytes(h.cache.disk_capacity)}, ${hitRate}`],
      ['store I/O', `${sum(h.store.requests)} requests (${h.store.requests.put ?? 0} put), ${sum(h.store.errors)} errors, ${bytes(h.store.bytes_up)} up, ${bytes(h.store.bytes_down)} down since start`],
      ['gc', h.gc === null ? 'off' : `${h.gc.live_packs ?? '?'} live packs, ${h.gc.packs_deleted} deleted since start` +
        (h.gc.last_cycle ? `, last cycle ${h.gc.last_cycle.at} (${h.gc.last_cycle.deleted} deleted)` : '')],
      ['dedup', `${bytes(h.dedup.logical_bytes)} written, ${bytes(h.dedup.stored_bytes)} stored` +
        (h.dedup.stored_bytes > 0 ? ` (${(h.dedup.logical_bytes / h.dedup.stored_bytes).toFixed(2)}x)` : '')],
      ['cost', `${money(h.cost.storage_per_month, h.cost.currency)} a month for storage, ${money(h.cost.requests_cost, h.cost.currency)} of requests since start`],
    );
  }
  const width = Math.max(...lines.map(([label]) => label.length));
  return lines.map(([label, value]) => `${label.padEnd(width)}  ${value}`).join('\n') + '\n';
}
