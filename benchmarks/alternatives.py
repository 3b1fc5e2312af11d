"""livepatch against the alternatives, side by side in one run:

(a) restarting the HTTP demo service versus hotpatching it, under the same
    client load: time until it serves again, requests failed or delayed;
(b) `importlib.reload` of a patched module: time, and how many existing
    references still run the old code afterwards;
(c) jurigged (a reload-based live-update tool from PyPI), when installed:
    time to update N functions, and torn observations under threads.

Writes benchmarks/results/alternatives-pyX.Y[-quick].json and a PNG of the
restart-versus-hotpatch latency timeline."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, machine, make_module, summary, write_result  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "demo_apps", "http_api")
PATCHES = os.path.join(DEMO, "patches")


# ---------------------------------------------------------------- (a) restart

def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _start(port: int, launcher=()):
    proc = subprocess.Popen([*launcher, sys.executable, "-m", "inventory.server", "--port", str(port)], cwd=DEMO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc


def _serves(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
            return r.status == 200
    except (OSError, urllib.error.URLError):
        return False


def _wait_serving(port: int, proc, limit=20.0) -> float:
    t0 = time.perf_counter()
    while not _serves(port):
        if proc.poll() is not None or time.perf_counter() - t0 > limit:
            raise RuntimeError("service did not come up")
        time.sleep(0.002)
    return time.perf_counter() - t0


class Load:
    def __init__(self, port, threads):
        self.port, self.samples, self.stop = port, [], threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self):
        while not self.stop.is_set():
            t0 = time.perf_counter()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/quote?sku=widget&qty=2", timeout=5) as r:
                    ok = r.status == 200
            except (OSError, urllib.error.URLError):
                ok = False
            self.samples.append((t0, time.perf_counter() - t0, ok))
            if not ok:
                time.sleep(0.005)  # a real client backs off briefly after an error

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join()


def _cli(*args):
    r = subprocess.run([sys.executable, "-m", "livepatch", *args, "--json"], capture_output=True, text=True, timeout=120)
    if r.returncode:
        raise RuntimeError(r.stderr)
    return json.loads(r.stdout)


def _window_stats(samples, start, end, baseline_p99):
    inside = [s for s in samples if s[0] + s[1] >= start and s[0] <= end]
    return {"requests": len(inside), "failed": sum(1 for s in inside if not s[2]),
            "delayed": sum(1 for s in inside if s[2] and s[1] > baseline_p99 * 2),
            "max_latency_ms": round(max((s[1] for s in inside), default=0) * 1000, 2)}


def restart_vs_hotpatch(threads: int, phase: float, work: str) -> dict:
    bundle = os.path.join(work, "fix.lpb")
    _cli("build", os.path.join(PATCHES, "baseline"), os.path.join(PATCHES, "fix-rounding"), "-o", bundle, "--id", "HP-BENCH")
    out = {}
    for mode in ("restart", "hotpatch"):
        port = _free_port()
        launcher = [sys.executable, "-m", "livepatch", "run", "--allow-unsigned", "--"] if mode == "hotpatch" else []
        proc = _start(port, launcher)
        _wait_serving(port, proc)
        try:
            with Load(port, threads) as load:
                time.sleep(phase)
                t0 = time.perf_counter()
                if mode == "restart":
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(10)
                    proc = _start(port)  # the fixed release
                    _wait_serving(port, proc)
                    detail = {}
                else:
                    detail = _cli("apply", str(proc.pid), bundle)
                t1 = time.perf_counter()
                time.sleep(phase)
            before = [s[1] for s in load.samples if s[0] + s[1] < t0]
            p99 = sorted(before)[int(len(before) * 0.99)] if before else 0.01
            stats = _window_stats(load.samples, t0, t1 + 0.05, p99)
            total_failed = sum(1 for s in load.samples if not s[2])
            out[mode] = {"window_ms": round((t1 - t0) * 1000, 2), **stats, "failed_whole_run": total_failed,
                         "served_whole_run": len(load.samples) - total_failed,
                         "pause_us": round(detail.get("pause_ns", 0) / 1000, 1) if detail else None,
                         "baseline_p99_ms": round(p99 * 1000, 2),
                         "timeline": [(round(s[0] - t0, 4), round(s[1] * 1000, 3), s[2]) for s in load.samples]}
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
    # what the service's clients lose: the restart's outage versus the commit's GIL hold
    out["ratio_restart_outage_over_hotpatch_pause"] = round(out["restart"]["window_ms"] * 1000 / max(out["hotpatch"]["pause_us"], 1e-3))
    out["note"] = ("restart window: from stopping the old process until the new one answers; hotpatch window: the whole "
                   "`livepatch apply` command (CLI start-up, connect, verify, check, commit), during which the service "
                   "keeps serving; this demo restarts unusually fast, real services also lose warm caches and connections")
    return out


# ---------------------------------------------------------------- (b) reload

def reload_vs_livepatch(n: int, reps: int) -> dict:
    import livepatch
    from livepatch.build import patch_from_source
    rows = {"reload_ms": [], "livepatch_ms": [], "livepatch_pause_us": []}
    stale_reload = stale_livepatch = 0
    for rep in range(reps):
        module, base, new = make_module(n, f"lpalt_reload_{rep}")
        registry = {name: getattr(module, name) for name in dir(module) if name.startswith("handler_")}  # held references
        path = module.__file__
        with open(path, "w") as fh:
            fh.write(new)
        importlib.invalidate_caches()
        t0 = time.perf_counter()
        importlib.reload(module)
        rows["reload_ms"].append((time.perf_counter() - t0) * 1000)
        stale_reload = sum(1 for name, f in registry.items() if f.__code__ is not getattr(module, name).__code__)

        module2, base2, new2 = make_module(n, f"lpalt_live_{rep}")
        registry2 = {name: getattr(module2, name) for name in dir(module2) if name.startswith("handler_")}
        patch = patch_from_source(f"HP-ALT-{rep}", module2.__name__, new2, base_source=base2)
        t0 = time.perf_counter()
        result = livepatch.apply(patch)
        rows["livepatch_ms"].append((time.perf_counter() - t0) * 1000)
        rows["livepatch_pause_us"].append(result.pause_ns / 1000)
        stale_livepatch = sum(1 for f in registry2.values() if f({"items": []})["tag"] != 2)
        livepatch.rollback()
    return {"functions": n, "reps": reps, "reload_ms": summary(rows["reload_ms"]),
            "livepatch_apply_ms": summary(rows["livepatch_ms"]), "livepatch_pause_us": summary(rows["livepatch_pause_us"]),
            "references_on_old_code_after_reload": stale_reload,
            "references_on_old_code_after_livepatch": stale_livepatch,
            "note": "reload rebinds module attributes only: every reference taken before it keeps the old function"}


# ---------------------------------------------------------------- (c) jurigged

JURIGGED_TORN = r"""
import json, os, sys, tempfile, threading, time
OLD = open(sys.argv[1]).read(); NEW = open(sys.argv[2]).read(); seconds = float(sys.argv[3])
d = tempfile.mkdtemp(); path = os.path.join(d, "stressmod.py")
open(path, "w").write(OLD); sys.path.insert(0, d)
import stressmod as m
from jurigged.register import registry
registry.prepare("stressmod", path)
cf = registry.get(path)
stop = threading.Event(); counts = {"calls": 0, "torn": 0}
def worker():
    calls = torn = 0
    top, other = m.top, m.other
    while not stop.is_set():
        for i in range(200):
            try:
                ok = top(i) == (i + 1) * 2 + 3 and other(i) == i + 1
            except TypeError:
                ok = False
            torn += not ok
            calls += 2
    counts["calls"] += calls; counts["torn"] += torn
ts = [threading.Thread(target=worker) for _ in range(3)]
[t.start() for t in ts]
updates = []; end = time.monotonic() + seconds
while time.monotonic() < end:
    for src in (NEW, OLD):
        open(path, "w").write(src)
        t0 = time.perf_counter(); cf.refresh(); updates.append(time.perf_counter() - t0)
stop.set(); [t.join() for t in ts]
updates.sort()
print(json.dumps({"updates": len(updates), "update_p50_ms": updates[len(updates)//2]*1000, **counts}))
"""


def jurigged_comparison(n: int, seconds: float, work: str) -> dict:
    try:
        import jurigged  # noqa: F401
    except ImportError:
        return {"skipped": "jurigged is not installed (pip install jurigged)"}
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import stress_program
    old, new = os.path.join(work, "old.py"), os.path.join(work, "new.py")
    with open(old, "w") as fh:
        fh.write(stress_program.OLD)
    with open(new, "w") as fh:
        fh.write(stress_program.NEW)
    torn = subprocess.run([sys.executable, "-c", JURIGGED_TORN, old, new, str(seconds)], capture_output=True, text=True, timeout=300)
    torn_result = json.loads(torn.stdout) if torn.returncode == 0 else {"error": torn.stderr[-300:]}
    ours = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "stress_program.py"), "--calls", "200000", "--swaps", "200"],
                          capture_output=True, text=True, timeout=300)
    ours_result = json.loads(ours.stdout) if ours.returncode == 0 else {"error": ours.stderr[-300:]}

    # time to update n functions: jurigged refresh versus livepatch apply, same module shape
    from jurigged.register import registry
    import livepatch
    from livepatch.build import patch_from_source
    module, base, new_src = make_module(n, "lpalt_jurigged")
    registry.prepare(module.__name__, module.__file__)
    cf = registry.get(module.__file__)
    with open(module.__file__, "w") as fh:
        fh.write(new_src)
    t0 = time.perf_counter()
    cf.refresh()
    jurigged_ms = (time.perf_counter() - t0) * 1000
    module2, base2, new2 = make_module(n, "lpalt_jurigged_live")
    t0 = time.perf_counter()
    patch = patch_from_source("HP-J", module2.__name__, new2, base_source=base2)
    result = livepatch.apply(patch)
    live_ms = (time.perf_counter() - t0) * 1000
    livepatch.rollback()
    return {"functions": n, "jurigged_update_ms": round(jurigged_ms, 2),
            "livepatch_build_and_apply_ms": round(live_ms, 2), "livepatch_pause_us": round(result.pause_ns / 1000, 1),
            "torn_under_threads": {"jurigged": torn_result,
                                   "livepatch": {k: ours_result.get(k) for k in ("swaps", "calls", "torn_calls", "torn_snapshots", "error") if k in ours_result}}}


def chart(data, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    for ax, mode in zip(axes, ("restart", "hotpatch")):
        tl = data[mode]["timeline"]
        ok = [(t, ms) for t, ms, good in tl if good]
        bad = [(t, ms) for t, ms, good in tl if not good]
        ax.scatter([t for t, _ in ok], [ms for _, ms in ok], s=3, alpha=0.5, label="served")
        if bad:
            ax.scatter([t for t, _ in bad], [max(ms, 0.1) for _, ms in bad], s=10, color="red", label="failed")
        ax.axvspan(0, data[mode]["window_ms"] / 1000, color="orange", alpha=0.3, label=f"{mode} ({data[mode]['window_ms']:.0f} ms)")
        ax.set_yscale("log")
        ax.set_ylabel("latency (ms)")
        ax.set_title(f"{mode}: {data[mode]['failed']} failed, {data[mode]['delayed']} delayed in the window")
        ax.legend(loc="upper right", fontsize=8)
    axes[1].set_xlabel("time relative to the change (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="lpalt-")
    try:
        threads, phase = (2, 0.5) if args.quick else (4, 2.0)
        restart = restart_vs_hotpatch(threads, phase, work)
        for mode in ("restart", "hotpatch"):
            r = restart[mode]
            print(f"{mode:9s} window {r['window_ms']:8.1f} ms  failed {r['failed']:4d}  delayed {r['delayed']:4d}  "
                  f"max latency {r['max_latency_ms']:8.1f} ms  (whole run: {r['served_whole_run']} served, {r['failed_whole_run']} failed)")
        print(f"the restart's outage is {restart['ratio_restart_outage_over_hotpatch_pause']}x the hotpatch's commit pause")
        reload = reload_vs_livepatch(100 if args.quick else 1000, 1 if args.quick else 5)
        print(f"reload of {reload['functions']} functions: {reload['reload_ms']['p50']:.1f} ms, "
              f"{reload['references_on_old_code_after_reload']} held references still on old code; livepatch apply "
              f"{reload['livepatch_apply_ms']['p50']:.1f} ms (pause {reload['livepatch_pause_us']['p50']:.0f} us), "
              f"{reload['references_on_old_code_after_livepatch']} stale")
        jur = jurigged_comparison(100 if args.quick else 1000, 2.0 if args.quick else 10.0, work)
        print("jurigged:", json.dumps({k: v for k, v in jur.items()}))
        data = {"machine": machine(), "params": {"quick": args.quick, "client_threads": threads, "phase_s": phase},
                "restart_vs_hotpatch": restart, "reload": reload, "jurigged": jur}
        png = os.path.join(RESULTS, f"restart-vs-hotpatch-py{sys.version_info.major}.{sys.version_info.minor}{'-quick' if args.quick else ''}.png")
        os.makedirs(RESULTS, exist_ok=True)
        chart(restart, png)
        data["chart"] = png
        path = write_result("alternatives", data, args.quick)
        print("chart:", png)
        print("results:", path)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
