// The dashboard in a real browser (headless Chromium from Debian, driven by
// playwright-core): the page asks for the API token, then shows volumes created by NBD
// clients, a drain, a fork, a migration and a checkpoint as they happen, at 1280 px and on a phone;
// and it renders a host with 500 volumes (the time it takes is printed, not asserted).
import assert from 'node:assert/strict';
import { existsSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { chromium, type BrowserContext, type Page } from 'playwright-core';
import { startDaemon, type Daemon } from './harness/daemon.js';
import { NbdClient } from './harness/nbd-client.js';
import { requireTools, runOk, TOOLS } from './harness/tools.js';

const CHROMIUM = '/usr/bin/chromium';
const TOKEN = 'dashboard-test-token-0123456789';
const TIMEOUT = 600_000;
const TOOL_TIMEOUT_MS = 120_000;
/** How long the page may take to show a change (it polls every 2 s). */
const SHOWN_MS = 20_000;

/** A fresh Chromium profile under `dir` (Playwright's own browser download is not used). */
async function openBrowser(dir: string, viewport: { width: number; height: number }): Promise<BrowserContext> {
  return chromium.launchPersistentContext(path.join(dir, `chromium-profile-${viewport.width}`), {
    executablePath: CHROMIUM,
    headless: true,
    viewport,
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync',
    ],
  });
}

function haveChromium(t: { skip(message: string): void }): boolean {
  if (existsSync(CHROMIUM)) return true;
  if (process.env.CI) assert.fail(`${CHROMIUM} is missing: install Debian's chromium package (scripts/setup-test-deps.sh)`);
  t.skip(`${CHROMIUM} is missing (apt package chromium)`);
  return false;
}

/** Open the dashboard and give it the token it asks for. */
async function openDashboard(context: BrowserContext, d: Daemon): Promise<Page> {
  const page = context.pages()[0] ?? (await context.newPage());
  const problems: string[] = [];
  page.on('pageerror', (err) => problems.push(err.message));
  await page.goto(`${d.httpUrl}/`);
  assert.equal(new URL(page.url()).pathname, '/dashboard/');
  await page.locator('#token-form').waitFor({ state: 'visible', timeout: SHOWN_MS });
  await page.fill('#token', TOKEN);
  await page.click('#token-form button');
  await page.locator('#main').waitFor({ state: 'visible', timeout: SHOWN_MS });
  await page.locator('#token-form').waitFor({ state: 'hidden', timeout: SHOWN_MS });
  assert.deepEqual(problems, [], 'the page threw');
  return page;
}

/** Stop the daemon and remove its scratch dir but for the screenshots (and the daemon's log), which stay as the test's artifacts. */
async function stopKeepingScreenshots(d: Daemon, t: { diagnostic(message: string): void }): Promise<void> {
  await d.stop();
  for (const entry of readdirSync(d.dir)) {
    if (!entry.endsWith('.png') && !entry.endsWith('.log')) rmSync(path.join(d.dir, entry), { recursive: true, force: true });
  }
  t.diagnostic(`screenshots kept in ${d.dir}`);
}

/** Waits for the page's next poll to be rendered. */
async function nextRender(page: Page): Promise<void> {
  const before = Number(await page.locator('#render-info').getAttribute('data-renders'));
  await page.waitForFunction((n) => Number(document.querySelector('#render-info')?.getAttribute('data-renders')) > n, before, { timeout: SHOWN_MS });
}

const row = (page: Page, volume: string) => page.locator(`#volumes tr[data-volume="${volume}"]`);
const cell = (page: Page, volume: string, field: string) => row(page, volume).locator(`td[data-field="${field}"]`);

/** Waits until the page's element matching `selector` has text matching `pattern`. */
async function shows(page: Page, selector: string, pattern: RegExp, what: string): Promise<void> {
  try {
    await page.waitForFunction(
      ([sel, source, flags]) => [...document.querySelectorAll(sel)].some((el) => new RegExp(source, flags).test(el.textContent ?? '')),
      [selector, pattern.source, pattern.flags] as const,
      { timeout: SHOWN_MS },
    );
  } catch (err) {
    const texts = await page.locator(selector).allTextContents().catch(() => []);
    throw new Error(`${what}: the page never showed ${pattern} in ${selector} (it shows ${JSON.stringify(texts.slice(0, 5))}): ${(err as Error).message}`);
  }
}

test('the dashboard shows volumes, a drain, a fork, a migration and a checkpoint as they happen, at 1280 px and on a phone', { timeout: TIMEOUT }, async (t) => {
  if (!requireTools(t, [TOOLS.nbdcopy]) || !haveChromium(t)) return;
  const d = await startDaemon({ toml: { servers: { http: { token: TOKEN } } }, apiToken: TOKEN });
  let desktop: BrowserContext | undefined;
  let phone: BrowserContext | undefined;
  try {
    // The data needs the token; the page itself does not.
    assert.equal((await fetch(`${d.httpUrl}/api/dashboard`)).status, 401);
    desktop = await openBrowser(d.dir, { width: 1280, height: 900 });
    const page = await openDashboard(desktop, d);
    await shows(page, '#events', /no events/, 'a fresh host');

    // Two volumes made by an NBD client (auto-created on first connect).
    const image = path.join(d.dir, 'image.raw');
    const data = Buffer.alloc(4 << 20);
    for (let i = 0; i < data.length; i += 4096) data.fill(i / 4096 % 251, i, i + 2048);
    writeFileSync(image, data);
    for (const name of ['vm-a', 'vm-c']) await runOk('nbdcopy', ['--flush', image, d.uri(name)], { timeoutMs: TOOL_TIMEOUT_MS });
    await row(page, 'vm-a').waitFor({ timeout: SHOWN_MS });
    await row(page, 'vm-c').waitFor({ timeout: SHOWN_MS });
    await shows(page, '#volumes td[data-field="last-drain"]', /never/, 'a volume not drained yet');

    // A client attached shows in the table.
    const client = await NbdClient.connect({ path: d.socket, exportName: 'vm-a' });
    try {
      await shows(page, '#volumes tr[data-volume="vm-a"] td[data-field="clients"]', /^1$/, 'a client attached to vm-a');
    } finally {
      await client.disconnect();
    }
    await shows(page, '#volumes tr[data-volume="vm-a"] td[data-field="clients"]', /^0$/, 'the client detached');

    // A click on a row charts that volume; writes to it show as a write rate in its row.
    await row(page, 'vm-a').click();
    await page.locator('#volume-chart canvas').first().waitFor({ timeout: SHOWN_MS });
    assert.match((await page.locator('#volume-chart figcaption').textContent()) ?? '', /^I\/O of vm-a/);
    const writing = runOk('nbdcopy', ['--flush', image, d.uri('vm-a')], { timeoutMs: TOOL_TIMEOUT_MS });
    await shows(page, '#volumes tr.selected[data-volume="vm-a"] td[data-field="write"]', /^(?!0\.0\/s)[\d.]+\/s · [\d.]+ (B|KiB|MiB)\/s$/, 'vm-a being written');
    await writing;

    // A drain: the event, and the volume's last drain at its sequence.
    const drained = await d.api('POST', '/api/exports/vm-a/drain');
    assert.equal(drained.status, 200, drained.text);
    await shows(page, '#events li[data-kind="drain"][data-volume="vm-a"]', new RegExp(`sequence ${drained.json.sequence}\\b`), 'the drain event');
    await shows(page, '#volumes tr[data-volume="vm-a"] td[data-field="last-drain"]', new RegExp(`^seq ${drained.json.sequence}, `), 'vm-a drained');
    // What the store holds for it, and a cost.
    await shows(page, '#volumes tr[data-volume="vm-a"] td[data-field="stored"]', /^[1-9][\d.]* (B|KiB|MiB)$/, 'vm-a stored bytes');
    const exported = await d.api('GET', '/api/exports/vm-a');
    assert.ok(exported.json.cost.stored_bytes > 0 && exported.json.cost.requests.put > 0, `vm-a cost in the API: ${exported.text}`);
    // And as Prometheus gauges.
    const metrics = (await d.api('GET', '/metrics')).text;
    const gauge = (re: RegExp) => Number(re.exec(metrics)?.[1] ?? NaN);
    assert.ok(gauge(/^updraft_volume_cost_storage_per_month\{volume="vm-a",currency="USD"\} (\S+)$/m) > 0, 'vm-a storage cost gauge');
    assert.ok(gauge(/^updraft_volume_cost_requests\{volume="vm-a",currency="USD"\} (\S+)$/m) > 0, 'vm-a request cost gauge');
    assert.ok(gauge(/^updraft_cost_storage_per_month (\S+)$/m) > 0, 'host storage cost gauge');
    assert.equal(gauge(/^updraft_volume_stored_bytes\{volume="vm-a"\} (\S+)$/m), exported.json.usage.stored_bytes);
    await shows(page, '#volumes tr[data-volume="vm-a"] td[data-field="cost-month"]', /^0\.0*[1-9]\d* USD$/, 'vm-a storage cost');
    await shows(page, '#volumes tr[data-volume="vm-a"] td[data-field="cost-requests"]', /^0\.0*[1-9]\d* USD$/, 'vm-a request cost');
    await shows(page, '[data-field="dedup-sub"]', /stored/, 'the host dedup figures');

    // A fork: the event and the new volume's row, writable here with its own lease.
    const forked = await d.api('POST', '/api/exports/vm-a/fork', { target: 'vm-b' });
    assert.equal(forked.status, 201, forked.text);
    await shows(page, '#events li[data-kind="fork"][data-volume="vm-a"]', /forked to vm-b/, 'the fork event');
    await row(page, 'vm-b').waitFor({ timeout: SHOWN_MS });
    await shows(page, '#volumes tr[data-volume="vm-b"] td[data-field="access"]', /^writable$/, 'vm-b writable');
    await shows(page, '#volumes tr[data-volume="vm-b"] td[data-field="lease"]', /gen 1/, 'vm-b lease');

    // A migration away (release) and back (promotion): read-only, then writable at the next generation.
    const released = await d.api('POST', '/api/exports/vm-b/release');
    assert.equal(released.status, 200, released.text);
    await shows(page, '#events li[data-kind="migration"][data-volume="vm-b"]', /released the lease of generation 1/, 'the release');
    await shows(page, '#volumes tr[data-volume="vm-b"] td[data-field="access"]', /^read-only$/, 'vm-b released');
    // Released with everything drained, it follows the volume's manifests as a replica.
    await shows(page, '#volumes tr[data-volume="vm-b"] td[data-field="lease"]', /^replica: 0 behind/, 'vm-b a replica');
    const promoted = await d.api('POST', '/api/exports/vm-b/promote');
    assert.equal(promoted.status, 200, promoted.text);
    await shows(page, '#events li[data-kind="promotion"][data-volume="vm-b"]', new RegExp(`generation ${promoted.json.generation}$`), 'the promotion');
    await shows(page, '#volumes tr[data-volume="vm-b"] td[data-field="lease"]', new RegExp(`gen ${promoted.json.generation}$`), 'vm-b promoted');
    await shows(page, '#volumes tr[data-volume="vm-b"] td[data-field="access"]', /^writable$/, 'vm-b writable again');

    // A checkpoint, and a failed request (a fork onto a name that exists) as an error.
    assert.equal((await d.api('POST', '/api/exports/vm-c/checkpoints', { name: 'before' })).status, 200);
    await shows(page, '#events li[data-kind="checkpoint"][data-volume="vm-c"]', /checkpoint before/, 'the checkpoint event');
    assert.equal((await d.api('POST', '/api/exports/vm-c/fork', { target: 'vm-b' })).status, 409);
    await shows(page, '#events li[data-kind="error"][data-volume="vm-c"]', /fork to vm-b failed/, 'the failed fork');

    // The charts are drawn (uPlot canvases) and the table fits: no sideways scrolling of the page.
    assert.equal(await page.locator('.charts canvas').count() >= 3, true, 'three charts drawn');
    assert.equal(await page.evaluate(() => document.documentElement.scrollWidth <= window.innerWidth), true, 'the page scrolls sideways at 1280 px');
    const wide = path.join(d.dir, 'dashboard-1280.png');
    await page.screenshot({ path: wide, fullPage: true });
    t.diagnostic(`screenshot: ${wide}`);

    // A phone: the same content in one column; the table scrolls inside its own box.
    phone = await openBrowser(d.dir, { width: 390, height: 844 });
    const small = await openDashboard(phone, d);
    await row(small, 'vm-b').waitFor({ timeout: SHOWN_MS });
    await shows(small, '#events li[data-kind="fork"]', /forked to vm-b/, 'the fork event on a phone');
    assert.equal(await small.evaluate(() => document.documentElement.scrollWidth <= window.innerWidth), true, 'the page scrolls sideways on a phone');
    const cardWidths = await small.locator('.card').evaluateAll((cards) => cards.map((c) => c.getBoundingClientRect().right));
    assert.ok(cardWidths.every((right) => right <= 390), `a card sticks out of the phone's screen: ${cardWidths}`);
    // Two more polls, so the charts have points in the screenshot.
    await nextRender(small);
    await nextRender(small);
    const narrow = path.join(d.dir, 'dashboard-phone.png');
    await small.screenshot({ path: narrow, fullPage: true });
    t.diagnostic(`screenshot: ${narrow}`);
    assert.equal(await cell(small, 'vm-a', 'name').textContent(), 'vm-a');

    // The daemon restarts: the open page starts its timeline again with the new daemon's events.
    await d.restart();
    const again = await d.api('POST', '/api/exports/vm-c/drain');
    assert.equal(again.status, 200, again.text);
    await shows(page, '#events li[data-kind="drain"][data-volume="vm-c"]', new RegExp(`sequence ${again.json.sequence}\\b`), 'a drain after the restart');
    assert.equal(await page.locator('#events li[data-kind="fork"]').count(), 0, 'events of the previous daemon still shown');
  } finally {
    await desktop?.close();
    await phone?.close();
    await stopKeepingScreenshots(d, t);
  }
});

test('the dashboard renders a host with 500 volumes', { timeout: TIMEOUT }, async (t) => {
  if (!haveChromium(t)) return;
  const d = await startDaemon({ toml: { servers: { http: { token: TOKEN } } }, apiToken: TOKEN });
  let browser: BrowserContext | undefined;
  try {
    const COUNT = 500;
    for (let i = 0; i < COUNT; i += 25) {
      await Promise.all(Array.from({ length: 25 }, (_, j) => d.api('PUT', `/api/exports/fleet-${String(i + j).padStart(3, '0')}`, { size_gb: 1 }).then((r) => {
        assert.equal(r.status, 201, r.text);
      })));
    }
    browser = await openBrowser(d.dir, { width: 1280, height: 900 });
    const started = performance.now();
    const page = await openDashboard(browser, d);
    await page.waitForFunction((n) => document.querySelectorAll('#volumes tbody tr').length === n, COUNT, { timeout: 60_000 });
    const firstMs = performance.now() - started;
    // The next polls re-render the whole table; the page reports how long each took.
    const renders: number[] = [];
    for (let i = 0; i < 5; i++) {
      await nextRender(page);
      renders.push(Number(await page.locator('#render-info').getAttribute('data-render-ms')));
    }
    const answers: number[] = [];
    let response = await d.api('GET', '/api/dashboard');
    // The daemon's CPU time (user + system, in clock ticks of 10 ms) over 20 answers.
    const cpuTicks = () => readFileSync(`/proc/${d.pid}/stat`, 'utf8').split(') ')[1].split(' ').slice(11, 13).reduce((a, b) => a + Number(b), 0);
    const ticksBefore = cpuTicks();
    for (let i = 0; i < 20; i++) {
      const askedAt = performance.now();
      response = await d.api('GET', '/api/dashboard');
      answers.push(performance.now() - askedAt);
    }
    const cpuMs = ((cpuTicks() - ticksBefore) * 10) / 20;
    t.diagnostic(
      `500 volumes: token to full table ${firstMs.toFixed(0)} ms; re-render per poll ${renders.map((r) => r.toFixed(1)).join(', ')} ms; ` +
        `GET /api/dashboard ${answers.map((a) => a.toFixed(0)).join(', ')} ms wall, ${cpuMs.toFixed(1)} ms of daemon CPU each, ${response.text.length} bytes`,
    );
    assert.equal(response.json.volumes.length, COUNT);
    // A click on a header sorts the 500 rows; the filter narrows them. Both answer at once (timed in the page).
    const sortMs = await page.evaluate(() => {
      const started = performance.now();
      (document.querySelector('#volumes th[data-sort="name"]') as HTMLElement).click();
      return performance.now() - started;
    });
    assert.equal(await page.locator('#volumes tbody tr').first().getAttribute('data-volume'), 'fleet-499');
    const filterMs = await page.evaluate(() => {
      const started = performance.now();
      const input = document.querySelector('#filter') as HTMLInputElement;
      input.value = 'fleet-49';
      input.dispatchEvent(new Event('input'));
      return performance.now() - started;
    });
    assert.equal(await page.locator('#volumes tbody tr').count(), 10);
    t.diagnostic(`500 volumes: sort by name ${sortMs.toFixed(1)} ms, filter ${filterMs.toFixed(1)} ms`);
    const shot = path.join(d.dir, 'dashboard-500.png');
    await page.screenshot({ path: shot });
    t.diagnostic(`screenshot: ${shot}`);
  } finally {
    await browser?.close();
    await stopKeepingScreenshots(d, t);
  }
});
