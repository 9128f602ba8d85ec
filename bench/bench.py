#!/usr/bin/env python3
"""Benchmarks the agent's tunnels side by side with their peers on loopback.

In one run, on one machine: direct loopback, socat (fork,reuseaddr; and with
backlog=4096), haproxy (tcp mode) and our tunnel, each in front of the same
upstream (iperf3 for throughput, nginx for HTTP). Every figure is the median
of --runs runs, taken in rounds (each peer once per round, so a change in
the machine's load falls on all of them alike); ratios to the peers are
printed with it. Writes a markdown report (see BENCHMARKS.md). --quick
proves the harness (short runs, one each): it checks that every figure was
produced, never that a figure is fast.

Tunnels through the staging cluster's API server (`--staging-via api`) are
measured beside the obvious peer, one kube `Portforwarder` per connection
joined with `copy_bidirectional` (kftray's way), both on the same API server
stand-in (the test suite's Kubernetes API emulator, as a process): throughput,
new connections per second, the latency a fresh connection adds, CPU per GB.

Standard library only; the peers come from Debian (bench/run installs them),
the API stand-in and its peer from this workspace (bench/run builds them).
"""

import argparse
import datetime
import json
import os
import platform
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Every process here may open at most this many files; it bounds the idle
# connections a tunnel can hold (two sockets each, plus its listeners).
HARD_NOFILE = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
PEERS = ["direct", "socat", "socat-backlog", "haproxy", "tunnel"]
# Through the staging API: the kube Portforwarder peer, and our tunnel.
API_PEERS = ["api-peer", "api-tunnel"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listens on port {port} after {timeout}s")


class Processes:
    """Every process the benchmark starts; all are stopped at the end."""

    def __init__(self):
        self.children = []

    def start(self, argv, **kw):
        kw.setdefault("stdout", subprocess.DEVNULL)
        kw.setdefault("stderr", subprocess.DEVNULL)
        child = subprocess.Popen(argv, **kw)
        self.children.append(child)
        return child

    def stop_all(self):
        for child in reversed(self.children):
            if child.poll() is None:
                child.terminate()
                try:
                    child.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    child.kill()


class ControlPlane(BaseHTTPRequestHandler):
    """Takes the agent's status reports so it never backs off."""

    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


def cpu_seconds(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def rss_mib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def api(base, method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


class Bench:
    def __init__(self, args):
        self.args = args
        self.procs = Processes()
        self.tmp = Path(tempfile.mkdtemp(prefix="k3s-local-agent-bench-"))
        self.results = {}
        # iperf3 runs tried again, by peer (see `through_the_api`).
        self.api_retries = {}

    # -- setup -------------------------------------------------------------
    def start_upstreams(self):
        self.iperf_port = free_port()
        self.procs.start(["iperf3", "-s", "-p", str(self.iperf_port)])
        self.http_port = free_port()
        conf = self.tmp / "nginx.conf"
        conf.write_text(f"""
worker_processes 1;
worker_rlimit_nofile {HARD_NOFILE};
daemon off;
pid {self.tmp}/nginx.pid;
error_log stderr crit;
events {{ worker_connections {HARD_NOFILE - 100}; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  server {{ listen 127.0.0.1:{self.http_port} backlog=4096; location / {{ return 200 "ok\\n"; }} }}
}}
""")
        self.procs.start(["nginx", "-c", str(conf), "-p", str(self.tmp)])
        wait_port(self.iperf_port)
        wait_port(self.http_port)

    def start_peers(self, name, target):
        """socat, socat with a deep backlog, haproxy, in front of `target`."""
        ports = {"direct": target}
        ports["socat"] = free_port()
        self.procs.start(["socat", f"TCP-LISTEN:{ports['socat']},bind=127.0.0.1,fork,reuseaddr",
                          f"TCP:127.0.0.1:{target}"])
        ports["socat-backlog"] = free_port()
        self.procs.start(["socat",
                          f"TCP-LISTEN:{ports['socat-backlog']},bind=127.0.0.1,fork,reuseaddr,backlog=4096",
                          f"TCP:127.0.0.1:{target}"])
        ports["haproxy"] = free_port()
        cfg = self.tmp / f"haproxy-{name}.cfg"
        cfg.write_text(f"""
global
  maxconn {(HARD_NOFILE - 200) // 2}
defaults
  mode tcp
  timeout connect 5s
  timeout client 120s
  timeout server 120s
listen {name}
  bind 127.0.0.1:{ports['haproxy']}
  server upstream 127.0.0.1:{target}
""")
        self.procs.start(["haproxy", "-f", str(cfg)])
        for port in ports.values():
            wait_port(port)
        return ports

    def start_agent(self):
        cp = ThreadingHTTPServer(("127.0.0.1", 0), ControlPlane)
        threading.Thread(target=cp.serve_forever, daemon=True).start()
        self.agent_port = free_port()
        self.agent_base = f"http://127.0.0.1:{self.agent_port}"
        (self.tmp / "hosts").write_text("127.0.0.1 localhost\n")
        self.agent = self.procs.start([
            str(self.args.binary), "run", "--agent-port", str(self.agent_port),
            "--port-range", "23000-24999", "--no-cluster",
            "--hosts-file", str(self.tmp / "hosts"), "--state-dir", str(self.tmp / "state"),
            "--control-plane-url", f"http://127.0.0.1:{cp.server_address[1]}",
        ], env={**os.environ, "RUST_LOG": "warn"})
        wait_port(self.agent_port)
        self.agent_id = api(self.agent_base, "GET", "/health")["agent_id"]

    def push(self, action, pods):
        return api(self.agent_base, "POST", "/api/v1/pods",
                   {"agent_id": self.agent_id, "action": action, "pods": pods})

    def tunnel_to(self, pod_id, target):
        self.push("create", [{"id": pod_id, "name": pod_id, "ip": "127.0.0.1", "port": target}])
        status = api(self.agent_base, "GET", "/api/v1/pods/status")
        port = status["redirections"][pod_id]["local_port"]
        wait_port(port)
        return port

    # -- measurements ------------------------------------------------------
    def rounds(self, measure):
        """--runs rounds of `measure(peer)` for every peer in turn: peer -> samples."""
        samples = {peer: [] for peer in PEERS}
        for _ in range(self.args.runs):
            for peer in PEERS:
                samples[peer].append(measure(peer))
        return samples

    def iperf(self, port, streams):
        out = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t",
                              str(self.args.seconds), "-P", str(streams), "-J"],
                             capture_output=True, text=True, timeout=self.args.seconds + 60)
        result = json.loads(out.stdout)
        if "error" in result:
            raise RuntimeError(f"iperf3: {result['error']}")
        received = result["end"]["sum_received"]
        return received["bits_per_second"] / 1e9, received["bytes"]

    def wrk(self, port, close):
        argv = ["wrk", "-t2", "-c64", f"-d{self.args.seconds}s", "--latency"]
        if close:
            argv += ["-H", "Connection: close"]
        out = subprocess.run(argv + [f"http://127.0.0.1:{port}/"], capture_output=True,
                             text=True, timeout=self.args.seconds + 60).stdout
        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
        lat = {}
        for pct in ("50", "99"):
            m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
            value, unit = float(m.group(1)), m.group(2)
            lat[pct] = value * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
        return rps, lat["50"], lat["99"]

    def run(self):
        if self.args.only_health:
            self.start_agent()
            self.health_crowded()
            return self.results
        self.start_upstreams()
        if self.args.only_api:
            self.through_the_api()
            return self.results
        self.start_agent()
        self.health_crowded()
        tcp = self.start_peers("iperf", self.iperf_port)
        tcp["tunnel"] = self.tunnel_to("iperf", self.iperf_port)
        http = self.start_peers("http", self.http_port)
        http["tunnel"] = self.tunnel_to("http", self.http_port)
        r = self.results

        # Round by round, every peer once per round, so a change in the
        # machine's load during the run falls on all of them alike.
        for streams in (1, 8):
            rounds = self.rounds(lambda peer: self.iperf(tcp[peer], streams)[0])
            for peer in PEERS:
                r[f"tput{streams}/{peer}"] = statistics.median(rounds[peer])
        # Forwarder CPU per GB, on one stream through the tunnel.
        before = cpu_seconds(self.agent.pid)
        _, moved = self.iperf(tcp["tunnel"], 1)
        r["cpu_s_per_gb"] = (cpu_seconds(self.agent.pid) - before) / (moved / 1e9)

        keep_alive = self.rounds(lambda peer: self.wrk(http[peer], close=False))
        new_connections = self.rounds(lambda peer: self.wrk(http[peer], close=True)[0])
        for peer in PEERS:
            r[f"http/{peer}"] = statistics.median(s[0] for s in keep_alive[peer])
            r[f"p50/{peer}"] = statistics.median(s[1] for s in keep_alive[peer])
            r[f"p99/{peer}"] = statistics.median(s[2] for s in keep_alive[peer])
            r[f"conn/{peer}"] = statistics.median(new_connections[peer])

        self.through_the_api()
        self.scale()
        return r

    def through_the_api(self):
        """Our tunnel via the staging API against a kube Portforwarder per
        connection, both through the same API stand-in to the same pod."""
        r = self.results
        kubeconfig = self.tmp / "staging.kubeconfig"
        stand_in = self.procs.start(
            [str(self.args.tools / "kube-stand-in"), str(kubeconfig), "bench", "team-a/bench",
             f"5201=127.0.0.1:{self.iperf_port}", f"80=127.0.0.1:{self.http_port}"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ready = stand_in.stdout.readline()
        if not ready.startswith("ready"):
            raise RuntimeError(f"the API stand-in did not start: {ready!r}")
        ports = {"api-peer": {"tcp": free_port(), "http": free_port()}}
        peer = self.procs.start(
            [str(self.args.tools / "kube-portforward-peer"), str(kubeconfig), "bench", "team-a/bench",
             f"{ports['api-peer']['tcp']}:5201", f"{ports['api-peer']['http']}:80"],
            stdout=subprocess.PIPE, text=True)
        if peer.stdout.readline().strip() != "listening":
            raise RuntimeError("the port-forward peer did not start")
        hosts = self.tmp / "hosts"
        if not hosts.exists():
            hosts.write_text("127.0.0.1 localhost\n")
        agent_port = free_port()
        base = f"http://127.0.0.1:{agent_port}"
        agent = self.procs.start([
            str(self.args.binary), "run", "--agent-port", str(agent_port),
            "--port-range", "25000-25019", "--no-cluster", "--name-ports", "off",
            "--hosts-file", str(self.tmp / "hosts"), "--state-dir", str(self.tmp / "api-state"),
            "--staging-kube-context", "bench", "--staging-kubeconfig", str(kubeconfig),
            "--staging-via", "api",
        ], env={**os.environ, "RUST_LOG": "warn"})
        wait_port(agent_port)
        agent_id = api(base, "GET", "/health")["agent_id"]
        # The pod IP is never dialled on `api`: its port-forward is the way.
        api(base, "POST", "/api/v1/pods", {"agent_id": agent_id, "action": "create", "pods": [
            {"id": "bench", "name": "bench", "namespace": "team-a", "ip": "10.0.1.100",
             "ports": [5201, 80]}]})
        tunnel = api(base, "GET", "/api/v1/pods/status")["redirections"]["bench"]
        by_port = {p["staging_port"]: p["local_port"] for p in tunnel["ports"]}
        ports["api-tunnel"] = {"tcp": by_port[5201], "http": by_port[80]}
        for peer_ports in ports.values():
            for port in peer_ports.values():
                wait_port(port)
        pids = {"api-peer": peer.pid, "api-tunnel": agent.pid}

        def each(measure):
            samples = {name: [] for name in API_PEERS}
            for _ in range(self.args.runs):
                for name in API_PEERS:
                    samples[name].append(measure(name))
            return samples

        def throughput_and_cpu(name):
            # kube's Portforwarder now and then ends iperf3's control
            # connection early ("control socket has closed unexpectedly"):
            # such a run is tried again, at most twice, and counted.
            for attempt in range(3):
                before = cpu_seconds(pids[name])
                try:
                    gbits, moved = self.iperf(ports[name]["tcp"], 1)
                    return gbits, (cpu_seconds(pids[name]) - before) / (moved / 1e9)
                except RuntimeError as err:
                    self.api_retries[name] = self.api_retries.get(name, 0) + 1
                    if attempt == 2:
                        raise RuntimeError(f"{name}: {err}") from err
                    time.sleep(1)

        tput = each(throughput_and_cpu)
        conns = each(lambda name: self.wrk(ports[name]["http"], close=True)[0])
        direct = statistics.median(self.first_byte_ms(self.http_port) for _ in range(self.args.runs))
        extra = each(lambda name: self.first_byte_ms(ports[name]["http"]) - direct)
        for name in API_PEERS:
            r[f"api_tput/{name}"] = statistics.median(s[0] for s in tput[name])
            r[f"api_cpu/{name}"] = statistics.median(s[1] for s in tput[name])
            r[f"api_conn/{name}"] = statistics.median(conns[name])
            r[f"api_extra_ms/{name}"] = statistics.median(extra[name])
        stand_in.stdin.close()

    def first_byte_ms(self, port, count=None):
        """Median time from connect to the first byte of an HTTP answer on a
        fresh connection, in ms, over `count` connections one after another."""
        count = count or (20 if self.args.quick else 200)
        times = []
        for _ in range(count):
            start = time.monotonic()
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
                if not s.recv(1):
                    raise RuntimeError(f"no answer on port {port}")
            times.append(1000 * (time.monotonic() - start))
        return statistics.median(times)

    def scale(self):
        r = self.results
        self.push("sync", [])
        # A 1,000-pod push: time until every tunnel accepts.
        pods = [{"id": f"s{i}", "name": f"s{i}", "ip": "127.0.0.1", "port": self.http_port}
                for i in range(1000)]
        start = time.monotonic()
        self.push("create", pods)
        status = api(self.agent_base, "GET", "/api/v1/pods/status")
        ports = [t["local_port"] for t in status["redirections"].values()]
        for port in ports:
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.001)
        r["push1000_s"] = time.monotonic() - start
        # 921 tunnels (the default range's size) idle, then 10,000 idle connections.
        self.push("sync", pods[:921])
        time.sleep(0.5)
        r["rss_921_mib"] = rss_mib(self.agent.pid)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
        status = api(self.agent_base, "GET", "/api/v1/pods/status")
        ports = [t["local_port"] for t in status["redirections"].values()]
        # Each idle connection costs the agent two descriptors; hold as many
        # as its open-file limit leaves room for, up to the 10,000 asked.
        agent_fds = len(os.listdir(f"/proc/{self.agent.pid}/fd"))
        count = min(self.args.idle_connections, (HARD_NOFILE - agent_fds - 300) // 2)
        idle = []
        for i in range(count):
            idle.append(socket.create_connection(("127.0.0.1", ports[i % len(ports)])))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            status = api(self.agent_base, "GET", "/api/v1/pods/status")
            if sum(t["open_connections"] for t in status["redirections"].values()) >= len(idle):
                break
            time.sleep(0.1)
        r["rss_10k_mib"] = rss_mib(self.agent.pid)
        r["idle_connections"] = len(idle)
        for s in idle:
            s.close()
        # Idle agent CPU, with the 921 tunnels and nothing moving.
        time.sleep(1)
        before, t0 = cpu_seconds(self.agent.pid), time.monotonic()
        time.sleep(self.args.idle_seconds)
        r["idle_cpu_pct"] = 100 * (cpu_seconds(self.agent.pid) - before) / (time.monotonic() - t0)
        self.big_push()

    def big_push(self):
        """A 5,000-pod push onto 5,000 held (10,000 after it): how long the
        push takes to answer, and the slowest /health answer meanwhile."""
        r = self.results
        self.push("sync", [])

        def lean(prefix, count):
            return [{"id": f"{prefix}{i}", "name": f"{prefix}{i}", "ip": "127.0.0.1",
                     "port": self.http_port} for i in range(count)]

        self.push("create", lean("held", 5000))
        slowest = [0.0]
        pushing = threading.Event()
        pushing.set()

        def watch_health():
            while pushing.is_set():
                start = time.monotonic()
                api(self.agent_base, "GET", "/health")
                slowest[0] = max(slowest[0], time.monotonic() - start)

        watcher = threading.Thread(target=watch_health, daemon=True)
        watcher.start()
        start = time.monotonic()
        self.push("create", lean("more", 5000))
        r["push5000_at_10k_s"] = time.monotonic() - start
        pushing.clear()
        watcher.join()
        r["health_during_push_ms"] = 1000 * slowest[0]
        self.push("sync", [])

    def health_crowded(self):
        """`/health` on a new connection while 400 new API connections each
        send a request that asks who the caller is, with 4,000 listening
        sockets on the machine (the kernel's socket table as thousands of
        tunnels leave it): median and slowest over the rounds."""
        r = self.results
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
        listeners = []
        for _ in range(4000):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            s.listen(1)
            listeners.append(s)
        samples = []
        for _ in range(3 if self.args.quick else 10):
            crowd = [socket.create_connection(("127.0.0.1", self.agent_port)) for _ in range(400)]
            for s in crowd:
                s.sendall(b"GET /api/v1/pods HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            start = time.monotonic()
            api(self.agent_base, "GET", "/health")
            samples.append(time.monotonic() - start)
            for s in crowd:
                s.settimeout(60)
                s.recv(12)
                s.close()
        for s in listeners:
            s.close()
        r["health_crowded_ms"] = 1000 * statistics.median(samples)
        r["health_crowded_max_ms"] = 1000 * max(samples)

    def close(self):
        self.procs.stop_all()
        shutil.rmtree(self.tmp, ignore_errors=True)


def ratio(a, b):
    return a / b if b else float("nan")


def report(r, args):
    lines = []
    add = lines.append
    add(f"Date: {datetime.date.today().isoformat()}; machine: {os.cpu_count()} cores, "
        f"{platform.system()} {platform.release()}, open-file limit {HARD_NOFILE}; "
        f"binary: {args.binary_kind}; {args.runs} run(s) of {args.seconds} s each, medians.")
    add("")
    add("| measure | direct | socat | socat backlog=4096 | haproxy | tunnel | tunnel vs direct | tunnel vs socat | tunnel vs haproxy |")
    add("|---|---|---|---|---|---|---|---|---|")

    def row(label, key, fmt, higher_is_better=True):
        vals = [r[f"{key}/{p}"] for p in PEERS]
        t = r[f"{key}/tunnel"]
        rel = (lambda other: ratio(t, other)) if higher_is_better else (lambda other: ratio(other, t))
        add(f"| {label} | " + " | ".join(fmt.format(v) for v in vals)
            + f" | {rel(r[f'{key}/direct']):.2f}x | {rel(r[f'{key}/socat']):.2f}x | {rel(r[f'{key}/haproxy']):.2f}x |")

    row("throughput, 1 stream (Gbit/s)", "tput1", "{:.2f}")
    row("throughput, 8 streams (Gbit/s)", "tput8", "{:.2f}")
    row("HTTP keep-alive, 64 conns (req/s)", "http", "{:.0f}")
    row("HTTP keep-alive p50 (ms; ratio: lower is better)", "p50", "{:.3f}", higher_is_better=False)
    row("HTTP keep-alive p99 (ms; ratio: lower is better)", "p99", "{:.3f}", higher_is_better=False)
    row("new connections (conn/s)", "conn", "{:.0f}")
    add("")
    add("| measure | tunnel | target |")
    add("|---|---|---|")
    add(f"| forwarder CPU per GB moved | {r['cpu_s_per_gb']:.3f} s | <= 0.35 s |")
    add(f"| RSS, 921 tunnels | {r['rss_921_mib']:.1f} MiB | |")
    add(f"| RSS, 921 tunnels + {r['idle_connections']} idle connections | {r['rss_10k_mib']:.1f} MiB | <= 64 MiB |")
    add(f"| 1,000-pod push until every tunnel accepts | {r['push1000_s']:.3f} s | <= 0.5 s |")
    add(f"| idle agent CPU ({args.idle_seconds} s, 921 tunnels) | {r['idle_cpu_pct']:.2f} % of a core | < 0.5 % |")
    add(f"| 5,000-pod push onto 5,000 held (10,000 after) | {r['push5000_at_10k_s']:.3f} s | well under 1 s |")
    add(f"| slowest `/health` during that push | {r['health_during_push_ms']:.1f} ms | milliseconds |")
    add(report_health(r))
    add("")
    lines.append(report_api(r))
    return "\n".join(lines)


def report_health(r):
    """The row of `/health` among 4,000 listeners and 400 new API connections."""
    return (f"| `/health` on a new connection, 4,000 listeners, 400 API connections asking at once "
            f"(median; slowest) | {r['health_crowded_ms']:.1f} ms; {r['health_crowded_max_ms']:.1f} ms "
            f"| milliseconds |")


def report_api(r):
    """The table of tunnels through the staging API beside their peer."""
    lines = []
    add = lines.append
    add("Through the staging API (the same API server stand-in and pod for both):")
    add("")
    add("| measure | kube Portforwarder per connection (kftray's way) | tunnel via staging API | tunnel vs peer |")
    add("|---|---|---|---|")

    def api_row(label, key, fmt, higher_is_better=True):
        peer, ours = r[f"{key}/api-peer"], r[f"{key}/api-tunnel"]
        rel = ratio(ours, peer) if higher_is_better else ratio(peer, ours)
        add(f"| {label} | {fmt.format(peer)} | {fmt.format(ours)} | {rel:.2f}x |")

    api_row("throughput, 1 stream (Gbit/s)", "api_tput", "{:.2f}")
    api_row("new connections (conn/s)", "api_conn", "{:.0f}")
    api_row("latency a fresh connection adds (ms; ratio: lower is better)", "api_extra_ms", "{:.3f}",
            higher_is_better=False)
    api_row("forwarder CPU per GB moved (s; ratio: lower is better)", "api_cpu", "{:.3f}",
            higher_is_better=False)
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="prove the harness: short runs, one each")
    parser.add_argument("--binary", type=Path, help="agent binary [default: target/release/k3s-local-agent]")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--idle-seconds", type=int, default=60)
    parser.add_argument("--idle-connections", type=int, default=10000,
                        help="idle connections to hold [default: 10,000, or what the open-file limit allows]")
    parser.add_argument("--out", type=Path, help="also write the report here")
    parser.add_argument("--only-api", action="store_true",
                        help="only the tunnels through the staging API and their peer")
    parser.add_argument("--only-health", action="store_true",
                        help="only /health among 4,000 listeners and 400 API connections")
    parser.add_argument("--tools", type=Path,
                        help="where kube-stand-in and kube-portforward-peer are [default: beside the binary]")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.seconds, args.idle_seconds = 1, 1, 3
    if args.binary is None:
        args.binary = ROOT / "target" / ("debug" if args.quick else "release") / "k3s-local-agent"
    if args.tools is None:
        args.tools = args.binary.parent
    args.binary_kind = "debug build (figures not meaningful)" if "debug" in str(args.binary) else "release build"
    bench = Bench(args)
    try:
        results = bench.run()
    finally:
        bench.close()
    missing = [k for k, v in results.items() if v is None or v != v]
    if args.only_api:
        text = report_api(results)
    elif args.only_health:
        text = "| measure | tunnel | target |\n|---|---|---|\n" + report_health(results)
    else:
        text = report(results, args)
    if bench.api_retries:
        text += "\n\niperf3 runs tried again (the connection ended early): " + ", ".join(
            f"{name} {count}" for name, count in sorted(bench.api_retries.items()))
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    if args.only_health:
        expected = 2
    else:
        expected = 4 * len(API_PEERS) + (0 if args.only_api else 6 * len(PEERS) + 8 + 2)
    if missing or len(results) < expected:
        print(f"error: figures missing: {missing or 'some'} ({len(results)} of {expected})", file=sys.stderr)
        return 1
    print(f"\nbench: {len(results)} figures produced")
    return 0


if __name__ == "__main__":
    sys.exit(main())
