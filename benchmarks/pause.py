"""Pause seen by application threads while a patch commits.

Busy worker threads stamp a shared "last progress" clock on every loop
iteration and record every gap longer than 20 us. For each commit (apply or
rollback of a patch of N functions) the gap that spans the critical section
is the pause the application saw; the same is measured for a no-op critical
section (the GIL handoff alone) interleaved in the same run. Reports p50/p99/
max of both, the extra gap (each commit's gap minus the no-op's median gap),
the commit's GIL hold (the part no other thread can interrupt) and, within
it, the final check plus the stores, and how each commit was made (in one
C-level call, or after a GIL handoff: see livepatch/commit.py)."""

import argparse
import sys
import threading
import time

from common import machine, make_module, percentile, summary, write_result

import livepatch
from livepatch import commit
from livepatch.build import patch_from_source

GAP_NS = 20_000


def measure(threads: int, size: int, reps: int, serial: int):
    module, base, new = make_module(size, f"lp_pause_{serial}")
    patch = patch_from_source(f"P{serial}", module.__name__, new, base_source=base)
    stop = threading.Event()
    clock = [time.perf_counter_ns()]
    gaps = []

    def worker():
        pc = time.perf_counter_ns
        while not stop.is_set():
            for _ in range(200):
                now = pc()
                prev = clock[0]
                # A switch can fall between reading the time and storing it:
                # a worker resuming later must not stamp its stale reading.
                if now > prev:
                    clock[0] = now
                    if now - prev > GAP_NS:
                        gaps.append((prev, now))

    workers = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    for w in workers:
        w.start()
    time.sleep(0.05)

    def gap_spanning(window):
        start, end = window
        time.sleep(0.003)  # let the workers record the gap that ends after the section
        spans = [b - a for a, b in list(gaps) if a <= end and b >= start]
        return max(spans) if spans else 0

    hold, critical, seen, noop_seen = [], [], [], []
    methods = {}
    try:
        for _ in range(reps):
            for action in ("apply", "noop", "rollback", "noop"):
                gaps.clear()
                if action == "noop":
                    outcome = commit.run([], [], lambda frames: None)
                    noop_seen.append(gap_spanning(outcome.window_ns))
                    continue
                result = livepatch.apply(patch) if action == "apply" else livepatch.rollback()
                hold.append(result.pause_ns)
                methods[result.method] = methods.get(result.method, 0) + 1
                critical.append(result.critical_ns)
                seen.append(gap_spanning(result.window_ns))
    finally:
        stop.set()
        for w in workers:
            w.join()
    extra = [max(0, s - percentile(noop_seen, 50)) for s in seen]
    return {
        "threads": threads,
        "functions": size,
        "commit_hold_ns": summary(hold),
        "check_and_stores_ns": summary(critical),
        "gap_with_commit_ns": summary(seen),
        "gap_noop_handoff_ns": summary(noop_seen),
        "extra_gap_p50_ns": percentile(seen, 50) - percentile(noop_seen, 50),
        "extra_gap_p99_ns": percentile(seen, 99) - percentile(noop_seen, 99),
        "extra_gap_vs_noop_median_ns": summary(extra),
        "commit_methods": methods,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small run, used by the tests")
    ap.add_argument("--threads", type=int, nargs="*")
    ap.add_argument("--sizes", type=int, nargs="*")
    ap.add_argument("--reps", type=int)
    ap.add_argument("--tag", default="", help="suffix for the result files (a separate grid)")
    args = ap.parse_args()
    threads = args.threads or ([1, 4] if args.quick else [1, 4, 16, 64])
    sizes = args.sizes or ([1, 10, 100] if args.quick else [1, 10, 100, 1000, 10000])
    reps = args.reps or (5 if args.quick else 40)
    rows = []
    serial = 0
    for t in threads:
        for n in sizes:
            serial += 1
            # building and checking a 10,000-function patch takes seconds: fewer repetitions there
            rows.append(measure(t, n, reps if n <= 1000 else max(3, reps // 8), serial))
            # written after every cell: a long grid stopped midway keeps what it measured
            path = write_result("pause" + args.tag, {"machine": machine(), "params": {
                "threads": threads, "sizes": sizes, "reps": reps}, "rows": rows}, args.quick)
            r = rows[-1]
            print(f"threads={t:>3} functions={n:>5}  hold p50/p99 {r['commit_hold_ns']['p50']/1e3:8.1f}/"
                  f"{r['commit_hold_ns']['p99']/1e3:8.1f} us   check+stores p50/p99 "
                  f"{r['check_and_stores_ns']['p50']/1e3:8.1f}/{r['check_and_stores_ns']['p99']/1e3:8.1f} us   gap p50/p99 {r['gap_with_commit_ns']['p50']/1e3:8.1f}/"
                  f"{r['gap_with_commit_ns']['p99']/1e3:8.1f} us   noop gap p50/p99 "
                  f"{r['gap_noop_handoff_ns']['p50']/1e3:8.1f}/{r['gap_noop_handoff_ns']['p99']/1e3:8.1f} us   "
                  f"extra p50/p99 {r['extra_gap_vs_noop_median_ns']['p50']/1e3:8.1f}/"
                  f"{r['extra_gap_vs_noop_median_ns']['p99']/1e3:8.1f} us",
                  flush=True)
    print("chart:", chart(rows, path[:-5] + ".png"))
    print("results:", path)


def chart(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (hold_ax, gap_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for t in sorted({r["threads"] for r in rows}):
        mine = sorted((r for r in rows if r["threads"] == t), key=lambda r: r["functions"])
        xs = [r["functions"] for r in mine]
        hold_ax.plot(xs, [r["commit_hold_ns"]["p99"] / 1000 for r in mine], marker="o", label=f"{t} threads")
        gap_ax.plot(xs, [max(r["extra_gap_vs_noop_median_ns"]["p99"], 1) / 1000 for r in mine], marker="o", label=f"{t} threads")
    for ax, title in ((hold_ax, "commit GIL hold, p99"), (gap_ax, "extra gap seen by workers, p99")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("functions in the patch")
        ax.set_ylabel("µs")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
