"""The agent's costs, measured side by side in one run:

* idle overhead: throughput of a CPU-bound workload, and of the HTTP demo
  under client load, with and without an idle agent (runs alternate
  A/B/A/B so drift on a shared machine hits both sides alike);
* end to end: wall time of `livepatch apply` and `livepatch rollback` on a
  live service (CLI start-up, connect, verify, check, commit) and the commit
  pause inside it."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, summary, write_result  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "demo_apps", "http_api")
PATCHES = os.path.join(DEMO, "patches")

CPU_WORKLOAD = r"""
import sys, time
if sys.argv[1] == "agent":
    import livepatch.agent; livepatch.agent.start()
def fib(n):
    return n if n < 2 else fib(n - 1) + fib(n - 2)
end = time.perf_counter() + float(sys.argv[2]); n = 0
while time.perf_counter() < end:
    fib(18); n += 1
print(n)
"""


def _order(round_number: int) -> tuple:
    # alternate which goes first: the second run of a pair inherits the
    # first one's leftovers (TIME_WAIT sockets, page cache, CPU frequency)
    return ("none", "agent") if round_number % 2 == 0 else ("agent", "none")


def cpu_overhead(seconds: float, rounds: int) -> dict:
    runs = {"none": [], "agent": []}
    for r in range(rounds):
        for mode in _order(r):
            out = subprocess.run([sys.executable, "-c", CPU_WORKLOAD, mode, str(seconds)], capture_output=True, text=True, timeout=120)
            runs[mode].append(int(out.stdout) / seconds)
    med = {k: sorted(v)[len(v) // 2] for k, v in runs.items()}
    return {"iterations_per_s": {k: summary(v) for k, v in runs.items()},
            "ratio_agent_over_none": round(med["agent"] / med["none"], 4)}


def _service(port_file, with_agent):
    launcher = [sys.executable, "-m", "livepatch", "run", "--allow-unsigned", "--"] if with_agent else []
    proc = subprocess.Popen([*launcher, sys.executable, "-m", "inventory.server", "--port", "0", "--port-file", port_file],
                            cwd=DEMO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not os.path.exists(port_file):
        time.sleep(0.01)
    time.sleep(0.05)
    return proc, int(open(port_file).read())


def _throughput(port, threads, seconds):
    count = [0]
    stop = time.perf_counter() + seconds

    def run():
        n = 0
        while time.perf_counter() < stop:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/quote?sku=widget&qty=2", timeout=5) as r:
                r.read()
            n += 1
        count[0] += n
    ts = [threading.Thread(target=run) for _ in range(threads)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    return count[0] / seconds


def http_overhead(seconds: float, rounds: int, work: str) -> dict:
    runs = {"none": [], "agent": []}
    for r in range(rounds):
        for mode in _order(r):
            proc, port = _service(os.path.join(work, f"port-{mode}-{r}"), mode == "agent")
            try:
                runs[mode].append(_throughput(port, 4, seconds))
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(10)
    med = {k: sorted(v)[len(v) // 2] for k, v in runs.items()}
    return {"requests_per_s": {k: summary(v) for k, v in runs.items()},
            "ratio_agent_over_none": round(med["agent"] / med["none"], 4)}


def end_to_end(cycles: int, work: str) -> dict:
    bundle = os.path.join(work, "fix.lpb")
    key = os.path.join(work, "ops")
    subprocess.run([sys.executable, "-m", "livepatch", "keygen", key], check=True, capture_output=True)
    trust = os.path.join(work, "trust")
    os.mkdir(trust)
    os.replace(key + ".pub", os.path.join(trust, "ops.pub"))
    subprocess.run([sys.executable, "-m", "livepatch", "build", os.path.join(PATCHES, "baseline"),
                    os.path.join(PATCHES, "fix-path-traversal"), "-o", bundle, "--id", "HP-E2E", "--key", key + ".key"],
                   check=True, capture_output=True)
    port_file = os.path.join(work, "port-e2e")
    proc = subprocess.Popen([sys.executable, "-m", "livepatch", "run", "--trust", trust, "--", sys.executable, "-m",
                             "inventory.server", "--port", "0", "--port-file", port_file], cwd=DEMO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not os.path.exists(port_file):
        time.sleep(0.01)
    time.sleep(0.3)
    rows = {"apply_wall_ms": [], "apply_pause_us": [], "apply_in_agent_ms": [], "rollback_wall_ms": [], "rollback_pause_us": []}
    try:
        for _ in range(cycles):
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-m", "livepatch", "apply", str(proc.pid), bundle, "--json"],
                                 capture_output=True, text=True, check=True)
            rows["apply_wall_ms"].append((time.perf_counter() - t0) * 1000)
            result = json.loads(out.stdout)
            rows["apply_pause_us"].append(result["pause_ns"] / 1000)
            rows["apply_in_agent_ms"].append(result["engine_ns"] / 1e6)
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-m", "livepatch", "rollback", str(proc.pid), "--json"],
                                 capture_output=True, text=True, check=True)
            rows["rollback_wall_ms"].append((time.perf_counter() - t0) * 1000)
            rows["rollback_pause_us"].append(json.loads(out.stdout)[0]["pause_ns"] / 1000)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import livepatch.cli"], check=True)
    startup_ms = (time.perf_counter() - t0) * 1000
    return {"cycles": cycles, **{k: summary(v) for k, v in rows.items()}, "cli_interpreter_startup_ms": round(startup_ms, 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="lpagent-")
    seconds, rounds, cycles = (0.5, 2, 3) if args.quick else (3.0, 5, 20)
    cpu = cpu_overhead(seconds, rounds)
    print(f"CPU-bound: {cpu['iterations_per_s']['none']['p50']:.1f} it/s without agent, "
          f"{cpu['iterations_per_s']['agent']['p50']:.1f} with an idle agent (ratio {cpu['ratio_agent_over_none']})")
    http = http_overhead(seconds, rounds, work)
    print(f"HTTP demo: {http['requests_per_s']['none']['p50']:.0f} req/s without agent, "
          f"{http['requests_per_s']['agent']['p50']:.0f} with an idle agent (ratio {http['ratio_agent_over_none']})")
    e2e = end_to_end(cycles, work)
    print(f"livepatch apply end to end: p50 {e2e['apply_wall_ms']['p50']:.0f} ms wall (of which agent side "
          f"{e2e['apply_in_agent_ms']['p50']:.1f} ms, commit pause {e2e['apply_pause_us']['p50']:.0f} us); "
          f"rollback p50 {e2e['rollback_wall_ms']['p50']:.0f} ms; CLI interpreter start-up {e2e['cli_interpreter_startup_ms']} ms")
    path = write_result("agent", {"machine": machine(), "params": {"seconds": seconds, "rounds": rounds, "cycles": cycles},
                                  "idle_cpu": cpu, "idle_http": http, "end_to_end": e2e}, args.quick)
    print("results:", path)


if __name__ == "__main__":
    sys.exit(main())
