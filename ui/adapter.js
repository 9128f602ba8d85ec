// The one place that knows where the dashboard runs: inside the tray app
// (Tauri `invoke`/`listen`) or in a browser against the agent's HTTP API
// (`fetch`, its event stream read as it comes). Everything else in the UI
// calls these functions.

const tauri = window.__TAURI__;

/** True inside the desktop app. */
export const inApp = Boolean(tauri && tauri.core);

async function call(command, args) {
  try {
    return await tauri.core.invoke(command, args);
  } catch (error) {
    // Commands reject with a typed error: {kind, message}.
    throw new Error((error && error.message) || String(error));
  }
}

// Beyond loopback the agent asks for its bearer token. The page asks the
// person once (through `askToken`, set by the app) and keeps it for this tab
// only, in sessionStorage: it never goes into a URL or a cookie.
const TOKEN_KEY = 'k3s-local-agent.token';
let token = sessionStorage.getItem(TOKEN_KEY) || '';
let askToken = null;
let asking = null;

/**
 * Sets how the page asks for the token: `ask(reason)` resolves to what the
 * person typed. Without it, a 401 is an error like any other.
 */
export function onTokenNeeded(ask) {
  askToken = ask;
}

// One question at a time, however many requests were refused at once.
function needToken(reason) {
  if (!asking) {
    asking = askToken(reason).then((typed) => {
      token = typed.trim();
      sessionStorage.setItem(TOKEN_KEY, token);
      asking = null;
    });
  }
  return asking;
}

function headers(extra = {}) {
  return token ? { ...extra, Authorization: `Bearer ${token}` } : extra;
}

async function http(method, path, body) {
  for (;;) {
    const response = await fetch(path, {
      method,
      headers: headers(body ? { 'Content-Type': 'application/json' } : {}),
      body: body ? JSON.stringify(body) : undefined,
    });
    const answer = await response.json().catch(() => ({}));
    if (response.status === 401 && askToken) {
      await needToken(answer.error || 'this agent asks for its token');
      continue;
    }
    if (!response.ok) {
      throw new Error(answer.error || `${method} ${path} answered ${response.status}`);
    }
    return answer;
  }
}

const podPath = (id, action) => `/api/v1/pods/${encodeURIComponent(id)}/${action}`;

/** Health and every pod with its tunnel. */
export function snapshot() {
  return inApp ? call('snapshot') : http('GET', '/api/v1/snapshot');
}

/** Turns one pod's forwarding on or off: every port, or `port` (a staging port) alone. */
export function setForwarding(podId, enabled, port) {
  const body = port == null ? { enabled } : { enabled, port };
  return inApp
    ? call('set_forwarding', { podId, enabled, port: port ?? null })
    : http('POST', podPath(podId, 'forwarding'), body);
}

/** Points one pod's tunnel at the staging pod ('staging') or its local mirror ('local'). */
export function setTarget(podId, target) {
  return inApp
    ? call('set_target', { podId, target })
    : http('POST', podPath(podId, 'target'), { target });
}

/** Removes one pod's tunnel. */
export function stopTunnel(podId) {
  return inApp ? call('stop_tunnel', { podId }) : http('POST', podPath(podId, 'stop'));
}

/** Calls onPod(id) when the tray app asks to show one pod (a notification's click). */
export function onFocusPod(onPod) {
  if (inApp) tauri.event.listen('focus-pod', (event) => onPod(event.payload));
}

/** Hides the tray app's window (Escape); a browser tab stays as it is. */
export function hideWindow() {
  return inApp ? call('hide_window') : Promise.resolve();
}

/** Opens a pod in the default browser (a new tab when already in one). */
export function openPod(podId, url) {
  if (inApp) {
    return call('open_pod', { podId });
  }
  window.open(url, '_blank', 'noopener');
  return Promise.resolve();
}

/**
 * Calls onSnapshot with a fresh snapshot on every change, pushed by the
 * agent (no polling), and onConnected(true|false) when the link changes.
 */
export function subscribe(onSnapshot, onConnected) {
  if (inApp) {
    tauri.event.listen('snapshot', (event) => onSnapshot(event.payload));
    onConnected(true);
    return;
  }
  follow(onSnapshot, onConnected);
}

// The agent's event stream, read with fetch rather than EventSource, which
// cannot send the token. Reconnects as EventSource would, backing off to 5 s.
async function follow(onSnapshot, onConnected) {
  let retry = 250;
  for (;;) {
    try {
      const response = await fetch('/api/v1/events', { headers: headers({ Accept: 'text/event-stream' }) });
      if (response.status === 401 && askToken) {
        const answer = await response.json().catch(() => ({}));
        await needToken(answer.error || 'this agent asks for its token');
        continue;
      }
      if (!response.ok || !response.body) throw new Error(`events answered ${response.status}`);
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      try {
        let buffer = '';
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += value;
          // A CR at a chunk's end may be half of a CRLF: wait for the rest.
          const settled = buffer.endsWith('\r') ? buffer.length - 1 : buffer.length;
          let text = buffer.slice(0, settled).replace(/\r\n?/g, '\n');
          buffer = buffer.slice(settled);
          let end;
          while ((end = text.indexOf('\n\n')) >= 0) {
            const event = parseEvent(text.slice(0, end));
            text = text.slice(end + 2);
            if (event.name !== 'snapshot') continue;
            let snapshot;
            try {
              snapshot = JSON.parse(event.data);
            } catch {
              continue; // one bad event is skipped, not the stream
            }
            retry = 250;
            onConnected(true);
            onSnapshot(snapshot);
          }
          buffer = text + buffer;
        }
      } finally {
        // Whatever ended the loop, the connection is given back.
        reader.cancel().catch(() => {});
      }
    } catch {
      // Said below: the link is down until the next snapshot.
    }
    onConnected(false);
    await new Promise((resolve) => setTimeout(resolve, retry));
    retry = Math.min(retry * 2, 5000);
  }
}

// One server-sent event: its name and its data lines joined.
function parseEvent(block) {
  let name = 'message';
  const data = [];
  for (const line of block.split('\n')) {
    if (line.startsWith(':')) continue;
    const colon = line.indexOf(':');
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? '' : line.slice(colon + 1).replace(/^ /, '');
    if (field === 'event') name = value;
    else if (field === 'data') data.push(value);
  }
  return { name, data: data.join('\n') };
}
