// The dashboard: renders each snapshot the agent pushes, and turns clicks
// into calls through the adapter. All pod data is untrusted text: it goes in
// with textContent, never as HTML.

import * as agent from './adapter.js';

const $ = (id) => document.getElementById(id);
let latest = null;

function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === 'class') node.className = value;
    else if (key === 'text') node.textContent = value;
    else if (key.startsWith('data-')) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) node.append(child);
  return node;
}

function bytes(n) {
  const units = ['B', 'KB', 'MB', 'GB', 'TB'];
  let value = n;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${unit === 0 ? value : value.toFixed(1)} ${units[unit]}`;
}

function ago(timestamp) {
  if (!timestamp) return 'never';
  const seconds = Math.max(0, Math.round((Date.now() - Date.parse(timestamp)) / 1000));
  if (seconds < 60) return `${seconds}s ago`;
  if (seconds < 3600) return `${Math.round(seconds / 60)}m ago`;
  return new Date(timestamp).toLocaleTimeString();
}

function showError(message) {
  const box = $('error');
  box.textContent = message;
  box.hidden = !message;
}

async function act(button, work) {
  button.disabled = true;
  try {
    await work();
    showError('');
  } catch (error) {
    showError(error.message);
  } finally {
    button.disabled = false;
  }
}

// The pod's name URL (no port) when its own port listens on its address and
// the names are in the system's hosts file; else the range port, which
// browsers reach by the .localhost name with no setup.
function podUrl(tunnel) {
  if (tunnel.name_url && latest && latest.health.names.system_wide) return tunnel.name_url;
  return `http://${tunnel.localhost_name}:${tunnel.local_port}/`;
}

const SVG = 'http://www.w3.org/2000/svg';

// A small line of the tunnel's throughput over the last minute (bytes/s,
// oldest left), scaled to its own peak.
function sparkline(samples) {
  const width = 90;
  const height = 18;
  const svg = document.createElementNS(SVG, 'svg');
  svg.setAttribute('class', 'spark');
  svg.setAttribute('width', String(width));
  svg.setAttribute('height', String(height));
  svg.setAttribute('viewBox', `0 0 ${width} ${height}`);
  const peak = Math.max(1, ...samples);
  const step = samples.length > 1 ? width / (samples.length - 1) : width;
  const points = samples.map((value, i) =>
    `${(i * step).toFixed(1)},${(height - 1 - (value / peak) * (height - 2)).toFixed(1)}`);
  const base = document.createElementNS(SVG, 'line');
  base.setAttribute('class', 'base');
  base.setAttribute('x1', '0');
  base.setAttribute('x2', String(width));
  base.setAttribute('y1', String(height - 1));
  base.setAttribute('y2', String(height - 1));
  svg.append(base);
  if (points.length > 1) {
    const line = document.createElementNS(SVG, 'polyline');
    line.setAttribute('points', points.join(' '));
    svg.append(line);
  }
  svg.dataset.peak = String(Math.max(0, ...samples));
  return svg;
}

function ms(value) {
  return value == null ? '–' : `${value < 10 ? value.toFixed(2) : value.toFixed(0)} ms`;
}

function copyButton(text) {
  const button = el('button', { class: 'copy mono', text, title: 'Copy' });
  button.addEventListener('click', async () => {
    try {
      await navigator.clipboard.writeText(text);
      button.textContent = 'copied';
    } catch {
      button.textContent = 'copy failed';
    }
    setTimeout(() => { button.textContent = text; }, 1200);
  });
  return button;
}

// Rows whose details are open, and the row that had the keyboard: kept
// across renders, which replace every row on each snapshot.
const openRows = new Set();
let focusedRow = null;

function podRow({ pod, tunnel, activity }) {
  const row = el('tr', { 'data-pod-id': pod.id, 'data-state': tunnel.status, tabIndex: 0 });
  if (openRows.has(pod.id)) row.classList.add('open');
  row.setAttribute('aria-expanded', String(openRows.has(pod.id)));
  row.setAttribute('aria-label', `${pod.name}: ${tunnel.status}${tunnel.forwarding ? '' : ', forwarding off'}`);

  const local = tunnel.local_port ? `:${tunnel.local_port}` : 'no port';
  // The name that resolves to this pod: its short one, or its long one
  // when another pod holds the short one.
  const name = (tunnel.names && tunnel.names[0]) || tunnel.dns_name;
  // The one address a person would use: the name alone when it resolves
  // and the pod's own port listens there, else localhost and the range port.
  const usable = tunnel.name_url && latest && latest.health.names.system_wide
    ? tunnel.name_url.replace(/^http:\/\//, '').replace(/\/$/, '')
    : tunnel.local_port ? `localhost:${tunnel.local_port}` : '';
  const dot = el('span', {
    class: `dot ${tunnel.status}${tunnel.error ? ' erroring' : ''}`,
    title: tunnel.error || `tunnel ${tunnel.status}`,
  });
  dot.setAttribute('role', 'img');
  dot.setAttribute('aria-label', tunnel.error ? `${tunnel.status}, failing` : tunnel.status);
  const address = el('span', { class: 'address' });
  if (usable) {
    const link = el('a', { class: 'mono', href: podUrl(tunnel), text: usable, title: `Open ${usable}` });
    link.addEventListener('click', (event) => {
      event.preventDefault();
      event.stopPropagation();
      agent.openPod(pod.id, podUrl(tunnel)).catch((error) => showError(error.message));
    });
    const copy = el('button', { class: 'copy-address', text: 'copy', title: 'Copy the address' });
    copy.setAttribute('aria-label', `Copy ${usable}`);
    copy.addEventListener('click', async (event) => {
      event.stopPropagation();
      try {
        await navigator.clipboard.writeText(usable);
        copy.textContent = 'copied';
      } catch {
        copy.textContent = 'failed';
      }
      setTimeout(() => { copy.textContent = 'copy'; }, 1200);
    });
    address.append(link, copy);
  } else {
    address.append(el('span', { class: 'muted', text: 'no port' }));
  }

  const podCell = el('td', { class: 'pod' }, [
    dot,
    el('div', { class: 'name', text: pod.name, title: pod.name }),
    address,
    el('div', { class: 'sub detail', text: [pod.namespace, pod.status].filter(Boolean).join(' · ') }),
  ]);

  // A pod with several ports lists each with its own ways in, switch,
  // state and error; a pod with one shows them once, for the pod.
  const severalPorts = (tunnel.ports || []).length > 1;
  const tunnelCell = el('td', { class: 'tunnel detail-cell' }, [
    el('span', {
      class: `state ${tunnel.status}${tunnel.error ? ' erroring' : ''}`,
      text: tunnel.status,
      title: tunnel.error || `tunnel ${tunnel.status}`,
    }),
    ' ',
    el('span', { class: 'mono port', text: local }),
    el('div', {}, [copyButton(name)]),
  ]);
  if (severalPorts) {
    tunnelCell.append(
      el('div', { class: 'sub mono', text: `→ ${tunnel.staging_pod_ip}, ${tunnel.ports.length} ports` }),
      portList(pod, tunnel, name),
    );
  } else {
    tunnelCell.append(
      el('div', { class: 'sub mono ways' }, [
        el('span', { class: 'way-range', text: tunnel.local_port ? `localhost:${tunnel.local_port}` : '' }),
        tunnel.name_port
          ? el('span', { class: 'way-name', text: ` · ${name}:${tunnel.name_port}` })
          : '',
      ]),
      el('div', { class: 'sub mono', text: `→ ${tunnel.staging_pod_ip}:${tunnel.staging_port}` }),
    );
  }
  if (tunnel.error && !severalPorts) {
    tunnelCell.append(el('div', { class: 'error-text', text: tunnel.error }));
  }
  if (tunnel.name_port_error) {
    tunnelCell.append(el('div', { class: 'sub name-port-error', text: tunnel.name_port_error }));
  }
  if (tunnel.name_note) {
    tunnelCell.append(el('div', { class: 'sub name-note', text: tunnel.name_note }));
  }
  if (tunnel.port_note) {
    tunnelCell.append(el('div', { class: 'sub', text: tunnel.port_note }));
  }
  if (tunnel.mirror) {
    const m = tunnel.mirror;
    const parts = [`mirror ${m.name}`, m.phase, m.pod_ip, m.restarts ? `${m.restarts} restarts` : '']
      .filter(Boolean);
    tunnelCell.append(el('div', { class: 'sub mirror', text: parts.join(' · ') }));
    if (m.last_event) {
      tunnelCell.append(el('div', { class: 'sub mirror-event', text: m.last_event }));
    }
    if (m.error) {
      tunnelCell.append(el('div', { class: 'error-text mirror-error', text: `mirror: ${m.error}` }));
    }
  }

  // The pod's traffic: every port's together (each port's is in its line).
  const sum = (field) => (severalPorts
    ? tunnel.ports.reduce((total, port) => total + port[field], 0)
    : tunnel[field]);
  const traffic = el('td', { class: 'num traffic detail-cell' }, [
    el('div', { text: `${sum('open_connections')} open · ${sum('total_connections')}` }),
    el('div', { class: 'sub', text: `↑ ${bytes(sum('bytes_to_pod'))} ↓ ${bytes(sum('bytes_from_pod'))}` }),
  ]);
  if (activity) {
    const now = activity.throughput.length ? activity.throughput[activity.throughput.length - 1] : 0;
    const spark = sparkline(activity.throughput);
    spark.setAttribute('aria-label', `throughput, last minute; now ${bytes(now)}/s`);
    traffic.append(
      spark,
      el('div', { class: 'sub rate', text: `${bytes(now)}/s` }),
      el('div', {
        class: 'sub latency',
        text: `connect p50 ${ms(activity.connect_p50_ms)} · p99 ${ms(activity.connect_p99_ms)}`,
        title: 'time to reach the pod, connections of the last minute',
      }),
    );
  }

  const toggle = el('input', {
    type: 'checkbox',
    checked: tunnel.forwarding,
    title: tunnel.forwarding ? 'Forwarding: on' : 'Forwarding: off',
    'data-role': 'toggle',
  });
  toggle.addEventListener('click', (event) => event.stopPropagation());
  toggle.setAttribute('aria-label', `Forward ${pod.name}`);
  toggle.addEventListener('change', () => switchForwarding(toggle, pod.id));

  const open = el('button', { class: 'open', text: 'Open', disabled: tunnel.status !== 'active' });
  open.addEventListener('click', () => act(open, () => agent.openPod(pod.id, podUrl(tunnel))));
  const viaMirror = tunnel.target === 'local';
  // The way in use, as people read it ("via staging API", "via staging
  // (direct)", "via mirror"); a click switches between staging and mirror.
  const wayLabel = tunnel.way_label || (viaMirror ? 'via mirror' : 'via staging');
  const via = el('button', {
    class: 'via',
    text: wayLabel,
    title: viaMirror
      ? 'Forwarding to the local mirror; click to forward to the staging pod'
      : `Forwarding to the staging pod (${tunnel.via || 'direct'}); click to forward to the local mirror`,
    'data-target': tunnel.target,
    'data-way': tunnel.way || '',
  });
  via.addEventListener('click', () =>
    act(via, () => agent.setTarget(pod.id, viaMirror ? 'staging' : 'local')));
  const stop = el('button', { class: 'stop', text: 'Stop', title: 'Remove this tunnel' });
  stop.addEventListener('click', () => act(stop, () => agent.stopTunnel(pod.id)));

  const details = el('button', { class: 'details-toggle', text: openRows.has(pod.id) ? '▾' : '▸' });
  details.setAttribute('aria-label', `Details of ${pod.name}`);
  details.setAttribute('aria-expanded', String(openRows.has(pod.id)));
  details.addEventListener('click', (event) => {
    event.stopPropagation();
    toggleDetails(pod.id);
  });
  for (const button of [open, via, stop]) {
    button.addEventListener('click', (event) => event.stopPropagation());
  }

  const actions = el('td', { class: 'actions' }, [
    el('label', { class: 'switch', title: 'Forwarding' }, [toggle, el('span', { class: 'slider' })]),
    details,
    el('div', { class: 'row-actions detail' }, [open, stop]),
    el('div', { class: 'row-actions detail' }, [via]),
  ]);

  row.append(podCell, tunnelCell, traffic, actions);
  row.addEventListener('click', (event) => {
    // A control's own click (the toggle's label, a link, a button) is not a
    // click on the row.
    if (event.target.closest('button, a, input, label')) return;
    toggleDetails(pod.id);
  });
  row.addEventListener('focus', () => { focusedRow = pod.id; });
  row.addEventListener('keydown', (event) => rowKey(event, row, pod, tunnel, toggle));
  return row;
}

// Every port of a pod, one line each: its number and name, its range
// port and the name's own port, its switch, its state and traffic. UDP
// and SCTP ports are listed as not forwarded.
function portList(pod, tunnel, name) {
  const list = el('ul', { class: 'port-list', 'aria-label': `Ports of ${pod.name}` });
  for (const port of tunnel.ports) {
    const label = `${port.staging_port}${port.protocol === 'TCP' ? '' : `/${port.protocol}`}`
      + (port.name ? ` ${port.name}` : '');
    const item = el('li', {
      class: 'port-line',
      'data-port': String(port.staging_port),
      'data-protocol': port.protocol,
      'data-state': port.status,
    });
    item.append(el('span', { class: 'mono port-label', text: label }));
    if (port.protocol !== 'TCP') {
      item.append(el('span', { class: 'sub', text: `not forwarded (${port.protocol} is not tunnelled)` }));
      list.append(item);
      continue;
    }
    const ways = [port.local_port ? `localhost:${port.local_port}` : 'no port'];
    if (port.name_port) ways.push(`${name}:${port.name_port}`);
    const toggle = el('input', {
      type: 'checkbox',
      checked: port.forwarding,
      'data-role': 'port-toggle',
      title: port.forwarding ? `Port ${port.staging_port}: on` : `Port ${port.staging_port}: off`,
    });
    toggle.setAttribute('aria-label', `Forward port ${port.staging_port} of ${pod.name}`);
    toggle.addEventListener('click', (event) => event.stopPropagation());
    toggle.addEventListener('change', () => switchForwarding(toggle, pod.id, port.staging_port));
    item.append(
      el('label', { class: 'switch small', title: `Forward port ${port.staging_port}` },
        [toggle, el('span', { class: 'slider' })]),
      el('span', { class: `state ${port.status}${port.error ? ' erroring' : ''}`, text: port.status }),
      el('span', { class: 'sub mono', text: ways.join(' · ') }),
      el('span', {
        class: 'sub',
        text: `${port.open_connections} open · ↑ ${bytes(port.bytes_to_pod)} ↓ ${bytes(port.bytes_from_pod)}`,
      }),
    );
    if (port.error) item.append(el('div', { class: 'error-text', text: port.error }));
    list.append(item);
  }
  return list;
}

// Asks the agent for the switch's new state; a refusal puts the switch
// back (the pod did not change, so its row would not be redrawn).
function switchForwarding(toggle, podId, port) {
  const wanted = toggle.checked;
  return act(toggle, () => agent.setForwarding(podId, wanted, port).catch((error) => {
    toggle.checked = !wanted;
    throw error;
  }));
}

function toggleDetails(id) {
  if (openRows.has(id)) openRows.delete(id);
  else openRows.add(id);
  focusedRow = id;
  render();
}

// The keyboard on a row: arrows move between rows, space toggles
// forwarding, Enter opens the pod, right and left open and close details.
function rowKey(event, row, pod, tunnel, toggle) {
  if (event.target !== row) return;
  const rows = [...document.querySelectorAll('#pods tbody tr')];
  const at = rows.indexOf(row);
  const move = (to) => {
    const next = rows[Math.max(0, Math.min(rows.length - 1, to))];
    if (next) next.focus();
  };
  switch (event.key) {
    case 'ArrowDown': move(at + 1); break;
    case 'ArrowUp': move(at - 1); break;
    case 'Home': move(0); break;
    case 'End': move(rows.length - 1); break;
    case ' ':
      toggle.checked = !toggle.checked;
      switchForwarding(toggle, pod.id);
      break;
    case 'Enter':
      if (tunnel.local_port) agent.openPod(pod.id, podUrl(tunnel)).catch((error) => showError(error.message));
      break;
    case 'ArrowRight': if (!openRows.has(pod.id)) toggleDetails(pod.id); break;
    case 'ArrowLeft': if (openRows.has(pod.id)) toggleDetails(pod.id); break;
    default: return;
  }
  event.preventDefault();
}

function matches(view, filter) {
  if (!filter) return true;
  const { pod, tunnel } = view;
  return [pod.id, pod.name, pod.namespace, pod.status, tunnel.dns_name, String(tunnel.local_port), tunnel.status]
    .some((text) => text && text.toLowerCase().includes(filter));
}

function renderHeader(health) {
  $('agent-id').textContent = health.agent_id;
  $('demo').hidden = !health.demo;

  const cp = health.control_plane;
  const pill = $('control-plane');
  if (cp.reachable === true) {
    pill.className = 'pill ok';
    pill.textContent = `control plane · synced ${ago(cp.last_sync)}`;
  } else if (cp.reachable === false) {
    pill.className = 'pill bad';
    pill.textContent = `control plane unreachable · last sync ${ago(cp.last_sync)}`;
  } else {
    pill.className = 'pill';
    pill.textContent = 'control plane · not yet contacted';
  }
  pill.title = cp.last_error ? `${cp.url}: ${cp.last_error}` : cp.url;

  const cluster = $('cluster');
  cluster.textContent = `cluster · ${health.cluster_status}`;
  cluster.className = health.cluster_status === 'ready' ? 'pill ok' : 'pill';

  // Where the names go and why: the NSS module, /etc/hosts, or a private file.
  const names = $('names');
  const where = {
    'nss-module': 'system resolver',
    'system-hosts': '/etc/hosts',
    'private-file': 'private file',
    file: 'hosts file',
    off: 'off',
  }[health.names.mode] || health.names.mode;
  names.textContent = `names · ${where}`;
  names.className = health.names.system_wide ? 'pill ok' : 'pill';
  names.title = [health.names.hosts_file, health.names.why].filter(Boolean).join(': ');

  $('forwarding-off').hidden = health.forwarding !== false;

  const warning = $('names-warning');
  warning.textContent = health.names.warning || '';
  warning.hidden = !health.names.warning;

  $('curl-line').textContent =
    `curl -X POST ${location.origin.startsWith('http') ? location.origin : health.api_url || 'http://127.0.0.1:8082'}/api/v1/pods \\\n` +
    `  -H 'Content-Type: application/json' -d '{"agent_id":"${health.agent_id}","action":"create",` +
    `"pods":[{"id":"pod-1","name":"my-app","ip":"10.0.1.100","port":80}]}'`;
}

function renderUsage(ports, pods) {
  const usage = $('port-usage');
  if (ports && ports.size) {
    const share = (100 * ports.used) / ports.size;
    usage.textContent = `ports ${ports.used}/${ports.size} · ${share.toFixed(share < 10 ? 1 : 0)}%`;
    usage.className = share >= 90 ? 'pill bad' : share >= 75 ? 'pill warn' : 'pill';
  }
  const tried = pods.reduce((sum, view) => sum + (view.activity ? view.activity.connections : 0), 0);
  const failed = pods.reduce((sum, view) => sum + (view.activity ? view.activity.errors : 0), 0);
  const rate = $('error-rate');
  rate.textContent = tried ? `errors ${((100 * failed) / tried).toFixed(1)}% · last min` : 'errors · none in the last min';
  rate.className = failed ? 'pill bad' : 'pill ok';
}

function render() {
  if (!latest) return;
  const { health, pods } = latest;
  renderHeader(health);
  renderUsage(latest.ports, pods);
  const filter = $('filter').value.trim().toLowerCase();
  const shown = pods.filter((view) => matches(view, filter));
  const active = pods.filter((view) => view.tunnel.status === 'active').length;
  const failed = pods.filter((view) => view.tunnel.status === 'failed').length;
  $('counts').textContent = pods.length
    ? `${active}/${pods.length} active${failed ? `, ${failed} failed` : ''}`
    : '';
  $('empty').hidden = pods.length > 0;
  $('pods').hidden = shown.length === 0;
  $('no-match').hidden = !(pods.length > 0 && shown.length === 0);
  const hadFocus = document.activeElement && document.activeElement.matches('#pods tbody tr');
  const present = new Set(pods.map((view) => view.pod.id));
  for (const id of renderedRows.keys()) {
    if (!present.has(id)) renderedRows.delete(id);
  }
  placeRows($('pods').querySelector('tbody'), shown.map(rowOf));
  // The row that had the keyboard keeps it when it was drawn anew.
  if (hadFocus && focusedRow) {
    const row = document.querySelector(`#pods tbody tr[data-pod-id="${CSS.escape(focusedRow)}"]`);
    if (row && row !== document.activeElement) row.focus();
  }
}

// Rows drawn, by pod id, with what they were drawn from. A row is drawn anew
// only when its pod changed: a row replaced under the pointer between press
// and release loses the click, and snapshots come many times a minute.
const renderedRows = new Map();

function rowOf(view) {
  const drawnFrom = JSON.stringify([view, openRows.has(view.pod.id), latest.health.names.system_wide]);
  const drawn = renderedRows.get(view.pod.id);
  if (drawn && drawn.from === drawnFrom) return drawn.row;
  const row = podRow(view);
  renderedRows.set(view.pod.id, { from: drawnFrom, row });
  return row;
}

// Puts `rows` in `tbody` in order with the fewest changes: rows of pods no
// longer shown go first, a redrawn row takes its old one's place, and a row
// that stays is never taken out of the page (that would drop its focus and
// any click under way).
function placeRows(tbody, rows) {
  const wanted = new Set(rows.map((row) => row.dataset.podId));
  for (const child of [...tbody.children]) {
    if (!wanted.has(child.dataset.podId)) child.remove();
  }
  let at = tbody.firstElementChild;
  for (const row of rows) {
    if (row === at) {
      at = at.nextElementSibling;
    } else if (at && at.dataset.podId === row.dataset.podId) {
      at.replaceWith(row);
      at = row.nextElementSibling;
    } else {
      tbody.insertBefore(row, at);
    }
  }
  while (at) {
    const next = at.nextElementSibling;
    at.remove();
    at = next;
  }
}

// Shows one pod: its details open, its row in view and holding the keyboard
// (a notification about it was clicked). The filter gives way if it hid it.
function showPod(id) {
  const view = latest && latest.pods.find((candidate) => candidate.pod.id === id);
  if (view && !matches(view, $('filter').value.trim().toLowerCase())) $('filter').value = '';
  openRows.add(id);
  focusedRow = id;
  render();
  const row = document.querySelector(`#pods tbody tr[data-pod-id="${CSS.escape(id)}"]`);
  if (row) {
    row.scrollIntoView({ block: 'nearest' });
    row.focus();
  }
}

// Asks for the agent's token in the page (never a blocking prompt): resolves
// with what the person typed; `reason` is the agent's own words.
function askToken(reason) {
  const form = $('token-form');
  const input = $('token-input');
  $('token-reason').textContent = reason;
  input.value = '';
  form.hidden = false;
  input.focus();
  return new Promise((resolve) => {
    form.onsubmit = (event) => {
      event.preventDefault();
      const typed = input.value.trim();
      if (!typed) return;
      form.hidden = true;
      resolve(typed);
    };
  });
}

function start() {
  $('filter').addEventListener('input', render);
  agent.onTokenNeeded(askToken);
  agent.onFocusPod(showPod);
  // "/" jumps to the filter, as in most tools; Escape leaves it.
  document.addEventListener('keydown', (event) => {
    if (event.key === '/' && !event.target.closest('input, textarea')) {
      event.preventDefault();
      $('filter').focus();
    } else if (event.key === 'Escape' && document.activeElement === $('filter')) {
      $('filter').blur();
    } else if (event.key === 'Escape') {
      // The tray window goes away as a popover does.
      agent.hideWindow().catch((error) => showError(error.message));
    }
  });
  agent.subscribe(
    (snapshot) => { latest = snapshot; render(); },
    (connected) => { $('link').hidden = connected; },
  );
  agent.snapshot().then((snapshot) => {
    if (!latest) { latest = snapshot; render(); }
  }).catch((error) => showError(`cannot reach the agent: ${error.message}`));
}

start();
