"""Stress program (run as a subprocess by test_stress.py and usable alone):
worker threads call functions whose old and new versions are incompatible
with each other, and reader threads snapshot all their code objects in one
C-level call, while the main thread applies and rolls back the patch in a
loop. Prints a JSON report; a torn commit shows up as a TypeError in a
worker or a mixed snapshot."""

import argparse
import ctypes
import json
import os
import sys
import tempfile
import threading
import time

OLD = '''
def leaf(x):
    return x + 1
def middle(x):
    return leaf(x) * 2
def top(x):
    return middle(x) + 3
def other(x):
    return leaf(x)
'''
# every new function takes an extra argument: any mix of old and new fails
NEW = '''
def leaf(x, y):
    return x + y
def middle(x, y):
    return leaf(x, y) * 2
def top(x):
    return middle(x, 1) + 3
def other(x):
    return leaf(x, 1)
'''


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=1_000_000)
    ap.add_argument("--swaps", type=int, default=400)
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--readers", type=int, default=1)
    ap.add_argument("--audit-hook", action="store_true")
    ap.add_argument("--slow-hook", type=float, default=0.0, metavar="SECONDS",
                    help="the audit hook spins this long on every third __code__ store (as if the OS "
                         "preempted the patcher there for longer than a switch interval)")
    ap.add_argument("--blocking-hook", type=float, default=0.0, metavar="SECONDS",
                    help="the audit hook keeps the thread off the CPU this long, holding the GIL, on every third "
                         "__code__ store (as the OS descheduling the patcher there does)")
    ap.add_argument("--handoff", action="store_true",
                    help="always commit after a GIL handoff, never in one C-level call")
    ap.add_argument("--switch-interval", type=float, default=0.001)
    ap.add_argument("--timeout", type=float, default=30.0, help="each apply's and rollback's timeout")
    ap.add_argument("--naive", action="store_true",
                    help="swap with a plain Python loop instead of the engine (shows the test can fail)")
    args = ap.parse_args()

    hook_events = [0]
    if args.audit_hook:
        spin = args.slow_hook
        clock = time.perf_counter
        # usleep through ctypes.PyDLL blocks the thread without releasing the GIL
        usleep = ctypes.PyDLL(None).usleep if args.blocking_hook else None
        block_us = int(args.blocking_hook * 1e6)

        def hook(event, hook_args):  # Python code inside every __code__ store
            if event == "object.__setattr__":
                hook_events[0] += 1
                if hook_args[1] == "__code__" and hook_events[0] % 3 == 0:
                    if usleep is not None:
                        usleep(block_us)
                    end = clock() + spin
                    while clock() < end:
                        pass
        sys.addaudithook(hook)
    sys.setswitchinterval(args.switch_interval)

    import livepatch
    from livepatch.build import patch_from_source
    if args.handoff:
        livepatch.commit.ONE_CALL_ENABLED = False

    workdir = tempfile.mkdtemp()
    with open(os.path.join(workdir, "stressmod.py"), "w") as fh:
        fh.write(OLD)
    sys.path.insert(0, workdir)
    import stressmod as m

    funcs = (m.leaf, m.middle, m.top, m.other)
    old_codes = tuple(f.__code__ for f in funcs)
    patch = patch_from_source("STRESS", "stressmod", NEW, base_source=OLD)
    stop = threading.Event()
    counts = {"calls": 0, "torn_calls": 0, "snapshots": 0, "torn_snapshots": 0}
    lock = threading.Lock()

    def worker():
        calls = torn = 0
        top, other = m.top, m.other
        while not stop.is_set():
            for i in range(1000):
                try:
                    r = top(i)
                    r2 = other(i)
                except TypeError:
                    torn += 1
                    continue
                if r != (i + 1) * 2 + 3 or r2 != i + 1:
                    torn += 1
                # time outside the targets, as in a real service; without it
                # some worker is always inside a target and no safe point exists
                for _ in range(8):
                    pass
            calls += 2000
        with lock:
            counts["calls"] += calls
            counts["torn_calls"] += torn

    code_type = type(main.__code__)
    referents = __import__("gc").get_referents

    def snapshot():
        # One C-level call. Reading f.__code__ would fire an audit event per
        # function (running the hook's Python code between the reads), so the
        # snapshot itself could tear; get_referents audits once, before.
        return tuple(o for o in referents(*funcs) if type(o) is code_type)

    def reader():
        n = torn = 0
        new_codes = None
        while not stop.is_set():
            snap = snapshot()
            n += 1
            if snap != old_codes:
                if new_codes is None and all(c is not o for c, o in zip(snap, old_codes)):
                    new_codes = snap
                if snap != new_codes:
                    torn += 1
        with lock:
            counts["snapshots"] += n
            counts["torn_snapshots"] += torn

    threads = [threading.Thread(target=worker) for _ in range(args.workers)]
    threads += [threading.Thread(target=reader) for _ in range(args.readers)]
    for t in threads:
        t.start()
    swaps = 0
    pauses = []
    methods = {}
    interrupted = 0  # commits whose outcome names threads that ran inside them
    started = time.monotonic()
    try:
        new_codes = [next(c.new_code for c in patch.changes if c.target.endswith(":" + f.__name__)) for f in funcs]
        while True:
            if args.naive:
                for codes in (new_codes, old_codes):
                    for f, c in zip(funcs, codes):
                        f.__code__ = c
                    time.sleep(0.0005)
                pauses += [0, 0]
            else:
                for result in (livepatch.apply(patch, timeout=args.timeout), livepatch.rollback(timeout=args.timeout)):
                    pauses.append(result.pause_ns)
                    interrupted += bool(result.interrupted_by)
                    methods[result.method] = methods.get(result.method, 0) + 1
            swaps += 2
            if swaps >= args.swaps:
                # workers publish their counts only at the end: estimate from time
                if time.monotonic() - started > 1.0 and _enough(counts, args, stop, threads, lock):
                    break
    finally:
        stop.set()
        for t in threads:
            t.join()
    status = livepatch.status()
    pauses.sort()
    print(json.dumps({
        "python": sys.version.split()[0],
        "audit_hook": args.audit_hook,
        "hook_events": hook_events[0],
        "swaps": swaps,
        "commit_methods": methods,
        **counts,
        "pause_p50_ns": pauses[len(pauses) // 2],
        "pause_max_ns": pauses[-1],
        "interrupted_commits": interrupted,
        "warnings": status["warnings"],
        "elapsed_s": round(time.monotonic() - started, 2),
    }))


def _enough(counts, args, stop, threads, lock):
    """Stop the workers, read their counts; restart them if too few calls."""
    stop.set()
    for t in threads:
        t.join()
    if counts["calls"] >= args.calls:
        return True
    stop.clear()
    for i, t in enumerate(threads):
        threads[i] = threading.Thread(target=t._target)
        threads[i].start()
    return False


if __name__ == "__main__":
    main()
