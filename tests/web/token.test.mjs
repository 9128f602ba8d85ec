// The dashboard of an agent that listens beyond loopback: every call needs
// the bearer token, so the page asks for it once, keeps it for the tab in
// sessionStorage, says so when it is wrong, and asks again in a new tab.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import path from 'node:path';
import { mkdirSync } from 'node:fs';
import {
  DEADLINE_MS, launchBrowser, root, shots, startAgent, startPod, waitFor,
} from './harness.mjs';

const binary = process.env.K3S_LOCAL_AGENT_BIN || path.join(root, 'target/debug/k3s-local-agent');
let agent;
let baseUrl;
let agentId;
let token;
let browser;
const servers = [];

before(async () => {
  mkdirSync(shots, { recursive: true });
  // Bound to every address, the agent asks every caller for its token,
  // loopback ones included; the test still talks to 127.0.0.1 only.
  let sandbox;
  ({ proc: agent, baseUrl, agentId, sandbox } = await startAgent('21340-21349', ['--bind', '0.0.0.0']));
  token = execFileSync(binary, ['token', '--state-dir', path.join(sandbox, 'state')]).toString().trim();
  const port = await startPod(servers, 'behind a token');
  const response = await fetch(`${baseUrl}/api/v1/pods`, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json', Authorization: `Bearer ${token}` },
    body: JSON.stringify({
      agent_id: agentId, action: 'create',
      pods: [{ id: 'guarded-1', name: 'guarded', ip: '127.0.0.1', port }],
    }),
  });
  assert.equal(response.status, 200, await response.text());
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
  agent?.kill('SIGTERM');
  for (const server of servers) server.close();
});

test('the page asks once for the token, says when it is wrong, and keeps it for the tab', async () => {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const page = await context.newPage();
  page.setDefaultTimeout(DEADLINE_MS);
  await page.goto(baseUrl);

  // Asked, with how to find the token; no pods until it is given.
  const form = page.locator('#token-form');
  await form.waitFor({ state: 'visible' });
  assert.match(await form.textContent(), /k3s-local-agent token/);
  assert.match(await page.locator('#token-reason').textContent(), /bearer token/);
  await page.screenshot({ path: path.join(shots, '30-token-asked.png') });
  assert.equal(await page.locator('tr[data-pod-id="guarded-1"]').count(), 0);

  // A wrong token: asked again, with the agent's reason.
  await page.locator('#token-input').fill('not-the-token');
  await page.locator('#token-form button[type="submit"]').click();
  await waitFor('the wrong token to be refused', async () =>
    (await form.isVisible()) && /invalid bearer token/.test(await page.locator('#token-reason').textContent()));

  // The right one: the pods come, live.
  await page.locator('#token-input').fill(token);
  await page.locator('#token-form button[type="submit"]').click();
  await page.locator('tr[data-pod-id="guarded-1"]').waitFor({ state: 'visible' });
  assert.ok(await form.isHidden(), 'the question goes once answered');
  await page.locator('#link').waitFor({ state: 'hidden' });
  await page.screenshot({ path: path.join(shots, '31-token-given.png') });

  // Kept for this tab: a reload does not ask again.
  await page.reload();
  await page.locator('tr[data-pod-id="guarded-1"]').waitFor({ state: 'visible' });
  assert.ok(await form.isHidden(), 'a reload does not ask again');
  assert.equal(await page.evaluate(() => sessionStorage.getItem('k3s-local-agent.token')), token);
  assert.equal(await page.evaluate(() => localStorage.length), 0, 'nothing kept beyond the tab');
  await context.close();

  // A new tab (a new session) asks again.
  const fresh = await browser.newContext();
  const other = await fresh.newPage();
  other.setDefaultTimeout(DEADLINE_MS);
  await other.goto(baseUrl);
  await other.locator('#token-form').waitFor({ state: 'visible' });
  await fresh.close();
});

test('the token never goes into a URL', async () => {
  const context = await browser.newContext();
  const page = await context.newPage();
  page.setDefaultTimeout(DEADLINE_MS);
  const urls = [];
  page.on('request', (request) => urls.push(request.url()));
  await page.goto(baseUrl);
  await page.locator('#token-input').fill(token);
  await page.locator('#token-form button[type="submit"]').click();
  await page.locator('tr[data-pod-id="guarded-1"]').waitFor({ state: 'visible' });
  assert.ok(urls.length > 0);
  assert.ok(urls.every((url) => !url.includes(token)), urls.join('\n'));
  await context.close();
});
