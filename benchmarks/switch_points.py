"""The longest uninterruptible stretch of an apply() with the heap walked,
seen by the interpreter itself (sys.monitoring, Python 3.12 and later).

The interpreter hands the GIL to a waiting thread only where it checks its
eval breaker: after every call (of a builtin, a method, a type such as
`list(iterator)`), at the start of a Python function, and at a backward
jump. `sys.monitoring` reports each of those points in the thread under
test (C_RETURN and C_RAISE, PY_START and PY_RESUME, a JUMP backwards), and
calls to types too, which `sys.setprofile` does not report (stall.py's
"bytecode stretch" is an upper bound over several such calls). The longest
time between two consecutive points, by wall clock and by the thread's CPU
time, is an upper bound of the longest GIL hold no switch request can
interrupt, named by what was called last. Stretches over 0.5 and 1 ms of
CPU are counted too, over all rounds: at a big heap a cold read stalls any
code now and then, and how often it happens beside the control says more
than one maximum.

For each heap size a fresh process builds that many extra tracked objects
(stall.py's heap) and a module of 100 typical functions, then, rounds
alternating:

After one unmeasured apply and rollback (the engine imports the modules of
the walk when it first needs them):

* the apply with the heap walked (the namespace proof disabled, as for
  generator targets), then its rollback;
* the control: ordinary Python code (dict and list work) for as long as the
  walked apply took;
* the positive control: one `gc.get_referrers` pass over the heap, a
  single C-level call, which the measure must see whole.

Run: python3.12 benchmarks/switch_points.py [--quick]"""

import _thread
import argparse
import heapq
import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, rows_per_heap, summary, write_result  # noqa: E402
from stall import _ms, apply_with_the_heap_walked, heap_and_patch, ordinary_python  # noqa: E402

TOP = 5  # stretches kept per round, by CPU time
# Stretches counted per round by CPU time above each of these (ns): how often
# long ones come, side by side with the control, tells a pattern of the code
# from a stall of the machine, which a maximum alone cannot.
OVER_NS = (500_000, 1_000_000)
TOOL_ID = 4  # not one of the ids CPython names for debuggers, coverage, profilers, optimizers


class LongestStretch:
    """sys.monitoring callbacks for one thread: the longest time between two
    consecutive switch points, with the thread's CPU time over it and what
    ran. Other threads' code locations are disabled at their first event, so
    that they run at full speed. The callbacks' own work is left out: the
    clocks are read first and last in each."""

    def __init__(self):
        self.thread = None
        self.longest_wall = (0, 0, "")  # (wall, cpu, what)
        self.top_cpu = [(0, "")] * TOP  # (cpu, what): a heap of the longest by CPU
        self.last_call = None
        self.last_wall = self.last_cpu = 0
        self.over = [0] * len(OVER_NS)
        self.points = 0

    def start(self):
        """Begin here, in the thread measured."""
        self.last_call = None
        self.last_wall, self.last_cpu = time.perf_counter_ns(), time.thread_time_ns()
        self.thread = _thread.get_ident()  # last: the clocks above are this thread's

    def stop(self):
        self.thread = None

    def install(self):
        mon = sys.monitoring
        events = mon.events
        mon.use_tool_id(TOOL_ID, "livepatch switch points")
        for event, callback in ((events.CALL, self._call), (events.C_RETURN, self._returned),
                                (events.C_RAISE, self._returned), (events.PY_START, self._entered),
                                (events.PY_RESUME, self._entered), (events.JUMP, self._jumped)):
            mon.register_callback(TOOL_ID, event, callback)
        mon.set_events(TOOL_ID, events.CALL | events.C_RETURN | events.C_RAISE | events.PY_START
                       | events.PY_RESUME | events.JUMP)

    def uninstall(self):
        mon = sys.monitoring
        mon.set_events(TOOL_ID, 0)
        mon.free_tool_id(TOOL_ID)

    def _call(self, code, offset, callable_, arg0):
        if _thread.get_ident() != self.thread:
            return sys.monitoring.DISABLE
        # not a switch point (the check comes after the call returns): what runs next
        self.last_call = (callable_, code)
        return None

    def _returned(self, code, offset, callable_, arg0):
        if _thread.get_ident() == self.thread:
            self._point(code)
        # C_RETURN and C_RAISE follow the CALL event: disabled with it in other threads

    def _entered(self, code, offset):
        if _thread.get_ident() != self.thread:
            return sys.monitoring.DISABLE
        self._point(code)
        return None

    def _jumped(self, code, offset, destination):
        if _thread.get_ident() != self.thread:
            return sys.monitoring.DISABLE
        if destination < offset:  # only a backward jump checks the eval breaker
            self._point(code)
        return None

    def _point(self, code):
        now, cpu = time.perf_counter_ns(), time.thread_time_ns()
        wall, used = now - self.last_wall, cpu - self.last_cpu
        self.points += 1
        if used > OVER_NS[0]:
            self.over = [n + (used > limit) for n, limit in zip(self.over, OVER_NS)]
        longest_wall, among_top_cpu = wall > self.longest_wall[0], used > self.top_cpu[0][0]
        if longest_wall or among_top_cpu:
            what = self._what(code)
            if longest_wall:
                self.longest_wall = (wall, used, what)
            if among_top_cpu:  # the next longest too, to tell a pattern from one outlier
                heapq.heapreplace(self.top_cpu, (used, what))
        self.last_call = None
        self.last_wall, self.last_cpu = time.perf_counter_ns(), time.thread_time_ns()

    def _what(self, code) -> str:
        place = f"{os.path.basename(code.co_filename)}:{code.co_name}"
        if self.last_call is None:
            return f"bytecode in {place}"
        callable_, caller = self.last_call
        name = getattr(callable_, "__qualname__", None) or type(callable_).__qualname__
        return f"{name} called from {os.path.basename(caller.co_filename)}:{caller.co_name}"

    def take(self) -> dict:
        top = sorted(self.top_cpu, reverse=True)
        out = {"wall_ns": self.longest_wall[0], "cpu_ns_over_it": self.longest_wall[1],
               "where": self.longest_wall[2], "cpu_ns": top[0][0], "cpu_where": top[0][1],
               "top_by_cpu": [{"cpu_ns": c, "where": w} for c, w in top if c],
               "points": self.points, "over_cpu_ns": dict(zip(map(str, OVER_NS), self.over))}
        self.over = [0] * len(OVER_NS)
        self.points = 0
        self.longest_wall = (0, 0, "")
        self.top_cpu = [(0, "")] * TOP
        return out


def measured(fn, stretch: LongestStretch) -> dict:
    """The longest stretches of fn() run in a new thread, with its wall seconds."""
    box = []

    def run():
        start = time.perf_counter()
        stretch.start()
        fn()
        stretch.stop()
        box.append(time.perf_counter() - start)
    t = threading.Thread(target=run)
    t.start()
    t.join()
    return dict(stretch.take(), seconds=box[0])


def child(args) -> dict:
    import gc
    import livepatch

    heap, tracked, module, patch = heap_and_patch(args.heap, "lp_switch")

    def apply_walking():
        apply_with_the_heap_walked(patch)

    apply_walking()  # unmeasured: the engine imports what the walk needs on first use
    livepatch.rollback()
    stretch = LongestStretch()
    stretch.install()
    rounds = {"apply with the heap walked": [], "rollback": [],
              "control: ordinary Python as long as the walked apply": [],
              "one gc.get_referrers pass (positive control)": []}
    took = []
    try:
        for _ in range(args.reps):
            result = measured(apply_walking, stretch)
            seconds = result["seconds"]
            rounds["apply with the heap walked"].append(result)
            took.append(seconds)
            rounds["rollback"].append(measured(livepatch.rollback, stretch))
            rounds["control: ordinary Python as long as the walked apply"].append(
                measured(lambda: ordinary_python(seconds), stretch))
            rounds["one gc.get_referrers pass (positive control)"].append(
                measured(lambda: gc.get_referrers(vars(module)), stretch))
    finally:
        stretch.uninstall()
    del heap
    return {"heap_objects": args.heap, "tracked_objects": tracked, "apply_seconds": summary(took),
            "python": sys.version.split()[0],
            "longest_stretch": {name: _summary(results) for name, results in rounds.items()}}


def _summary(results: list) -> dict:
    return {"wall_ns": summary([r["wall_ns"] for r in results]), "cpu_ns": summary([r["cpu_ns"] for r in results]),
            "longest": max(results, key=lambda r: r["wall_ns"]),
            "longest_by_cpu": max(results, key=lambda r: r["cpu_ns"]),
            "seconds": sum(r["seconds"] for r in results), "points": sum(r["points"] for r in results),
            "over_cpu_ns": {limit: sum(r["over_cpu_ns"][limit] for r in results) for limit in map(str, OVER_NS)}}


def print_row(row: dict) -> None:
    print(f"heap {row['heap_objects']:>9,} (+{row['tracked_objects']:,} tracked, Python {row['python']}, load average "
          f"{row['load_average'][0]:.2f}): walked apply took p50 {row['apply_seconds']['p50']:.2f} s")
    for name, s in row["longest_stretch"].items():
        w, c = s["wall_ns"], s["cpu_ns"]
        print(f"   {name}: longest stretch by CPU p50/max {_ms(c['p50'])}/{_ms(c['max'])} ms "
              f"(the max: {s['longest_by_cpu']['cpu_where']}); by wall p50/max {_ms(w['p50'])}/{_ms(w['max'])} ms "
              f"(the max: {s['longest']['where']}, CPU {_ms(s['longest']['cpu_ns_over_it'])} ms)")
        over = ", ".join(f"{n} over {_ms(int(limit))} ms" for limit, n in s["over_cpu_ns"].items())
        print(f"      over all rounds ({s['seconds']:.1f} s, {s['points']:,} switch points): {over}")
        runner_up = s["longest_by_cpu"]["top_by_cpu"][1:]
        if runner_up:
            print("      next longest by CPU in that round: " + "; ".join(
                f"{_ms(t['cpu_ns'])} ms {t['where']}" for t in runner_up))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small heap and two rounds, for the test suite")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--heap", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--reps", type=int, default=5, help="rounds per heap size")
    ap.add_argument("--heaps", type=int, nargs="+", default=[100_000, 1_000_000, 5_000_000],
                    help="extra heap objects, a fresh process each")
    args = ap.parse_args()
    if sys.version_info < (3, 12):
        sys.exit(f"switch_points.py needs sys.monitoring (Python 3.12 or later); this is {sys.version.split()[0]}")
    if args.child:
        print(json.dumps(child(args)))
        return
    heaps = [10_000] if args.quick else args.heaps
    reps = 2 if args.quick else args.reps
    rows = rows_per_heap(__file__, "switch-point", heaps, ["--reps", str(reps)], print_row)
    path = write_result("switch_points", {"machine": machine(), "rows": rows}, args.quick)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
