// The dashboard at the tray window's size (420×640) and in a wide tab
// (1280×800): with 1, 3 and 40 pods, long names and every state, nothing
// scrolls sideways, each pod's address is in view, a row's details open
// and close, and the keyboard walks the rows. Screenshots of each case go
// to target/ui-screenshots/.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import path from 'node:path';
import { mkdirSync } from 'node:fs';
import { DEADLINE_MS, launchBrowser, shots, startAgent, startPod, waitFor } from './harness.mjs';

const servers = [];
let agent;
let browser;
// A pod that answers, and a port where nothing does.
let good;
let refusing;

const TRAY = { width: 420, height: 640 };
const WIDE = { width: 1280, height: 800 };
const LONG = 'a-staging-service-with-a-very-long-name-that-goes-on-and';

async function api(method, urlPath, body) {
  const response = await fetch(`${agent.baseUrl}${urlPath}`, {
    method,
    headers: { 'Content-Type': 'application/json' },
    body: body ? JSON.stringify(body) : undefined,
  });
  const text = await response.text();
  assert.ok(response.ok, `${method} ${urlPath}: ${response.status} ${text}`);
  return JSON.parse(text);
}

/** The agent holds exactly `count` pods: long names, and every state. */
async function holdPods(count) {
  const pods = Array.from({ length: count }, (_, i) => ({
    id: `p${i}`,
    name: i % 3 === 0 ? `${LONG.slice(0, 50)}-${i}` : `pod-${i}`,
    ip: '127.0.0.1',
    port: i % 4 === 1 ? refusing : good,
    // One pod with more ports than its tunnel: shown, not dropped.
    ...(i === 1 ? { ports: [{ name: 'metrics', port: 9090 }, { name: 'dns', port: 53, protocol: 'UDP' }] } : {}),
  }));
  await api('POST', '/api/v1/pods', { agent_id: agent.agentId, action: 'sync', pods });
  const status = await api('GET', '/api/v1/pods/status');
  // A connection to each refusing pod: its tunnel shows why it fails.
  for (const [id, tunnel] of Object.entries(status.redirections)) {
    if (tunnel.staging_port === refusing && tunnel.local_port) {
      await new Promise((resolve) => {
        const socket = net.connect(tunnel.local_port, '127.0.0.1');
        socket.on('data', () => {});
        socket.once('close', resolve);
        socket.once('error', resolve);
      });
      await waitFor(`${id} to show its error`, async () =>
        (await api('GET', '/api/v1/pods/status')).redirections[id].error);
    }
  }
  // And one turned off.
  if (count > 2) await api('POST', '/api/v1/pods/p2/forwarding', { enabled: false });
}

async function openPage(viewport, count) {
  const page = await browser.newPage({ viewport });
  page.setDefaultTimeout(DEADLINE_MS);
  await page.goto(agent.baseUrl);
  await waitFor(`${count} rows`, async () =>
    (await page.locator('#pods tbody tr').count()) === count);
  return page;
}

/** Nothing scrolls sideways, and every pod's address is in view. */
async function assertFits(page, what) {
  const { scrollWidth, innerWidth } = await page.evaluate(() => ({
    scrollWidth: document.documentElement.scrollWidth,
    innerWidth: window.innerWidth,
  }));
  assert.ok(scrollWidth <= innerWidth, `${what}: scrolls sideways (${scrollWidth} > ${innerWidth})`);
  const boxes = await page.locator('#pods tbody tr .address').evaluateAll((nodes) =>
    nodes.map((node) => {
      const box = node.getBoundingClientRect();
      return { left: box.left, right: box.right, width: box.width, text: node.textContent };
    }));
  for (const box of boxes) {
    assert.ok(box.width > 0 && box.left >= 0 && box.right <= innerWidth + 0.5,
      `${what}: address ${box.text} not in view: ${JSON.stringify(box)}`);
  }
}

before(async () => {
  mkdirSync(shots, { recursive: true });
  agent = await startAgent('21330-21379');
  browser = await launchBrowser();
  good = await startPod(servers, 'fine');
  refusing = await new Promise((resolve) => {
    const server = net.createServer();
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
});

after(async () => {
  await browser?.close();
  agent?.proc.kill('SIGTERM');
  for (const server of servers) server.close();
});

test('one compact row per pod at the tray size, the full table when wide', async () => {
  for (const count of [1, 3, 40]) {
    await holdPods(count);
    for (const [label, viewport] of [['tray', TRAY], ['wide', WIDE]]) {
      const page = await openPage(viewport, count);
      await assertFits(page, `${label}, ${count} pods`);
      const headerShown = await page.locator('#pods thead').isVisible();
      assert.equal(headerShown, label === 'wide', `${label}: the table's header`);
      if (label === 'tray') {
        // A long name stays on one line, cut with an ellipsis, whole on hover.
        const name = page.locator('#pods tbody tr[data-pod-id="p0"] .name');
        const { height, lineHeight, title } = await name.evaluate((node) => ({
          height: node.getBoundingClientRect().height,
          lineHeight: parseFloat(getComputedStyle(node).lineHeight) || 18,
          title: node.title,
        }));
        assert.ok(height <= lineHeight * 1.5, `the name wraps: ${height}px`);
        assert.ok(title.startsWith(LONG.slice(0, 50)), title);
        // Details are closed: no Stop button in view.
        assert.equal(await page.locator('#pods tbody tr[data-pod-id="p0"] .stop').isVisible(), false);
      }
      await page.screenshot({ path: path.join(shots, `tray-window-${label}-${count}.png`), fullPage: true });
      await page.close();
    }
  }
});

test('a row opens its details by a click and by a key, and closes again', async () => {
  await holdPods(40);
  const page = await openPage(TRAY, 40);
  const row = page.locator('#pods tbody tr[data-pod-id="p1"]');
  await row.locator('.name').click();
  await row.locator('.stop').waitFor({ state: 'visible' });
  assert.equal(await row.getAttribute('aria-expanded'), 'true');
  // Every port of the pod is listed with its name; UDP is not forwarded.
  const lines = row.locator('.port-list .port-line');
  assert.deepEqual(
    await row.locator('.port-list .port-label').allTextContents(),
    [`${refusing}`, '9090 metrics', '53/UDP dns'],
  );
  assert.match(await lines.nth(2).textContent(), /not forwarded/);
  assert.equal(await lines.nth(2).locator('input').count(), 0, 'no switch for a UDP port');
  await assertFits(page, 'details open');
  await page.screenshot({ path: path.join(shots, 'tray-window-details.png') });
  // One port's switch turns that port alone off, and on again.
  const metricsPort = async () => (await api('GET', '/api/v1/pods/status')).redirections.p1;
  await lines.nth(1).locator('.switch').click();
  await waitFor('port 9090 off alone', async () => {
    const tunnel = await metricsPort();
    return tunnel.ports.find((p) => p.staging_port === 9090).forwarding === false
      && tunnel.forwarding === true;
  });
  await waitFor('the switch to show it', async () =>
    !(await lines.nth(1).locator('input').isChecked()));
  await lines.nth(1).locator('.switch').click();
  await waitFor('port 9090 on again', async () =>
    (await metricsPort()).ports.find((p) => p.staging_port === 9090).forwarding === true);
  await row.locator('.name').click();
  await row.locator('.stop').waitFor({ state: 'hidden' });
  await row.focus();
  await page.keyboard.press('ArrowRight');
  await page.locator('#pods tbody tr[data-pod-id="p1"] .stop').waitFor({ state: 'visible' });
  await page.keyboard.press('ArrowLeft');
  await page.locator('#pods tbody tr[data-pod-id="p1"] .stop').waitFor({ state: 'hidden' });
  await page.close();
});

test('the keyboard walks the rows, toggles forwarding and finds the filter', async () => {
  await holdPods(40);
  const page = await openPage(TRAY, 40);
  const order = await page.locator('#pods tbody tr').evaluateAll((rows) =>
    rows.map((row) => row.dataset.podId));
  await page.locator('#pods tbody tr').first().focus();
  const focused = () => page.evaluate(() => document.activeElement?.dataset?.podId);
  assert.equal(await focused(), order[0]);
  await page.keyboard.press('ArrowDown');
  await page.keyboard.press('ArrowDown');
  await page.keyboard.press('ArrowDown');
  assert.equal(await focused(), order[3]);
  // Back up to p2 (the one turned off), wherever it is in the list.
  const off = order.indexOf('p2');
  for (let at = 3; at > off; at -= 1) await page.keyboard.press('ArrowUp');
  for (let at = 3; at < off; at += 1) await page.keyboard.press('ArrowDown');
  assert.equal(await focused(), 'p2');
  // Space turns it back on, and the row keeps the keyboard.
  await page.keyboard.press(' ');
  await waitFor('p2 forwarding again', async () =>
    (await api('GET', '/api/v1/pods/status')).redirections.p2.forwarding);
  await waitFor('the row to keep focus after the update', async () => (await focused()) === 'p2');
  await page.keyboard.press('/');
  assert.equal(await page.evaluate(() => document.activeElement?.id), 'filter');
  // Every control in a row has a name a screen reader can say.
  const nameless = await page.locator('#pods tbody button, #pods tbody input, #pods tbody a')
    .evaluateAll((nodes) => nodes
      .filter((node) => !(node.getAttribute('aria-label') || node.textContent.trim() || node.title))
      .map((node) => node.outerHTML));
  assert.deepEqual(nameless, []);
  await page.close();
});
