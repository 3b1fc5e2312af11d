"""The agent's costs, measured side by side in one run:

* instructions per HTTP request of the demo service with and without an
  idle agent, counted by valgrind's callgrind in the service (every thread:
  the handler's, the accept loop's, the agent's), in batches of requests
  sent over one keep-alive connection by a client process of its own; a
  second service without the agent is the A/A control. The three run at
  once (instruction counts do not depend on the machine's load). Skipped
  with --quick (valgrind needs minutes);
* paired runs: the three services (without, without again, with an idle
  agent) loaded at the same time, each by a client process of its own,
  for the same window, many rounds; per round the ratio of requests served
  and of the service's CPU time per request, against the same ratio of
  the two services without an agent (A/A); median with a bootstrap 95%
  confidence interval. The same for a CPU-bound program (three at once);
* end to end: `livepatch apply` and `livepatch rollback` on a live service:
  the agent's side of the apply and the commit pause inside it (the
  command's own start-up is measured in the installed package by
  startup.py)."""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

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
print("ready", flush=True)
start, end = (float(x) for x in sys.stdin.readline().split())  # one window for all (CLOCK_MONOTONIC)
while time.monotonic() < start:
    pass
n, cpu = 0, time.process_time()
while time.monotonic() < end:
    fib(18); n += 1
print(n, time.process_time() - cpu, flush=True)
"""

# one client per service: requests one after the other, a connection each
# (as browsers and urllib do; over one kept-alive connection the demo's
# two small writes per answer meet the client's delayed ACK: 40 ms each),
# within the window it is given (CLOCK_MONOTONIC, one clock for all)
ONE_REQUEST = """
def one(port):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("GET", "/quote?sku=widget&qty=2")
    conn.getresponse().read()
    conn.close()
"""
LOAD = r"""
import http.client, sys, time
""" + ONE_REQUEST + r"""
port = int(sys.argv[1])
one(port)
print("ready", flush=True)
start, end = (float(x) for x in sys.stdin.readline().split())
while time.monotonic() < start:
    time.sleep(0.001)
n = 0
while time.monotonic() < end:
    one(port)
    n += 1
print(n, flush=True)
"""

# a fixed number of requests (callgrind: the count, not the time, matters)
REQUESTS = r"""
import http.client, sys
""" + ONE_REQUEST + r"""
for _ in range(int(sys.argv[2])):
    one(int(sys.argv[1]))
"""

VARIANTS = ("none", "none_again", "agent")

# On a shared machine other people's `livepatch ps` asks every agent it can
# find (and a status loads the agent's request handling): that is not what
# an idle agent costs. Each measured process runs in a mount namespace of
# its own with a private tmpfs as its runtime directory, where its agent
# puts its socket: from outside, that directory is empty. The same for the
# processes without an agent, so that the variants differ in the agent alone.
_ISOLATE = ("unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount -t tmpfs -o mode=0700 livepatch-bench "$0" && exec "$@"')


def _isolation() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = tempfile.mkdtemp(prefix="lpisolate-")
    try:
        return subprocess.run([*_ISOLATE, probe, "true"], capture_output=True, timeout=60).returncode == 0
    finally:
        os.rmdir(probe)


ISOLATED = None  # set in main


def _isolated(argv: list, env: dict, work: str, tag: str) -> list:
    """`argv` in a mount namespace whose runtime directory (XDG_RUNTIME_DIR,
    set in `env`) is a private tmpfs; as it is when isolation is not possible."""
    if not ISOLATED:
        return argv
    run = tempfile.mkdtemp(prefix=f"run-{tag}-", dir=work)
    env["XDG_RUNTIME_DIR"] = run
    return [*_ISOLATE, run, *argv]


def _env(variant: str, work: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIVEPATCH_")}
    env["PYTHONHASHSEED"] = "0"  # the same dict and set layouts in every run
    if variant == "agent":  # what `livepatch run` sets for the program it starts
        env.update(LIVEPATCH_AUTOSTART="1", LIVEPATCH_NAME="idle-bench", LIVEPATCH_ALLOW_UNSIGNED="1",
                   LIVEPATCH_STATE_DIR=os.path.join(work, "state"))
    return env


def _bootstrap_median(values, resamples: int = 2000, seed: int = 0) -> list:
    """95% confidence interval of the median, by resampling the rounds."""
    rng = random.Random(seed)
    meds = sorted(_median([rng.choice(values) for _ in values]) for _ in range(resamples))
    return [round(meds[int(0.025 * resamples)], 4), round(meds[int(0.975 * resamples) - 1], 4)]


def _median(values):
    values = sorted(values)
    n = len(values)
    return values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2


def _ratios(rows: list, key: str) -> dict:
    """rows: per round {variant: value}. Ratio agent/none and none_again/none."""
    out = {}
    for name, (top, bottom) in (("agent_over_none", ("agent", "none")), ("aa_control", ("none_again", "none"))):
        values = [r[top] / r[bottom] for r in rows if r[bottom]]
        out[name] = {"median": round(_median(values), 4), "ci95": _bootstrap_median(values), "rounds": len(values)}
    return out


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _start_service(variant: str, work: str, tag: str, prefix=()):
    port_file = os.path.join(work, f"port-{tag}-{variant}")
    env = _env(variant, work)
    argv = _isolated([*prefix, sys.executable, "-m", "inventory.server", "--port", "0", "--port-file", port_file], env,
                     work, f"{tag}-{variant}")
    proc = subprocess.Popen(argv, cwd=DEMO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, port_file


def _wait_port(proc, port_file: str, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while not os.path.exists(port_file):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the demo service ({port_file}) did not start")
        time.sleep(0.05)
    with open(port_file) as fh:
        return int(fh.read())


def _stop(proc) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _window(procs, seconds: float) -> None:
    """Once every process said it is ready, give all one window to work in."""
    for p in procs:
        if p.stdout.readline().strip() != "ready":
            raise SystemExit("a measured process did not start")
    start = time.monotonic() + 0.05
    for p in procs:
        p.stdin.write(f"{start} {start + seconds}\n")
        p.stdin.flush()


def http_paired(seconds: float, rounds: int, work: str) -> dict:
    procs = {v: _start_service(v, work, "paired") for v in VARIANTS}
    try:
        ports = {v: _wait_port(p, f, 60) for v, (p, f) in procs.items()}
        rows_rps, rows_cpu = [], []
        for r in range(rounds + 1):  # the first round warms up
            clients = {v: subprocess.Popen([sys.executable, "-c", LOAD, str(ports[v])], stdin=subprocess.PIPE,
                                           stdout=subprocess.PIPE, text=True) for v in VARIANTS}
            _window(clients.values(), seconds)
            cpu0 = {v: _cpu_seconds(procs[v][0].pid) for v in VARIANTS}
            counts = {v: int(c.communicate(timeout=seconds + 60)[0]) for v, c in clients.items()}
            cpu = {v: _cpu_seconds(procs[v][0].pid) - cpu0[v] for v in VARIANTS}
            if r and all(counts.values()):
                rows_rps.append({v: counts[v] / seconds for v in VARIANTS})
                rows_cpu.append({v: cpu[v] / counts[v] * 1e6 for v in VARIANTS})
            elif r:
                print(f"round {r}: a service answered nothing in the window ({counts}); round left out")
        if not rows_rps:
            raise SystemExit("no round in which every service answered")
    finally:
        for p, _ in procs.values():
            _stop(p)
    return {"requests_per_s": {v: round(_median([x[v] for x in rows_rps]), 1) for v in VARIANTS},
            "service_cpu_us_per_request": {v: round(_median([x[v] for x in rows_cpu]), 1) for v in VARIANTS},
            "throughput_ratio": _ratios(rows_rps, "rps"), "cpu_per_request_ratio": _ratios(rows_cpu, "cpu"),
            "seconds_per_round": seconds}


def cpu_paired(seconds: float, rounds: int, work: str) -> dict:
    rows, cpu_rows = [], []
    for r in range(rounds):
        procs = {}
        for v in VARIANTS:
            env = _env("none", work)
            argv = _isolated([sys.executable, "-c", CPU_WORKLOAD, "agent" if v == "agent" else "none"], env, work,
                             f"cpu-{r}-{v}")
            procs[v] = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL, text=True)
        _window(procs.values(), seconds)
        done = {v: p.communicate(timeout=seconds + 60)[0].split() for v, p in procs.items()}
        rows.append({v: int(n) / seconds for v, (n, _) in done.items()})
        cpu_rows.append({v: float(cpu) / int(n) * 1e6 for v, (n, cpu) in done.items()})
    return {"iterations_per_s": {v: round(_median([x[v] for x in rows]), 1) for v in VARIANTS},
            "cpu_us_per_iteration": {v: round(_median([x[v] for x in cpu_rows]), 1) for v in VARIANTS},
            "ratio": _ratios(rows, "it"), "cpu_per_iteration_ratio": _ratios(cpu_rows, "cpu"),
            "seconds_per_round": seconds, "ratio_agent_over_none": _ratios(rows, "it")["agent_over_none"]["median"]}


def _callgrind_total(path: str) -> int:
    with open(path) as fh:
        for line in fh:
            if line.startswith("summary:") or line.startswith("totals:"):
                return int(line.split()[1])
    raise SystemExit(f"no instruction total in {path}")


def http_instructions(batches: int, per_batch: int, work: str) -> dict:
    """Instructions per request (callgrind's Ir, every thread) of the three
    services, batch by batch: zero the counters, send the batch, dump."""
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        return {"skipped": "valgrind is not installed"}
    out_dir = os.path.join(work, "callgrind")
    os.makedirs(out_dir)
    procs = {}
    for v in VARIANTS:
        prefix = ("valgrind", "--tool=callgrind", "--quiet", f"--callgrind-out-file={out_dir}/{v}.out")
        procs[v] = _start_service(v, work, "callgrind", prefix)
    try:
        ports = {v: _wait_port(p, f, 900) for v, (p, f) in procs.items()}

        def send(n):
            clients = [subprocess.Popen([sys.executable, "-c", REQUESTS, str(ports[v]), str(n)]) for v in VARIANTS]
            for c in clients:
                if c.wait(timeout=1800) != 0:
                    raise SystemExit("the callgrind client failed")

        def control(*args):
            for v in VARIANTS:
                subprocess.run(["callgrind_control", *args, str(procs[v][0].pid)], check=True, capture_output=True,
                               timeout=300)

        send(20)  # warm-up: first-request imports, specialised bytecode
        per_request = {v: [] for v in VARIANTS}
        for b in range(batches):
            control("--zero")
            send(per_batch)
            control(f"--dump=batch{b}")
            for v in VARIANTS:
                dumps = sorted(glob.glob(f"{out_dir}/{v}.out.*"), key=lambda p: int(p.rsplit(".", 1)[1]))
                per_request[v].append(_callgrind_total(dumps[-1]) / per_batch)
    finally:
        for p, _ in procs.values():
            _stop(p)
    median = {v: _median(x) for v, x in per_request.items()}

    def difference(top, bottom):
        # batch by batch (the three ran side by side); the median, since a
        # batch in which some other process's `livepatch ps` asked the agent
        # counts that answer too
        diffs = [a - b for a, b in zip(per_request[top], per_request[bottom])]
        m, base = _median(diffs), _median(per_request[bottom])
        low, high = _bootstrap_median(diffs)
        return {"instructions_median": round(m), "ci95": [round(low), round(high)], "per_batch": [round(d) for d in diffs],
                "percent": round(100 * m / base, 4),
                "percent_ci95": [round(100 * low / base, 4), round(100 * high / base, 4)]}
    return {"batches": batches, "requests_per_batch": per_batch,
            "instructions_per_request_median": {v: round(m) for v, m in median.items()},
            "per_batch": {v: [round(x) for x in xs] for v, xs in per_request.items()},
            "agent_minus_none": difference("agent", "none"), "aa_control": difference("none_again", "none")}


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
    _wait_port(proc, port_file, 60)
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
        _stop(proc)
    return {"cycles": cycles, "cli": "python -m livepatch of the running environment", **{k: summary(v) for k, v in rows.items()}}



def _paired_line(label: str, r: dict) -> str:
    """One paired ratio with its confidence interval, beside its A/A control."""
    a, aa = r["agent_over_none"], r["aa_control"]
    return (f"{label}: agent/none {a['median']} (95% CI {a['ci95'][0]} to {a['ci95'][1]}); "
            f"A/A control {aa['median']} (95% CI {aa['ci95'][0]} to {aa['ci95'][1]})")

def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, help="paired rounds (default 30)")
    ap.add_argument("--batches", type=int, help="callgrind batches (default 9)")
    args = ap.parse_args()
    global ISOLATED
    ISOLATED = _isolation()
    print("measured processes isolated from other agents' clients:", ISOLATED)
    work = tempfile.mkdtemp(prefix="lpagent-")
    seconds, rounds, cycles = (0.5, 2, 3) if args.quick else (2.0, args.rounds or 30, 20)
    batches, per_batch = args.batches or 9, 25
    try:
        if args.quick:
            instructions = {"skipped": "--quick"}
        else:
            instructions = http_instructions(batches, per_batch, work)
            if "skipped" not in instructions:
                d, aa = instructions["agent_minus_none"], instructions["aa_control"]
                med = instructions["instructions_per_request_median"]
                print(f"HTTP demo under callgrind: {med['none']:,} instructions per request without an agent, "
                      f"{med['agent']:,} with an idle one: {d['instructions_median']:+,} ({d['percent']:+.3f}%, 95% CI "
                      f"{d['percent_ci95'][0]:+.3f}% to {d['percent_ci95'][1]:+.3f}%); A/A control "
                      f"{aa['instructions_median']:+,} ({aa['percent']:+.3f}%, 95% CI {aa['percent_ci95'][0]:+.3f}% to "
                      f"{aa['percent_ci95'][1]:+.3f}%)")
        http = http_paired(seconds, rounds, work)
        for what in ("throughput_ratio", "cpu_per_request_ratio"):
            print(_paired_line(f"HTTP demo, paired ({rounds} rounds of {seconds:g} s), {what}", http[what]))
        cpu = cpu_paired(seconds, rounds, work)
        for what in ("ratio", "cpu_per_iteration_ratio"):
            print(_paired_line(f"CPU-bound, paired, {what}", cpu[what]))
        e2e = end_to_end(cycles, work)
        print(f"livepatch apply on a live service: agent side p50 {e2e['apply_in_agent_ms']['p50']:.1f} ms, commit pause "
              f"p50 {e2e['apply_pause_us']['p50']:.0f} us (whole command from the editable install p50 "
              f"{e2e['apply_wall_ms']['p50']:.0f} ms; startup.py measures the installed one)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    path = write_result("agent", {"machine": machine(), "params": {"seconds": seconds, "rounds": rounds, "cycles": cycles,
                                                                   "batches": batches, "requests_per_batch": per_batch,
                                                                   "isolated_mount_namespaces": ISOLATED},
                                  "idle_http_instructions": instructions, "idle_http": http, "idle_cpu": cpu,
                                  "end_to_end": e2e, "load_average_1min_at_end": round(os.getloadavg()[0], 2)},
                        args.quick)
    print("results:", path)


if __name__ == "__main__":
    sys.exit(main())
