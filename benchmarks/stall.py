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
  the worker made no progress (the longest GIL hold no switch could
  interrupt), and, in the thread doing the work, the longest time between
  two profiler events (`sys.setprofile`: every call and return of Python
  code and of builtins called from bytecode), with the thread's CPU time
  over it and what ran: a C-level call by name, or bytecode between two
  lines (a call to a type such as `list(iterator)` raises no event, so the
  one-call commit shows as bytecode around its line). No uninterruptible
  hold is longer than that gap; a call that releases the GIL (a sleep, a
  lock) shows with less CPU than wall time, an upper bound. For: an apply
  as the engine chooses to locate; an apply with the namespace proof
  disabled, so that the heap is walked (`heapwalk`); the positive control,
  one `gc.get_referrers` pass over the heap called directly (what one pass
  would cost, tens of milliseconds at 5x10^6 objects); and the controls,
  ordinary Python code for 50 ms and for as long as the walked apply took
  (the longest gap over a window grows with the window: the OS and the
  machine stop a thread now and then whatever it runs).
* latency: apply() and rollback() wall and CPU time of a 2-function patch
  with 4 and 16 busy threads (100 rounds by default), beside the control:
  the same thread running a fixed piece of ordinary Python, sized before
  the busy threads start to take as much CPU as the apply, under the same
  load.

Run: python benchmarks/stall.py [--quick]"""

import argparse
import json
import os
import sys
import threading
import time
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, make_module, rows_per_heap, summary, write_result  # noqa: E402

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


class LongestGap:
    """A profile function (sys.setprofile, in the thread under test): the
    longest time between two consecutive events, by wall clock, with the
    thread's CPU time over it and what ran: separately for C-level calls (a
    builtin called from bytecode, until it returns or calls Python code)
    and for bytecode (with any call to a type, which raises no event). Its
    own work is left out: the clocks are read first and last in each call."""

    def __init__(self):
        self.longest = {"C call": (0, 0, ""), "bytecode": (0, 0, "")}  # by wall clock
        self.longest_cpu = dict(self.longest)  # by CPU time: the OS's preemptions left out
        self.start()

    def start(self):
        """Begin here, in the thread measured (its CPU clock is its own)."""
        self.prev = ("start", None, None, 0)
        self.last_wall, self.last_cpu = time.perf_counter_ns(), time.thread_time_ns()

    def __call__(self, frame, event, arg):
        now, cpu = time.perf_counter_ns(), time.thread_time_ns()
        wall, used = now - self.last_wall, cpu - self.last_cpu
        kind = "C call" if self.prev[0] == "c_call" else "bytecode"
        if wall > self.longest[kind][0]:
            self.longest[kind] = (wall, used, self._what(frame, event))
        if used > self.longest_cpu[kind][1]:
            self.longest_cpu[kind] = (wall, used, self._what(frame, event))
        self.prev = (event, arg, frame.f_code, frame.f_lineno)
        self.last_wall, self.last_cpu = time.perf_counter_ns(), time.thread_time_ns()

    def _what(self, frame, event) -> str:
        """What ran between the previous event and this one."""
        kind, prev_arg, code, line = self.prev
        if code is None:
            return "start"
        place = f"{os.path.basename(code.co_filename)}:{code.co_name}"
        if kind == "c_call":
            return f"{_c_name(prev_arg)} from {place}:{line}"
        if frame.f_code is code:
            return f"{place} lines {line}-{frame.f_lineno}"
        return (f"{place}:{line} ({kind}) to {os.path.basename(frame.f_code.co_filename)}:"
                f"{frame.f_code.co_name}:{frame.f_lineno} ({event})")

    def result(self) -> dict:
        return {kind: {"wall_ns": wall, "cpu_ns_over_it": cpu, "where": where,
                       "cpu_ns": self.longest_cpu[kind][1], "cpu_where": self.longest_cpu[kind][2]}
                for kind, (wall, cpu, where) in self.longest.items()}


def _c_name(fn) -> str:
    owner = getattr(fn, "__self__", None)
    prefix = getattr(owner, "__name__", None) if isinstance(owner, types.ModuleType) else None
    return f"{prefix or getattr(fn, '__module__', None) or type(owner).__name__}.{getattr(fn, '__qualname__', fn)}"


def in_thread(fn, profile=None) -> tuple[int, int]:
    """(start, end) of fn() run in a new thread, with `profile` (a
    LongestGap) as that thread's profile function if given."""
    box = []

    def run():
        if profile is not None:
            profile.start()
            sys.setprofile(profile)
        start = time.perf_counter_ns()
        fn()
        end = time.perf_counter_ns()
        if profile is not None:
            sys.setprofile(None)
        box.append((start, end))
    t = threading.Thread(target=run)
    t.start()
    t.join()
    return box[0]


def build_heap(n: int) -> list:
    rows = [[[i] for i in range(j, min(n, j + 1000))] for j in range(0, n, 1000)]
    return [rows, {i: [i] for i in range(n // 10)}]


def heap_and_patch(n: int, prefix: str) -> tuple:
    """(n extra objects, which the caller keeps; how many objects the
    collector then tracks; a module of 100 typical functions; its patch)."""
    import gc
    from livepatch.build import patch_from_source
    heap = build_heap(n)
    gc.collect()
    tracked = len(gc.get_objects())
    module, base, new = make_module(100, f"{prefix}_{n}")
    return heap, tracked, module, patch_from_source("S100", module.__name__, new, base_source=base)


def apply_with_the_heap_walked(patch) -> None:
    """apply() with the namespace proof disabled, so that the heap is walked
    (as it is for generator targets)."""
    import livepatch
    from livepatch import locate
    real_proof = locate._module_functions
    locate._module_functions = lambda mod: None
    try:
        livepatch.apply(patch, timeout=60)
    finally:
        locate._module_functions = real_proof


def child(args) -> dict:
    import gc
    import livepatch
    from livepatch.build import patch_from_source

    heap, tracked, module, patch = heap_and_patch(args.heap, "lp_stall")
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

    def apply_walking():
        apply_with_the_heap_walked(patch)

    # The longest gap over a window grows with the window (the OS, the
    # machine): a walk takes seconds, so its control runs as long.
    walk_took = [0.05]

    def ordinary_python_as_long_as_the_walk():
        ordinary_python(walk_took[-1])

    modes = {"apply as the engine locates": lambda: livepatch.apply(patch, timeout=60),
             "apply with the heap walked": apply_walking,
             "control: ordinary Python as long as the walked apply": ordinary_python_as_long_as_the_walk,
             "one gc.get_referrers pass (positive control)": lambda: gc.get_referrers(vars(module)),
             "control: ordinary Python": lambda: ordinary_python(0.05)}
    holds = {name: [] for name in modes}
    calls = {name: [] for name in modes}
    for r in range(args.reps):
        for name, fn in modes.items():
            if fn in (apply_walking, ordinary_python_as_long_as_the_walk) and r >= args.walk_reps:
                continue  # seconds per walk at 5x10^6 objects
            for profiled in (False, True):
                workers.clear()
                gap = LongestGap() if profiled else None
                start, end = in_thread(fn, gap)
                if fn is apply_walking and not profiled:
                    walk_took.append((end - start) / 1e9)
                if name.startswith("apply"):
                    livepatch.rollback()
                if profiled:
                    calls[name].append(gap.result())
                else:
                    holds[name].append(workers.worst(start, end))
    workers.close()
    sys.setswitchinterval(interval)
    out["longest_hold_ns"] = {k: summary(v) for k, v in holds.items()}
    out["longest_profiled_gap"] = {k: _gap_summary(v) for k, v in calls.items()}
    out["latency"] = [latency(small_patch, threads, args.latency_reps) for threads in (4, 16)]
    return out


def _gap_summary(rounds: list) -> dict:
    out = {}
    for kind in ("C call", "bytecode"):
        gaps = [r[kind] for r in rounds]
        out[kind] = {"wall_ns": summary([g["wall_ns"] for g in gaps]), "cpu_ns": summary([g["cpu_ns"] for g in gaps]),
                     "longest": max(gaps, key=lambda g: g["wall_ns"]),
                     "longest_by_cpu": max(gaps, key=lambda g: g["cpu_ns"]),
                     "usual": _most_common(g["where"] for g in gaps),
                     "usual_by_cpu": _most_common(g["cpu_where"] for g in gaps)}
    return out


def _most_common(items) -> str:
    counts = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return max(counts, key=counts.get)


def fixed_python_work(rounds: int) -> None:
    """The latency control: a fixed piece of ordinary Python, `rounds` units
    of it (sized to a small apply's CPU by `control_rounds`)."""
    d, lst = {}, []
    for _ in range(rounds):
        for i in range(200):
            d[i] = str(i)
            lst.append(i)
        lst.clear()


def control_rounds(small_patch) -> int:
    """Units of the control that take as much CPU as an apply of
    `small_patch`, measured before any busy thread starts."""
    import livepatch

    applies = []
    for i in range(18):
        c = time.thread_time_ns()
        livepatch.apply(small_patch)
        if i >= 3:  # after a warm-up
            applies.append(time.thread_time_ns() - c)
        livepatch.rollback()
    units = []
    for _ in range(15):
        c = time.thread_time_ns()
        fixed_python_work(1)
        units.append(time.thread_time_ns() - c)
    return max(1, round(sorted(applies)[len(applies) // 2] / sorted(units)[len(units) // 2]))


def latency(small_patch, threads: int, reps: int) -> dict:
    """Wall and CPU time of apply() and rollback() of a 2-function patch
    with `threads` busy threads, beside the fixed control work."""
    import livepatch

    rounds = control_rounds(small_patch)
    workers = Workers(threads)
    time.sleep(0.1)
    livepatch.apply(small_patch)
    livepatch.rollback()  # warm-up
    wall = {"apply": [], "rollback": [], "control": []}
    cpu = {k: [] for k in wall}
    steps = {"apply": lambda: livepatch.apply(small_patch), "rollback": livepatch.rollback,
             "control": lambda: fixed_python_work(rounds)}
    for _ in range(reps):
        for name, fn in steps.items():
            t, c = time.perf_counter_ns(), time.thread_time_ns()
            fn()
            wall[name].append(time.perf_counter_ns() - t)
            cpu[name].append(time.thread_time_ns() - c)
    # Where the slow ones waited: applies and controls run with the profiler,
    # each slow one (over 10 ms) named by its longest gap between two events
    # by wall clock, with the CPU time in it (little: the thread waited for
    # the GIL or the CPU; much: it computed, a garbage collection say).
    waits = {"apply": {}, "control": {}}
    for _ in range(max(1, reps // 2)):
        for name in waits:
            gap = LongestGap()
            t, c = time.perf_counter_ns(), time.thread_time_ns()
            gap.start()
            sys.setprofile(gap)
            steps[name]()
            sys.setprofile(None)
            took, used = time.perf_counter_ns() - t, time.thread_time_ns() - c
            if name == "apply":
                livepatch.rollback()
            if took > 10_000_000:
                longest = max(gap.result().items(), key=lambda kv: kv[1]["wall_ns"])
                place = f"{longest[0]} {longest[1]['where']}"
                waits[name].setdefault(place, []).append((took, used, longest[1]["wall_ns"], longest[1]["cpu_ns_over_it"]))
    workers.close()
    return {"threads": threads, "functions": 2, "rounds": reps, "control_units": rounds,
            "wall_ns": {k: summary(v) for k, v in wall.items()}, "cpu_ns": {k: summary(v) for k, v in cpu.items()},
            "profiled_rounds": max(1, reps // 2),
            "slow_ones_waited_in": {k: {place: {"count": len(v), "wall_ns": [x[0] for x in v], "cpu_ns": [x[1] for x in v],
                                               "gap_wall_ns": [x[2] for x in v], "gap_cpu_ns": [x[3] for x in v]}
                                       for place, v in w.items()} for k, w in waits.items()}}


def _ms(ns) -> str:
    return f"{ns / 1e6:.2f}"


def print_row(row: dict) -> None:
    s = row["stall"]
    print(f"heap {row['heap_objects']:>9,} (+{row['tracked_objects']:,} tracked, load average "
          f"{row['load_average'][0]:.2f}): worst stall p50 apply {_ms(s['worst_stall_apply_ns']['p50'])} ms vs control "
          f"{_ms(s['worst_stall_control_ns']['p50'])} ms (ratio {s['ratio_p50']:.2f})")
    for name, hold in row["longest_hold_ns"].items():
        print(f"   {name}: worker's longest gap p50/max {_ms(hold['p50'])}/{_ms(hold['max'])} ms")
        for kind, gap in row["longest_profiled_gap"][name].items():
            w, c = gap["wall_ns"], gap["cpu_ns"]
            print(f"      longest {kind} by wall p50/p99/max {_ms(w['p50'])}/{_ms(w['p99'])}/{_ms(w['max'])} ms "
                  f"(usually {gap['usual']}; the max {gap['longest']['where']}, CPU "
                  f"{_ms(gap['longest']['cpu_ns_over_it'])} ms); by CPU p50/p99/max {_ms(c['p50'])}/{_ms(c['p99'])}/"
                  f"{_ms(c['max'])} ms (usually {gap['usual_by_cpu']}; the max {gap['longest_by_cpu']['cpu_where']})")
    for lat in row["latency"]:
        w = lat["wall_ns"]
        print(f"   {lat['threads']:>2} threads, {lat['rounds']} rounds: apply p50/p99/max "
              f"{_ms(w['apply']['p50'])}/{_ms(w['apply']['p99'])}/{_ms(w['apply']['max'])} ms "
              f"(CPU p50 {_ms(lat['cpu_ns']['apply']['p50'])}), rollback {_ms(w['rollback']['p50'])}/"
              f"{_ms(w['rollback']['p99'])} ms, control {_ms(w['control']['p50'])}/{_ms(w['control']['p99'])} ms "
              f"(CPU p50 {_ms(lat['cpu_ns']['control']['p50'])})")
        for name, places in lat["slow_ones_waited_in"].items():
            slow = sum(p["count"] for p in places.values())
            print(f"      {name}: {slow} of {lat['profiled_rounds']} profiled rounds slow; longest gap in them: "
                  + "; ".join(f"{place} x{p['count']} (gap {'/'.join(_ms(g) for g in p['gap_wall_ns'][:3])} ms wall, "
                              f"{'/'.join(_ms(g) for g in p['gap_cpu_ns'][:3])} ms CPU)"
                              for place, p in sorted(places.items(), key=lambda kv: -kv[1]["count"])[:4]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small heaps and few rounds, for the test suite")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--heap", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--reps", type=int, default=12, help="rounds of the stall and hold measures")
    ap.add_argument("--walk-reps", type=int, default=3, help="rounds of the hold measures with the heap walked")
    ap.add_argument("--latency-reps", type=int, default=100, help="applies per latency cell")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    heaps = [10_000] if args.quick else [100_000, 1_000_000, 5_000_000]
    reps = 2 if args.quick else args.reps
    latency_reps = 3 if args.quick else args.latency_reps
    child_args = ["--threads", str(4 if args.quick else args.threads), "--reps", str(reps),
                  "--latency-reps", str(latency_reps), "--walk-reps", str(min(reps, args.walk_reps))]
    rows = rows_per_heap(__file__, "stall", heaps, child_args, print_row)
    path = write_result("stall", {"machine": machine(), "rows": rows}, args.quick)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
