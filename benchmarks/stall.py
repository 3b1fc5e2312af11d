"""Stalls the service's threads see over a whole apply(), against the honest
control, at several heap sizes; the longest GIL hold; apply latency.

For each heap size a fresh process builds that many extra tracked objects
(small lists in lists of 1,000, and a dict of a tenth of them) and a module
of 100 typical functions, then measures, rounds alternating:

* stall: busy worker threads read the clock in a loop and keep every gap
  between two reads. The worst gap any worker saw while an apply (or the
  rollback) of the 100 functions ran is the apply's stall; the worst gap
  while another thread ran ordinary Python code (dict and list work) for as
  long as the preceding apply took is the control's. With 16 busy threads
  each worker waits for the other 15 most of the time, in both.
* hold: with the switch interval at 0.1 ms and one worker, the longest time
  the worker made no progress during an apply: the longest single hold of
  the GIL that no switch could interrupt (a C-level call). The same for the
  control thread, and for the locating strategy used on small heaps (one
  `gc.get_referrers` pass, forced) for comparison.
* latency: apply() and rollback() wall time of a 2-function patch with 4
  and 16 busy threads, with the engine's one-call commit as it is and with
  a sleep before and after it (commit.YIELD_AROUND_ONE_CALL, the earlier
  behaviour), rounds alternating.

Run: python benchmarks/stall.py [--quick]"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, make_module, summary, write_result  # noqa: E402

GAP_NS = 20_000


class Workers:
    """Busy threads that record every gap between two clock reads."""

    def __init__(self, n: int):
        self.stop = threading.Event()
        self.gaps = [[] for _ in range(n)]
        self.threads = [threading.Thread(target=self._run, args=(g,), daemon=True) for g in self.gaps]
        for t in self.threads:
            t.start()

    def _run(self, gaps):
        pc = time.perf_counter_ns
        stop = self.stop
        prev = pc()
        scratch = {}
        while not stop.is_set():
            for i in range(100):
                now = pc()
                if now - prev > GAP_NS:
                    gaps.append((prev, now))
                prev = now
                scratch[i] = i * 2  # some ordinary work between reads

    def worst(self, start: int, end: int) -> int:
        """The longest gap any worker saw that overlaps [start, end]."""
        worst = 0
        for gaps in self.gaps:
            for a, b in reversed(gaps):
                if b < start:
                    break
                if a <= end:
                    worst = max(worst, min(b, end) - max(a, start))
        return worst

    def clear(self):
        for g in self.gaps:
            g.clear()

    def close(self):
        self.stop.set()
        for t in self.threads:
            t.join()


def ordinary_python(seconds: float) -> None:
    """The control: plain Python work for `seconds`."""
    end = time.perf_counter() + seconds
    d, lst = {}, []
    while time.perf_counter() < end:
        for i in range(200):
            d[i] = str(i)
            lst.append(i)
        lst.clear()


def in_thread(fn) -> tuple[int, int]:
    box = []

    def run():
        start = time.perf_counter_ns()
        fn()
        box.append((start, time.perf_counter_ns()))
    t = threading.Thread(target=run)
    t.start()
    t.join()
    return box[0]


def build_heap(n: int) -> list:
    rows = [[[i] for i in range(j, min(n, j + 1000))] for j in range(0, n, 1000)]
    return [rows, {i: [i] for i in range(n // 10)}]


def child(args) -> dict:
    import gc
    import livepatch
    from livepatch import commit, locate
    from livepatch.build import patch_from_source

    heap = build_heap(args.heap)
    gc.collect()
    tracked = len(gc.get_objects())
    module, base, new = make_module(100, f"lp_stall_{args.heap}")
    patch = patch_from_source("S100", module.__name__, new, base_source=base)
    small, sbase, snew = make_module(2, f"lp_stall_small_{args.heap}")
    small_patch = patch_from_source("S2", small.__name__, snew, base_source=sbase)
    out = {"heap_objects": args.heap, "tracked_objects": tracked}

    # stall over a whole apply of 100 functions, 16 busy threads, against the control
    workers = Workers(args.threads)
    time.sleep(0.2)
    apply_stall, control_stall, durations = [], [], []
    for r in range(args.reps):
        for action in ("apply", "control"):
            workers.clear()
            if action == "apply":
                fn = (lambda: livepatch.apply(patch, timeout=60)) if r % 2 == 0 else (lambda: livepatch.rollback())
                start, end = in_thread(fn)
                durations.append(end - start)
                apply_stall.append(workers.worst(start, end))
            else:
                start, end = in_thread(lambda: ordinary_python(durations[-1] / 1e9))
                control_stall.append(workers.worst(start, end))
    while livepatch.engine.applied_ids():
        livepatch.rollback()
    workers.close()
    out["stall"] = {"threads": args.threads, "functions": 100, "apply_ns": summary(durations),
                    "worst_stall_apply_ns": summary(apply_stall), "worst_stall_control_ns": summary(control_stall),
                    "ratio_p50": summary(apply_stall)["p50"] / max(1, summary(control_stall)["p50"])}

    # the longest uninterruptible hold: switch interval 0.1 ms, one worker
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    workers = Workers(1)
    time.sleep(0.05)
    holds = {"walk or one pass as chosen": [], "one get_referrers pass (forced)": [], "control": []}
    small_heap = locate.SMALL_HEAP
    for r in range(args.reps):
        for name in holds:
            workers.clear()
            if name == "control":
                start, end = in_thread(lambda: ordinary_python(0.05))
            else:
                hint = locate._heap_hint
                if name.startswith("one"):
                    locate.SMALL_HEAP, locate._heap_hint = 1 << 62, 0
                try:
                    start, end = in_thread(lambda: livepatch.apply(patch, timeout=60))
                finally:
                    locate.SMALL_HEAP, locate._heap_hint = small_heap, hint
                livepatch.rollback()
            holds[name].append(workers.worst(start, end))
    workers.close()
    sys.setswitchinterval(interval)
    out["longest_hold_ns"] = {k: summary(v) for k, v in holds.items()}

    # apply latency of a small patch at 4 and 16 busy threads, with and without the sleeps
    out["latency"] = []
    for threads in (4, 16):
        workers = Workers(threads)
        time.sleep(0.1)
        lat = {False: {"apply": [], "rollback": []}, True: {"apply": [], "rollback": []}}
        livepatch.apply(small_patch)
        livepatch.rollback()  # warm-up: the first apply may walk the heap
        for r in range(args.reps * 2):
            for yields in (False, True):
                commit.YIELD_AROUND_ONE_CALL = yields
                t = time.perf_counter_ns()
                livepatch.apply(small_patch)
                lat[yields]["apply"].append(time.perf_counter_ns() - t)
                t = time.perf_counter_ns()
                livepatch.rollback()
                lat[yields]["rollback"].append(time.perf_counter_ns() - t)
        commit.YIELD_AROUND_ONE_CALL = False
        workers.close()
        out["latency"].append({"threads": threads, "functions": 2,
                               "as_is": {k: summary(v) for k, v in lat[False].items()},
                               "sleep_around_one_call": {k: summary(v) for k, v in lat[True].items()}})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small heaps and few rounds, for the test suite")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--heap", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    heaps = [10_000] if args.quick else [100_000, 1_000_000, 5_000_000]
    reps = 2 if args.quick else args.reps
    rows = []
    for heap in heaps:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--heap", str(heap),
               "--threads", str(4 if args.quick else args.threads), "--reps", str(reps)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        if done.returncode != 0:
            sys.exit(f"stall benchmark at {heap} objects failed:\n{done.stderr}")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        s = row["stall"]
        print(f"heap {heap:>9,} (+{row['tracked_objects']:,} tracked): worst stall p50 apply "
              f"{s['worst_stall_apply_ns']['p50'] / 1e6:.1f} ms vs control {s['worst_stall_control_ns']['p50'] / 1e6:.1f} ms "
              f"(ratio {s['ratio_p50']:.2f}); longest hold p50/max "
              + ", ".join(f"{k} {v['p50'] / 1e3:.0f}/{v['max'] / 1e3:.0f} us" for k, v in row["longest_hold_ns"].items()))
        for lat in row["latency"]:
            print(f"   {lat['threads']:>2} threads: apply p50/p99 {lat['as_is']['apply']['p50'] / 1e6:.1f}/"
                  f"{lat['as_is']['apply']['p99'] / 1e6:.1f} ms, with sleeps "
                  f"{lat['sleep_around_one_call']['apply']['p50'] / 1e6:.1f}/"
                  f"{lat['sleep_around_one_call']['apply']['p99'] / 1e6:.1f} ms")
    path = write_result("stall", {"machine": machine(), "rows": rows}, args.quick)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
