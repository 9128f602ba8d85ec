// The dashboard served by the agent, in headless Chromium (Debian's), driven
// by Playwright: rows appear on a push, the toggle closes and reopens the
// port, Stop removes a tunnel, a failing pod shows why, a foreign page is
// refused. Screenshots of each step go to target/ui-screenshots/.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import net from 'node:net';
import path from 'node:path';
import { mkdirSync, readFileSync } from 'node:fs';
import {
  DEADLINE_MS, launchBrowser, shots, startAgent, startPod as startPodOn, waitFor,
} from './harness.mjs';

let agent;
let baseUrl;
let agentId;
let sandbox;
let browser;
let page;
const servers = [];

/** A loopback HTTP server playing a pod: answers every request with `text`. */
function startPod(text) {
  return startPodOn(servers, text);
}

/** 'open' or 'refused' for a TCP connection to a local port. */
function probe(port) {
  return new Promise((resolve) => {
    const socket = net.connect(port, '127.0.0.1');
    socket.once('connect', () => { socket.destroy(); resolve('open'); });
    socket.once('error', (error) => resolve(error.code === 'ECONNREFUSED' ? 'refused' : error.code));
  });
}

/** The body a GET through a tunnel returns. */
function getThrough(port) {
  return new Promise((resolve, reject) => {
    http.get({ host: '127.0.0.1', port, path: '/' }, (response) => {
      let body = '';
      response.on('data', (chunk) => { body += chunk; });
      response.on('end', () => resolve(body));
    }).on('error', reject);
  });
}

/** Opens a connection through a tunnel and waits until it is closed. */
function touch(port) {
  return new Promise((resolve) => {
    const socket = net.connect(port, '127.0.0.1');
    socket.on('data', () => {});
    socket.once('close', resolve);
    socket.once('error', resolve);
  });
}

/** A raw HTTP request with chosen headers (fetch would not send Origin). */
function rawRequest(method, urlPath, headers, body) {
  const url = new URL(urlPath, baseUrl);
  return new Promise((resolve, reject) => {
    const request = http.request(
      { host: url.hostname, port: url.port, path: url.pathname, method, headers },
      (response) => {
        let text = '';
        response.on('data', (chunk) => { text += chunk; });
        response.on('end', () => resolve({ status: response.statusCode, text }));
      },
    );
    request.on('error', reject);
    request.end(body);
  });
}

async function push(action, pods) {
  const response = await fetch(`${baseUrl}/api/v1/pods`, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ agent_id: agentId, action, pods }),
  });
  assert.equal(response.status, 200, await response.text());
}

async function status() {
  return (await fetch(`${baseUrl}/api/v1/pods/status`)).json();
}

async function portOf(id) {
  return (await status()).redirections[id].local_port;
}

function row(id) {
  return page.locator(`tr[data-pod-id="${id}"]`);
}

async function shot(name) {
  await page.screenshot({ path: path.join(shots, `${name}.png`), fullPage: true });
}

before(async () => {
  mkdirSync(shots, { recursive: true });
  ({ proc: agent, baseUrl, agentId, sandbox } = await startAgent('21300-21319'));
  browser = await launchBrowser();
  // A wide tab: the full table (the tray-sized window has its own suite).
  page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
  page.setDefaultTimeout(DEADLINE_MS);
});

after(async () => {
  await browser?.close();
  agent?.kill('SIGTERM');
  for (const server of servers) server.close();
});

test('a newcomer sees how to push a pod', async () => {
  await page.goto(baseUrl);
  await page.locator('#empty').waitFor({ state: 'visible' });
  const curlLine = await page.locator('#curl-line').textContent();
  assert.match(curlLine, /curl -X POST/);
  assert.ok(curlLine.includes(agentId), curlLine);
  assert.equal(await page.locator('#agent-id').textContent(), agentId);
  assert.ok(await page.locator('#demo').isHidden(), 'no DEMO badge outside the demo');
  await page.locator('#link').waitFor({ state: 'hidden' });
  await shot('01-empty');
});

test('pushed pods appear as rows without a reload', async () => {
  const web = await startPod('web page');
  const api = await startPod('api answer');
  await push('create', [
    { id: 'web-1', name: 'web', namespace: 'staging', status: 'running', ip: '127.0.0.1', port: web },
    { id: 'api-1', name: 'api', namespace: 'staging', status: 'running', ip: '127.0.0.1', port: api },
  ]);
  await row('web-1').waitFor();
  await row('api-1').waitFor();
  const text = await row('web-1').textContent();
  assert.ok(text.includes('web-staging.local'), text);
  assert.ok(text.includes(`:${await portOf('web-1')}`), text);
  assert.ok(text.includes(`127.0.0.1:${web}`), text);
  // Both ways in: the range port on localhost, and the name on the pod's own
  // port (at the pod's own address).
  const ways = await row('web-1').locator('.ways').textContent();
  assert.ok(ways.includes(`localhost:${await portOf('web-1')}`), ways);
  assert.ok(ways.includes(`web-staging.local:${web}`), ways);
  assert.equal(await row('web-1').getAttribute('data-state'), 'active');
  assert.ok(await page.locator('#empty').isHidden());
  await shot('02-rows');
});

test('traffic shows as a live sparkline with connect latency, and the header shows usage', async () => {
  const port = await portOf('web-1');
  for (let i = 0; i < 5; i += 1) assert.equal(await getThrough(port), 'web page');
  // The agent samples throughput every 2 s and the stream pushes it: wait
  // for a sample with bytes in it, without reloading.
  const spark = row('web-1').locator('svg.spark');
  await page.waitForFunction(
    () => {
      const svg = document.querySelector('tr[data-pod-id="web-1"] svg.spark');
      return svg && Number(svg.dataset.peak) > 0 && svg.querySelector('polyline');
    },
    null,
    { timeout: 15000 },
  );
  assert.ok(Number(await spark.getAttribute('data-peak')) > 0);
  const latency = await row('web-1').locator('.latency').textContent();
  assert.match(latency, /connect p50 \d+(\.\d+)? ms · p99 \d+(\.\d+)? ms/);
  assert.match(await page.locator('#port-usage').textContent(), /^ports 2\/\d+/);
  assert.match(await page.locator('#error-rate').textContent(), /errors 0\.0% · last min/);
  await shot('03-sparkline');
});

test('the toggle closes the port and opens it again', async () => {
  const port = await portOf('web-1');
  assert.equal(await getThrough(port), 'web page');
  await row('web-1').locator('.slider').click();
  await page.locator('tr[data-pod-id="web-1"][data-state="stopped"]').waitFor();
  assert.equal(await probe(port), 'refused');
  assert.equal(await row('web-1').locator('input[data-role="toggle"]').isChecked(), false);
  await shot('03-toggled-off');
  await row('web-1').locator('.slider').click();
  await page.locator('tr[data-pod-id="web-1"][data-state="active"]').waitFor();
  assert.equal(await getThrough(port), 'web page');
  // The rows count the traffic.
  await waitFor('traffic to show', async () => (await row('web-1').textContent()).includes('· 2'));
});

test('the target button switches a tunnel to the local mirror and back', async () => {
  const via = row('web-1').locator('button.via');
  assert.equal(await via.getAttribute('data-target'), 'staging');
  await via.click();
  await page.locator('tr[data-pod-id="web-1"] button.via[data-target="local"]').waitFor();
  assert.equal((await status()).redirections['web-1'].target, 'local');
  await row('web-1').locator('button.via').click();
  await page.locator('tr[data-pod-id="web-1"] button.via[data-target="staging"]').waitFor();
  assert.equal(await getThrough(await portOf('web-1')), 'web page');
});

test('the filter narrows the rows', async () => {
  await page.fill('#filter', 'api');
  await waitFor('the filter to apply', async () => (await page.locator('tbody tr').count()) === 1);
  assert.equal(await page.locator('tbody tr').getAttribute('data-pod-id'), 'api-1');
  await page.fill('#filter', 'nothing-like-this');
  await page.locator('#no-match').waitFor({ state: 'visible' });
  await page.fill('#filter', '');
  await waitFor('all rows back', async () => (await page.locator('tbody tr').count()) === 2);
});

test('Stop removes the tunnel', async () => {
  const port = await portOf('api-1');
  await row('api-1').locator('button.stop').click();
  await row('api-1').waitFor({ state: 'detached' });
  assert.equal(await probe(port), 'refused');
  assert.equal((await status()).redirections['api-1'], undefined);
  assert.ok(!readFileSync(path.join(sandbox, 'hosts'), 'utf8').includes('api-staging'));
  await shot('04-stopped');
});

test('a failing pod shows its state and reason', async () => {
  const dead = await new Promise((resolve) => {
    const server = net.createServer();
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
  await push('create', [{ id: 'dead-1', name: 'dead', ip: '127.0.0.1', port: dead }]);
  await row('dead-1').waitFor();
  await touch(await portOf('dead-1'));
  const error = row('dead-1').locator('.error-text');
  await error.waitFor();
  assert.match(await error.textContent(), /refused/i);
  await shot('05-failing-pod');
});

test('a foreign page cannot change the agent', async () => {
  const body = JSON.stringify({ enabled: false });
  const foreign = await rawRequest('POST', '/api/v1/pods/web-1/forwarding', {
    'Content-Type': 'application/json', Origin: 'http://evil.example', 'Content-Length': body.length,
  }, body);
  assert.equal(foreign.status, 403, foreign.text);
  const rebound = await rawRequest('GET', '/api/v1/pods', { Host: 'evil.example' });
  assert.equal(rebound.status, 403, rebound.text);
  assert.equal((await status()).redirections['web-1'].status, 'active');
});

test('a page served through one of our own tunnels cannot drive the agent', async () => {
  // A staging pod whose page tries every state change, as a hostile page
  // would: no-cors fetches (which need no permission to be sent) and a push.
  const attack = `<!doctype html><title>loading</title><script>
    const agent = ${JSON.stringify(baseUrl)};
    const post = (path, body, type) => fetch(agent + path, {
      method: 'POST', mode: 'no-cors',
      headers: type ? { 'Content-Type': type } : {},
      body,
    }).catch(() => {});
    Promise.all([
      post('/api/v1/pods/web-1/forwarding', JSON.stringify({ enabled: false }), 'text/plain'),
      post('/api/v1/pods/web-1/target', JSON.stringify({ target: 'local' })),
      post('/api/v1/pods/web-1/stop'),
      post('/api/v1/pods', JSON.stringify({ agent_id: ${JSON.stringify(agentId)}, action: 'sync', pods: [] }), 'text/plain'),
    ]).finally(() => { document.title = 'done'; });
  </script>`;
  const evil = await new Promise((resolve) => {
    const server = http.createServer((_, response) => {
      response.setHeader('Content-Type', 'text/html');
      response.end(attack);
    });
    server.listen(0, '127.0.0.1', () => { servers.push(server); resolve(server.address().port); });
  });
  await push('create', [{ id: 'evil-1', name: 'evil', ip: '127.0.0.1', port: evil }]);
  const before = await status();
  const tab = await browser.newPage();
  await tab.goto(`http://evil-staging.localhost:${await portOf('evil-1')}/`);
  await waitFor('the page to try everything', async () => (await tab.title()) === 'done');
  await tab.close();
  const after = await status();
  assert.equal(after.total_redirections, before.total_redirections, 'nothing was pushed away');
  assert.equal(after.redirections['web-1'].status, 'active');
  assert.equal(after.redirections['web-1'].target, before.redirections['web-1'].target);
  // The same from outside a browser: a tunnel's origin is not the agent's.
  const body = JSON.stringify({ agent_id: agentId, action: 'sync', pods: [] });
  const pushed = await rawRequest('POST', '/api/v1/pods', {
    'Content-Type': 'application/json', Origin: 'http://my-app-staging.localhost:8085',
    'Content-Length': body.length,
  }, body);
  assert.equal(pushed.status, 403, pushed.text);
  assert.equal((await status()).total_redirections, before.total_redirections);
});

test('the dashboard reads well in the dark theme', async () => {
  await page.emulateMedia({ colorScheme: 'dark' });
  const background = await page.evaluate(() => getComputedStyle(document.body).backgroundColor);
  assert.notEqual(background, 'rgb(255, 255, 255)');
  await shot('06-dark');
  await page.emulateMedia({ colorScheme: 'light' });
});
