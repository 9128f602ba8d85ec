#!/usr/bin/env python3
"""Profiles the HTTP paths where the tunnel trails haproxy: CPU per request
for both, syscalls per request (strace -c) and where the tunnel's CPU goes
(perf record, by kernel vs user space and by symbol).

    bench/profile                 keep-alive and new-connection runs
    bench/profile --seconds 10    longer wrk runs

Uses the same upstreams and peers as bench/bench.py, in the same way.
"""

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (bench/bench.py, beside this file)


def pid_listening_on(port):
    out = subprocess.run(["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True).stdout
    return int(re.search(r"pid=(\d+)", out).group(1))


def cpu_per_request(b, ports, close, rounds):
    """wrk against haproxy and the tunnel in turn; CPU microseconds per request."""
    for _ in range(rounds):
        for peer in ("haproxy", "tunnel"):
            pid = pid_listening_on(ports[peer])
            before = bench.cpu_seconds(pid)
            rps, _, p99 = b.wrk(ports[peer], close=close)
            used = bench.cpu_seconds(pid) - before
            print(f"  {peer:8} {rps:9.0f} req/s  p99 {p99:6.2f} ms  "
                  f"{used / b.args.seconds:4.2f} cores  {used / (rps * b.args.seconds) * 1e6:6.2f} us CPU/request",
                  flush=True)


def syscalls_per_request(b, port, close, out_dir, label):
    trace = out_dir / f"strace-{label}.txt"
    tracer = subprocess.Popen(["strace", "-c", "-f", "-p", str(b.agent.pid), "-o", str(trace)],
                              stderr=subprocess.DEVNULL)
    time.sleep(0.5)  # strace attaches to every thread before the load starts
    rps, _, _ = b.wrk(port, close=close)
    tracer.terminate()
    tracer.wait()
    requests = rps * b.args.seconds
    print(f"  syscalls per request under strace ({trace}):")
    for line in trace.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[3].isdigit() and fields[-1] not in ("total", "restart_syscall"):
            calls = int(fields[3])
            if calls / requests >= 0.05:
                print(f"    {fields[-1]:12} {calls / requests:5.2f}")


def perf_profile(b, port, close, out_dir, label):
    data = out_dir / f"perf-{label}.data"
    recorder = subprocess.Popen(["perf", "record", "-q", "-e", "cpu-clock", "-F", "2000", "-g",
                                 "-p", str(b.agent.pid), "-o", str(data), "--", "sleep", str(b.args.seconds)],
                                stderr=subprocess.DEVNULL)
    b.wrk(port, close=close)
    recorder.wait()
    print(f"  where the tunnel's CPU goes (perf report -i {data}):")
    for sort in ("dso", "sym"):
        out = subprocess.run(["perf", "report", "-i", str(data), "--no-children", "--sort", sort,
                              "-g", "none", "--stdio"], capture_output=True, text=True).stdout
        rows = [row for row in out.splitlines() if row.strip() and not row.startswith("#")]
        for row in rows[: 4 if sort == "dso" else 12]:
            print("    " + row.strip())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--binary", type=Path, default=bench.ROOT / "target" / "release" / "k3s-local-agent")
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out-dir", type=Path, default=bench.ROOT / "target" / "profile")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    run = argparse.Namespace(quick=False, binary=args.binary, runs=1, seconds=args.seconds,
                             idle_seconds=1, idle_connections=0, out=None)
    b = bench.Bench(run)
    try:
        b.start_upstreams()
        b.start_agent()
        ports = b.start_peers("http", b.http_port)
        ports["tunnel"] = b.tunnel_to("http", b.http_port)
        for label, close in (("keep-alive", False), ("new-connections", True)):
            print(f"{label} (wrk -t2 -c64{', Connection: close' if close else ''}):", flush=True)
            cpu_per_request(b, ports, close, args.rounds)
            syscalls_per_request(b, ports["tunnel"], close, args.out_dir, label)
            perf_profile(b, ports["tunnel"], close, args.out_dir, label)
    finally:
        b.close()


if __name__ == "__main__":
    main()
