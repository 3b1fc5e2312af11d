"""What the safe-point checks cost.

* Activeness check, against the number of threads and their stack depth:
  the full walk of every thread's stack (`scan_stacks`, just BEFORE the
  commit) and the check INSIDE the commit pause, `sys._current_frames()`
  plus a walk down to the frames that scan proved clean.
* Suspended generator/coroutine check against heap size: the heap pass
  (`gc.get_referrers` on the target code objects) runs before the commit,
  once per apply, but it is one C-level call during which no other thread
  runs either (an apply walks big heaps in bounded steps instead, see
  livepatch/heapwalk.py and benchmarks/stall.py); inside the pause only
  objects created since the last collection (generation 0) are re-checked.

Writes benchmarks/results/safepoint-pyX.Y[-quick].json."""

from __future__ import annotations

import argparse
import gc
import sys
import threading
import time
import os

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, summary, write_result  # noqa: E402

from livepatch.locate import HeapIndex  # noqa: E402
from livepatch.safepoint import first_busy, scan_stacks, young_suspended  # noqa: E402


def _deep(depth, event):
    if depth:
        return _deep(depth - 1, event)
    event.wait()


def target():  # never on any stack: the check must walk everything
    return 1


def activeness(threads: int, depth: int, samples: int) -> dict:
    release = threading.Event()
    ts = [threading.Thread(target=_deep, args=(depth, release), daemon=True) for _ in range(threads)]
    for t in ts:
        t.start()
    time.sleep(0.05)
    ids = {id(target.__code__)}
    times, inside = [], []
    for _ in range(samples):
        t0 = time.perf_counter_ns()
        found, proven = scan_stacks(sys._current_frames(), ids)
        t1 = time.perf_counter_ns()
        assert found is None and first_busy(sys._current_frames(), ids, proven) is None
        inside.append(time.perf_counter_ns() - t1)
        times.append(t1 - t0)
        del proven
    release.set()
    for t in ts:
        t.join()
    return {"threads": threads, "depth": depth, "check_ns": summary(times), "inside_pause_ns": summary(inside),
            "per_frame_ns": round(sorted(times)[len(times) // 2] / max(1, threads * (depth + 3)), 1)}


def gen_target():
    yield 1


def suspended(heap_objects: int, samples: int) -> dict:
    ballast = [[i] for i in range(heap_objects)]  # lists stay tracked by the collector
    gens = [gen_target() for _ in range(100)]
    for g in gens:
        next(g)  # suspended inside gen_target
    gc.collect()
    code = gen_target.__code__
    scans, young = [], []
    for _ in range(samples):
        index = HeapIndex()
        t0 = time.perf_counter_ns()
        index.find_suspendables([code])
        scans.append(time.perf_counter_ns() - t0)
        assert len(index.suspendables) == 100
        was = gc.isenabled()
        gc.disable()
        t0 = time.perf_counter_ns()
        young_suspended({id(code)})
        young.append(time.perf_counter_ns() - t0)
        if was:
            gc.enable()
    tracked = len(gc.get_objects())
    del ballast, gens
    return {"heap_objects": tracked, "heap_scan_ns_outside_pause": summary(scans),
            "young_check_ns_inside_pause": summary(young)}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    threads = [1, 4] if args.quick else [1, 4, 16, 64]
    depths = [10, 50] if args.quick else [10, 50, 200]
    heaps = [100_000, 300_000] if args.quick else [100_000, 1_000_000, 5_000_000]
    samples = 20 if args.quick else 200
    active = []
    for t in threads:
        for d in depths:
            active.append(activeness(t, d, samples))
            r = active[-1]
            print(f"activeness check: {t:3d} threads x depth {d:3d}: full walk p50 {r['check_ns']['p50'] / 1000:8.1f} us "
                  f"p99 {r['check_ns']['p99'] / 1000:8.1f} us ({r['per_frame_ns']} ns/frame) [before the pause]; "
                  f"inside the pause p50 {r['inside_pause_ns']['p50'] / 1000:8.1f} us", flush=True)
    heap = []
    for n in heaps:
        heap.append(suspended(n, 5 if args.quick else 10))
        r = heap[-1]
        print(f"suspended check, {r['heap_objects']:>9,} gc objects: heap scan p50 {r['heap_scan_ns_outside_pause']['p50'] / 1e6:8.1f} ms "
              f"[outside the pause]; young-generation check p50 {r['young_check_ns_inside_pause']['p50'] / 1000:8.1f} us [inside]", flush=True)
    path = write_result("safepoint", {"machine": machine(), "params": {"threads": threads, "depths": depths, "heaps": heaps},
                                      "activeness": active, "suspended": heap}, args.quick)
    print("results:", path)


if __name__ == "__main__":
    sys.exit(main())
