// What every browser test of the dashboard needs: the built agent on a free
// port with its own files, Debian's Chromium through playwright-core (no
// browser download), loopback servers playing pods, and waiting for a
// condition with a deadline.

import { spawn } from 'node:child_process';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

export const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
export const shots = path.join(root, 'target/ui-screenshots');
const binary = process.env.K3S_LOCAL_AGENT_BIN || path.join(root, 'target/debug/k3s-local-agent');
const chromiumPath = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
export const DEADLINE_MS = 15000;

/** Polls `condition` until it is truthy or the deadline passes. */
export async function waitFor(what, condition) {
  const deadline = Date.now() + DEADLINE_MS;
  for (;;) {
    const value = await condition();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setImmediate(resolve));
  }
}

/**
 * Starts the agent on a free port with tunnels in `range` ("A-B"), with
 * `extra` flags. The base URL is always a loopback one (an agent bound to
 * every address is reached on 127.0.0.1: tests talk to loopback only).
 */
export async function startAgent(range, extra = []) {
  const sandbox = mkdtempSync(path.join(os.tmpdir(), 'k3s-local-agent-web-'));
  writeFileSync(path.join(sandbox, 'hosts'), '127.0.0.1 localhost\n');
  const proc = spawn(binary, [
    'run', '--agent-port', '0', '--port-range', range,
    '--hosts-file', path.join(sandbox, 'hosts'), '--state-dir', path.join(sandbox, 'state'),
    '--no-cluster', ...extra,
  ], { stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, RUST_LOG: 'info' } });
  let log = '';
  const baseUrl = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`agent did not start:\n${log}`)), DEADLINE_MS);
    proc.stderr.on('data', (chunk) => {
      log += chunk;
      const found = /listening on (http:\/\/\S+)/.exec(log);
      if (found) { clearTimeout(timer); resolve(found[1].replace('//0.0.0.0:', '//127.0.0.1:')); }
    });
    proc.once('exit', (code) => reject(new Error(`agent exited (${code}):\n${log}`)));
  });
  const agentId = (await (await fetch(`${baseUrl}/health`)).json()).agent_id;
  return { proc, baseUrl, agentId, sandbox };
}

/** Debian's Chromium, headless, with no network chatter of its own. */
export function launchBrowser() {
  return chromium.launch({
    executablePath: chromiumPath,
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
}

/** A loopback HTTP server playing a pod: answers every request with `text`. */
export function startPod(servers, text) {
  return new Promise((resolve) => {
    const server = http.createServer((_, response) => response.end(text));
    server.listen(0, '127.0.0.1', () => {
      servers.push(server);
      resolve(server.address().port);
    });
  });
}
