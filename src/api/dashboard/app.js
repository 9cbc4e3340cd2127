// The dashboard page: polls GET /api/dashboard every POLL_MS, turns the counters of two
// polls into rates, and draws the host cards, three uPlot charts, the volume table and
// the event timeline. With a token on the API, the token is asked for once and kept in
// sessionStorage; it goes as the Authorization header, like any API client's.
'use strict';

const POLL_MS = 2000;
/** Points per chart: ten minutes at one poll every two seconds. */
const MAX_POINTS = 300;
/** Events kept on the page, newest first. */
const MAX_EVENTS = 300;
const TOKEN_KEY = 'updraft-token';

const state = {
  previous: undefined, // the last poll's answer and when it arrived
  eventsAfter: 0,
  events: [],
  filter: '',
  series: { t: [], read: [], write: [], puts: [], gets: [], hit: [] },
  charts: {},
  polling: false,
  rates: new Map(),
  /** The column the table is sorted by (SORT_KEYS), and which way. */
  sort: { key: 'name', descending: false },
  /** The volume whose own I/O chart is shown (a click on its row), and its points since. */
  selected: undefined,
  selectedSeries: { t: [], read: [], write: [], readLatency: [], writeLatency: [] },
};

const $ = (selector) => document.querySelector(selector);

function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' })[c]);
}

function bytes(n) {
  if (n === null || n === undefined) return '–';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return `${i === 0 ? Math.round(n) : n.toFixed(n < 10 ? 2 : 1)} ${units[i]}`;
}

function rate(n, unit = '/s') {
  if (n === undefined) return '–';
  return `${n < 10 ? n.toFixed(1) : Math.round(n)}${unit}`;
}

/** Two significant digits below one cent, so a small cost does not read as zero. */
function money(n, currency) {
  const digits = n !== 0 && Math.abs(n) < 0.01 ? Math.min(12, 1 - Math.floor(Math.log10(Math.abs(n)))) : 2;
  return `${n.toFixed(digits)} ${currency}`;
}

function ago(iso) {
  const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${(s / 3600).toFixed(1)} h ago`;
  return `${(s / 86400).toFixed(1)} d ago`;
}

function ratio(logical, stored) {
  return stored > 0 ? `${(logical / stored).toFixed(2)}×` : '–';
}

function setText(field, text) {
  const el = document.querySelector(`[data-field="${field}"]`);
  if (el) el.textContent = text;
}

function setBar(field, used, capacity) {
  const el = document.querySelector(`[data-bar="${field}"]`);
  if (el) el.style.width = `${capacity > 0 ? Math.min(100, (100 * used) / capacity) : 0}%`;
}

// ---- fetching ---------------------------------------------------------------------

async function fetchDashboard() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const headers = token ? { authorization: `Bearer ${token}` } : {};
  const response = await fetch(`/api/dashboard?events_after=${state.eventsAfter}`, { headers, cache: 'no-store' });
  if (response.status === 401) {
    sessionStorage.removeItem(TOKEN_KEY);
    return undefined;
  }
  if (!response.ok) throw new Error(`GET /api/dashboard: ${response.status} ${await response.text()}`);
  return response.json();
}

async function poll() {
  if (state.polling || document.hidden) return;
  state.polling = true;
  try {
    const data = await fetchDashboard();
    if (data === undefined) {
      $('#main').hidden = true;
      $('#token-form').hidden = false;
      $('#status').textContent = 'needs the API token';
      return;
    }
    $('#token-form').hidden = true;
    $('#main').hidden = false;
    // The charts measure their containers, so they are made once the page is shown.
    if (Object.keys(state.charts).length === 0) makeCharts();
    const started = performance.now();
    render(data, Date.now());
    const ms = performance.now() - started;
    $('#render-info').textContent = `${data.volumes.length} volumes, rendered in ${ms.toFixed(1)} ms`;
    $('#render-info').dataset.renderMs = ms.toFixed(2);
    $('#render-info').dataset.renders = String(Number($('#render-info').dataset.renders ?? 0) + 1);
    $('#status').textContent = `updated ${new Date().toLocaleTimeString()}`;
    $('#status').classList.remove('error');
  } catch (err) {
    $('#status').textContent = `not updating: ${err.message}`;
    $('#status').classList.add('error');
  } finally {
    state.polling = false;
  }
}

// ---- rendering --------------------------------------------------------------------

function render(data, now) {
  const last = state.previous?.data;
  if (last && (data.host.uptime_s < last.host.uptime_s || data.events_next <= state.eventsAfter)) {
    // The daemon restarted: its counters start from zero and its events from id 1 again
    // (those in this answer were cut at the old id; the next poll fetches them all).
    state.previous = undefined;
    state.events = [];
    state.eventsAfter = 0;
    data.events = [];
  }
  const previous = state.previous;
  const seconds = previous ? (now - previous.at) / 1000 : 0;
  const before = new Map(previous ? previous.data.volumes.map((v) => [v.name, v]) : []);
  const rates = new Map();
  let readBytes = 0;
  let writeBytes = 0;
  for (const v of data.volumes) {
    const old = before.get(v.name);
    if (!old || seconds <= 0) continue;
    const d = (kind, field) => Math.max(0, v.io[kind][field] - old.io[kind][field]);
    const r = {
      readOps: d('read', 'count') / seconds, writeOps: d('write', 'count') / seconds,
      readBytes: d('read', 'bytes') / seconds, writeBytes: d('write', 'bytes') / seconds,
      readLatency: d('read', 'count') > 0 ? (1000 * d('read', 'seconds')) / d('read', 'count') : undefined,
      writeLatency: d('write', 'count') > 0 ? (1000 * d('write', 'seconds')) / d('write', 'count') : undefined,
    };
    readBytes += r.readBytes;
    writeBytes += r.writeBytes;
    rates.set(v.name, r);
  }
  renderHost(data, previous?.data, seconds);
  state.rates = rates;
  renderVolumes(data, rates);
  if (state.selected !== undefined && previous && seconds > 0) pushSelected(now / 1000, rates.get(state.selected));
  renderEvents(data.events);
  if (previous && seconds > 0) {
    const sum = (o) => Object.values(o).reduce((a, b) => a + b, 0);
    const h = data.host;
    const p = previous.data.host;
    const hits = h.cache.memory_hits + h.cache.disk_hits - p.cache.memory_hits - p.cache.disk_hits;
    const lookups = hits + h.cache.misses - p.cache.misses;
    pushPoint(now / 1000, {
      read: readBytes / 1e6, write: writeBytes / 1e6,
      puts: (h.store.requests.put - p.store.requests.put) / seconds,
      gets: (sum(h.store.requests) - sum(p.store.requests) - (h.store.requests.put - p.store.requests.put)) / seconds,
      hit: lookups > 0 ? (100 * hits) / lookups : null,
    });
  }
  state.previous = { data, at: now };
}

function renderHost(data, previous, seconds) {
  const h = data.host;
  $('#host-id').textContent = `host ${h.host_id} · up ${Math.round(h.uptime_s / 60)} min`;
  setText('volumes', String(h.volumes));
  setText('volumes-sub', `${h.clients} clients · ${h.volumes_read_only} read-only · ${h.volumes_failed} failed`);
  const c = h.cache;
  setText('cache-memory', `${bytes(c.memory_bytes)} of ${bytes(c.memory_capacity)}`);
  setBar('cache-memory', c.memory_bytes, c.memory_capacity);
  setText('cache-disk', `${bytes(c.disk_bytes)} of ${bytes(c.disk_capacity)}`);
  setBar('cache-disk', c.disk_bytes, c.disk_capacity);
  const lookups = c.memory_hits + c.disk_hits + c.misses;
  const pct = (n) => (lookups > 0 ? `${((100 * n) / lookups).toFixed(1)}%` : '–');
  setText('cache-hits', `hits since start: memory ${pct(c.memory_hits)}, disk ${pct(c.disk_hits)}; ${c.pinned_blocks} pinned blocks`);
  const sum = (o) => Object.values(o).reduce((a, b) => a + b, 0);
  if (previous && seconds > 0) {
    const p = previous.host.store;
    setText('store-rate', `${rate((sum(h.store.requests) - sum(p.requests)) / seconds, ' req/s')}`);
    setText('store-sub', `↑ ${bytes((h.store.bytes_up - p.bytes_up) / seconds)}/s · ↓ ${bytes((h.store.bytes_down - p.bytes_down) / seconds)}/s · ` +
      `${rate((sum(h.store.errors) - sum(p.errors)) / seconds, ' errors/s')} · ${h.store.description}`);
  } else {
    setText('store-rate', `${sum(h.store.requests)} requests`);
    setText('store-sub', `${bytes(h.store.bytes_up)} up · ${bytes(h.store.bytes_down)} down · ${sum(h.store.errors)} errors since start`);
  }
  if (h.gc) {
    setText('gc-live', `${h.gc.live_packs ?? '–'} live packs`);
    const last = h.gc.last_cycle;
    setText('gc-sub', `${h.gc.packs_deleted} deleted since start · ${h.gc.delete_failures} failed · ` +
      (last ? `last cycle ${ago(last.at)}: ${last.deleted} deleted${last.skipped ? ` (${last.skipped})` : ''}` : 'no cycle yet'));
  } else {
    setText('gc-live', 'off');
    setText('gc-sub', 'GC is off on this daemon');
  }
  setText('dedup-ratio', ratio(h.dedup.logical_bytes, h.dedup.stored_bytes));
  setText('dedup-sub', `${bytes(h.dedup.logical_bytes)} written, ${bytes(h.dedup.stored_bytes)} stored (${h.dedup.blocks} blocks)`);
  setText('cost-month', `${money(h.cost.storage_per_month, h.cost.currency)}/month`);
  setText('cost-sub', `storage of ${bytes(h.cost.stored_bytes)}; requests since start ${money(h.cost.requests_cost, h.cost.currency)} ` +
    `(${h.cost.requests.put} put, ${h.cost.requests.get} get)`);
  const pr = data.prices;
  $('#prices').textContent = `prices: ${pr.storageGbMonth} ${pr.currency}/GB-month, ${pr.putPer1000}/1000 PUT, ${pr.getPer1000}/1000 GET`;
}

/** What a click on a column header sorts by (the page's state.sort names one). */
const SORT_KEYS = {
  name: (v) => v.name,
  size: (v) => v.size,
  mapped: (v) => v.mapped_bytes,
  dirty: (v) => v.dirty_bytes,
  clients: (v) => v.clients,
  read: (v, r) => r?.readBytes ?? 0,
  write: (v, r) => r?.writeBytes ?? 0,
  stored: (v) => v.usage?.stored_bytes ?? -1,
  'cost-month': (v) => v.cost.storage_per_month,
  'cost-requests': (v) => v.cost.requests_cost,
};

function sorted(volumes, rates) {
  const { key, descending } = state.sort;
  const by = SORT_KEYS[key];
  const keyed = volumes.map((v) => [by(v, rates.get(v.name)), v]);
  keyed.sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0) * (descending ? -1 : 1));
  return keyed.map(([, v]) => v);
}

function renderVolumes(data, rates) {
  const filter = state.filter;
  const rows = [];
  for (const th of document.querySelectorAll('#volumes th[data-sort]')) {
    th.dataset.order = th.dataset.sort === state.sort.key ? (state.sort.descending ? 'descending' : 'ascending') : '';
  }
  for (const v of sorted(data.volumes, rates)) {
    if (filter && !v.name.includes(filter)) continue;
    const r = rates.get(v.name);
    const lease = v.lease.generation > 0 ? `${v.lease.holder} gen ${v.lease.generation}`
      : v.replica ? `replica: ${v.replica.behind_sequences} behind, confirmed ${v.replica.lag_seconds.toFixed(1)} s ago`
      : v.lease.lost ? `lost: ${v.lease.lost}`
      : v.read_only ? 'another host, or released' : 'none yet (not in the store)';
    const access = v.failed ? 'failed' : v.out_of_service ? 'out of service' : v.read_only ? 'read-only' : 'writable';
    const drain = v.last_drain ? `seq ${v.last_drain.sequence}, ${ago(v.last_drain.at)}` : v.manifest_sequence >= 0 ? `manifest seq ${v.manifest_sequence}` : 'never';
    const lat = (ms) => (ms === undefined ? '–' : ms < 1 ? `${(ms * 1000).toFixed(0)} µs` : `${ms.toFixed(1)} ms`);
    rows.push(
      `<tr data-volume="${escapeHtml(v.name)}" class="${access.replaceAll(' ', '-')}${v.name === state.selected ? ' selected' : ''}">` +
        `<td data-field="name">${escapeHtml(v.name)}</td>` +
        `<td>${bytes(v.size)}</td>` +
        `<td>${bytes(v.mapped_bytes)}</td>` +
        `<td data-field="dirty">${bytes(v.dirty_bytes)}</td>` +
        `<td>${escapeHtml(v.flush_mode)}</td>` +
        `<td data-field="access">${access}</td>` +
        `<td data-field="lease">${escapeHtml(lease)}</td>` +
        `<td data-field="clients">${v.clients}</td>` +
        `<td data-field="read">${r ? `${rate(r.readOps)} · ${bytes(r.readBytes)}/s` : '–'}</td>` +
        `<td data-field="write">${r ? `${rate(r.writeOps)} · ${bytes(r.writeBytes)}/s` : '–'}</td>` +
        `<td>${r ? `${lat(r.readLatency)} / ${lat(r.writeLatency)}` : '–'}</td>` +
        `<td data-field="last-drain">${escapeHtml(drain)}</td>` +
        `<td data-field="stored">${v.usage ? bytes(v.usage.stored_bytes) : '–'}</td>` +
        `<td>${v.usage ? ratio(v.usage.logical_bytes, v.usage.stored_bytes) : '–'}</td>` +
        `<td data-field="cost-month">${money(v.cost.storage_per_month, v.cost.currency)}</td>` +
        `<td data-field="cost-requests">${money(v.cost.requests_cost, v.cost.currency)}</td>` +
        '</tr>',
    );
  }
  $('#volumes tbody').innerHTML = rows.join('');
}

function renderEvents(fresh) {
  if (fresh.length > 0) {
    state.eventsAfter = fresh[fresh.length - 1].id;
    state.events = fresh.reverse().concat(state.events).slice(0, MAX_EVENTS);
  }
  const items = state.events.map((e) =>
    `<li data-kind="${e.kind}" data-volume="${escapeHtml(e.volume ?? '')}">` +
      `<time datetime="${new Date(e.at).toISOString()}">${new Date(e.at).toLocaleTimeString()}</time>` +
      `<span class="kind">${e.kind}</span>` +
      `<span class="volume">${escapeHtml(e.volume ?? 'host')}</span>` +
      `<span class="message">${escapeHtml(e.message)}</span></li>`,
  );
  $('#events').innerHTML = items.length > 0 ? items.join('') : '<li class="none">no events since the daemon started</li>';
}

// ---- charts -----------------------------------------------------------------------

function chartWidth(id) {
  return Math.max(240, document.getElementById(id).clientWidth);
}

function makeCharts() {
  const s = state.series;
  const make = (id, series, data) => {
    const opts = { width: chartWidth(id), height: 160, series: [{}, ...series], axes: [{}, { size: 50 }], legend: { live: false } };
    state.charts[id] = new uPlot(opts, data, document.getElementById(id));
  };
  make('chart-io', [{ label: 'read', stroke: '#2b7bb9' }, { label: 'write', stroke: '#d9822b' }], [s.t, s.read, s.write]);
  make('chart-store', [{ label: 'PUT/LIST', stroke: '#d9822b' }, { label: 'GET/HEAD', stroke: '#2b7bb9' }], [s.t, s.puts, s.gets]);
  make('chart-cache', [{ label: 'hit rate', stroke: '#3a9d5d' }], [s.t, s.hit]);
}

function pushPoint(t, point) {
  const s = state.series;
  s.t.push(t);
  for (const key of ['read', 'write', 'puts', 'gets', 'hit']) s[key].push(point[key]);
  if (s.t.length > MAX_POINTS) for (const key of Object.keys(s)) s[key].shift();
  state.charts['chart-io'].setData([s.t, s.read, s.write]);
  state.charts['chart-store'].setData([s.t, s.puts, s.gets]);
  state.charts['chart-cache'].setData([s.t, s.hit]);
}

/** Show the I/O of one volume in its own chart, from now on. */
function select(name) {
  state.selected = name;
  const s = state.selectedSeries;
  for (const key of Object.keys(s)) s[key] = [];
  $('#volume-chart').hidden = false;
  $('#volume-chart figcaption').textContent = `I/O of ${name}: MB/s, and mean latency in ms (right axis)`;
  const id = 'chart-volume';
  state.charts[id]?.destroy();
  const opts = {
    width: chartWidth(id), height: 160, legend: { live: false },
    scales: { ms: {} },
    axes: [{}, { size: 50 }, { side: 1, scale: 'ms', size: 50, grid: { show: false } }],
    series: [
      {}, { label: 'read MB/s', stroke: '#2b7bb9' }, { label: 'write MB/s', stroke: '#d9822b' },
      { label: 'read ms', stroke: '#2b7bb9', dash: [4, 4], scale: 'ms' }, { label: 'write ms', stroke: '#d9822b', dash: [4, 4], scale: 'ms' },
    ],
  };
  state.charts[id] = new uPlot(opts, [s.t, s.read, s.write, s.readLatency, s.writeLatency], document.getElementById(id));
  if (state.previous) renderVolumes(state.previous.data, state.rates);
}

function pushSelected(t, r) {
  const s = state.selectedSeries;
  s.t.push(t);
  s.read.push(r ? r.readBytes / 1e6 : null);
  s.write.push(r ? r.writeBytes / 1e6 : null);
  s.readLatency.push(r?.readLatency ?? null);
  s.writeLatency.push(r?.writeLatency ?? null);
  if (s.t.length > MAX_POINTS) for (const key of Object.keys(s)) s[key].shift();
  state.charts['chart-volume'].setData([s.t, s.read, s.write, s.readLatency, s.writeLatency]);
}

function resizeCharts() {
  for (const [id, chart] of Object.entries(state.charts)) chart.setSize({ width: chartWidth(id), height: 160 });
}

// ---- start ------------------------------------------------------------------------

$('#token-form').addEventListener('submit', (event) => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $('#token').value);
  $('#token').value = '';
  void poll();
});

$('#filter').addEventListener('input', () => {
  state.filter = $('#filter').value.trim();
  if (state.previous) renderVolumes(state.previous.data, state.rates);
});

// The grid re-flows when the window changes or the volume chart appears: each chart follows its box.
new ResizeObserver(resizeCharts).observe($('.charts'));

$('#volumes thead').addEventListener('click', (event) => {
  const th = event.target.closest('th[data-sort]');
  if (!th) return;
  const key = th.dataset.sort;
  // A number column starts with the largest; names start with A.
  state.sort = { key, descending: state.sort.key === key ? !state.sort.descending : key !== 'name' };
  if (state.previous) renderVolumes(state.previous.data, state.rates);
});

// A hidden tab does not poll; it catches up when shown again.
document.addEventListener('visibilitychange', () => {
  if (!document.hidden) void poll();
});

$('#volumes tbody').addEventListener('click', (event) => {
  const row = event.target.closest('tr[data-volume]');
  if (row) select(row.dataset.volume);
});

void poll();
setInterval(poll, POLL_MS);
