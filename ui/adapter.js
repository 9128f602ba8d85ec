// The one place that knows where the dashboard runs: inside the tray app
// (Tauri `invoke`/`listen`) or in a browser against the agent's HTTP API
// (`fetch`/`EventSource`). Everything else in the UI calls these functions.

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

async function http(method, path, body) {
  const response = await fetch(path, {
    method,
    headers: body ? { 'Content-Type': 'application/json' } : {},
    body: body ? JSON.stringify(body) : undefined,
  });
  const answer = await response.json().catch(() => ({}));
  if (!response.ok) {
    throw new Error(answer.error || `${method} ${path} answered ${response.status}`);
  }
  return answer;
}

const podPath = (id, action) => `/api/v1/pods/${encodeURIComponent(id)}/${action}`;

/** Health and every pod with its tunnel. */
export function snapshot() {
  return inApp ? call('snapshot') : http('GET', '/api/v1/snapshot');
}

/** Turns one pod's forwarding on or off. */
export function setForwarding(podId, enabled) {
  return inApp
    ? call('set_forwarding', { podId, enabled })
    : http('POST', podPath(podId, 'forwarding'), { enabled });
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
  const source = new EventSource('/api/v1/events');
  source.addEventListener('snapshot', (event) => {
    onConnected(true);
    onSnapshot(JSON.parse(event.data));
  });
  // EventSource reconnects by itself; say so meanwhile.
  source.onerror = () => onConnected(false);
}
