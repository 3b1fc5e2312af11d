"""What the bounded heap walk finds while other threads move what it looks for.

The walk (`livepatch/heapwalk.py`) reads the heap in bounded steps while
other threads run. Objects made meanwhile are young and found from the
young generation; an object whose every reference moves, during the walk,
from a container the walk has not read yet into one it has already read is
not seen. This measures how often that happens where it is most likely,
with the engine's own locating:

* coroutines: an event loop in another thread runs N tasks, each suspended
  in a target coroutine awaiting a future that it puts, turn by turn, into
  one of two queues far apart in the walk (an attribute of a small module,
  and a list deep in a heap of extra objects); the loop resolves every
  future on each iteration, so each task moves between the queues all the
  time. Counted: the suspended coroutines `HeapIndex.find_suspendables`
  finds, which an apply waits for.
* functions: N closures of a target kept only in those two places, which a
  thread moves from one to the other and back without pause. Counted: the
  closures `HeapIndex.scan` finds, which an apply switches.

How each was located is counted too: by a walk whose result the namespace's
refcount proved complete, or by one pass after walks it could not prove
(`livepatch/walkproof.py`).

Control: one `gc.get_referrers` pass (a single C-level call, during which
nothing moves) over the same heap right after each walk must find all N.

Run: python benchmarks/walk_moves.py [--quick]"""

import argparse
import asyncio
import gc
import os
import sys
import textwrap
import threading
import time
import types
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import import_source, machine, summary, write_result  # noqa: E402

from livepatch.locate import HeapIndex  # noqa: E402

COROUTINES = textwrap.dedent("""
    async def handler(queues, loop):
        turn = 0
        while True:
            future = loop.create_future()
            queues[turn % 2].append(future)
            turn += 1
            await future
""")
FUNCTIONS = textwrap.dedent("""
    def make():
        def inner():
            return 1
        return inner
""")


class Far:
    """Two places the walk reads far apart: an attribute of a small module of
    its own (read early, from the modules) and a list in the middle of the
    extra heap (read after half of it)."""

    def __init__(self, heap: list, name: str, offset: int):
        self.near_module = import_source(name, "place = []\n")
        self.slot = heap[len(heap) // 2 + offset]  # one of the heap's empty lists, this case's own
        self.slot.append([])

    def places(self) -> tuple:
        return self.near_module.place, self.slot[-1]


def _walks(walks: int, locate, single_pass, events) -> dict:
    """Per walk: what the engine's locating found, what one get_referrers
    pass found right after, and how many moves the other thread made
    meanwhile."""
    found, control, moved, seconds, located = [], [], [], [], Counter()
    for _ in range(walks):
        before = events[0]
        start = time.perf_counter()
        gc.disable()  # as a transition does: what is made meanwhile stays young
        try:
            count, how = locate()
        finally:
            gc.enable()
        found.append(count)
        located[how] += 1
        seconds.append(time.perf_counter() - start)
        moved.append(events[0] - before)
        control.append(single_pass())
    return {"found": summary(found), "found_min": min(found),
            "single_pass_found": summary(control), "single_pass_found_min": min(control),
            "walks_that_missed_some": sum(f < c for f, c in zip(found, control)),
            "moves_during_a_walk": summary(moved), "walk_seconds": summary(seconds), "located": dict(located)}


def coroutines(heap: list, n: int, walks: int) -> dict:
    module = import_source("lp_moves_coroutines", COROUTINES)
    code = module.handler.__code__
    queues = Far(heap, "lp_moves_near_coroutines", 0)
    events, ready = [0], threading.Event()

    def serve():
        loop = asyncio.new_event_loop()
        near_module, slot = queues.near_module, queues.slot

        async def main():
            for _ in range(n):  # the tasks are held by their futures and the loop only
                loop.create_task(module.handler(queues.places(), loop))
            ready.set()
            while not stop.is_set():
                for queue in (near_module.place, slot[-1]):
                    for _ in range(len(queue)):
                        queue.pop().set_result(None)
                await asyncio.sleep(0)
                events[0] += 1
            handlers = asyncio.all_tasks() - {asyncio.current_task()}
            for task in handlers:
                task.cancel()
            await asyncio.gather(*handlers, return_exceptions=True)
        loop.run_until_complete(main())
        loop.close()

    stop = threading.Event()
    server = threading.Thread(target=serve, daemon=True, name="event loop")
    server.start()
    ready.wait()
    time.sleep(0.2)

    def locate():
        index = HeapIndex.scan([module.__name__])
        index.find_suspendables([code])
        return len(index.suspended_in({id(code)})), "walk for generator-likes" if index.walked else index.located

    def single_pass():
        return sum(type(o) is types.CoroutineType and o.cr_frame is not None for o in gc.get_referrers(code))
    try:
        return dict(_walks(walks, locate, single_pass, events), suspended=n)
    finally:
        stop.set()
        server.join()


def functions(heap: list, n: int, walks: int) -> dict:
    module = import_source("lp_moves_functions", FUNCTIONS)
    places = Far(heap, "lp_moves_near_functions", 1)
    near, far = places.places()
    near += [module.make() for _ in range(n)]
    code = near[0].__code__
    events = [0]

    def move():
        while not stop.is_set():
            source, target = (near, far) if near else (far, near)
            while source:
                target.append(source.pop())
            events[0] += 1

    stop = threading.Event()
    mover = threading.Thread(target=move, daemon=True, name="mover")
    mover.start()

    def locate():
        index = HeapIndex.scan([module.__name__])
        return len(index.functions_using(code)), index.located

    def single_pass():
        return sum(type(o) is types.FunctionType for o in gc.get_referrers(code))
    try:
        return dict(_walks(walks, locate, single_pass, events), closures=n)
    finally:
        stop.set()
        mover.join()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small heap and two walks each, for the test suite")
    ap.add_argument("--heap", type=int, default=300_000, help="extra heap objects")
    ap.add_argument("--walks", type=int, default=20, help="walks per case")
    ap.add_argument("-n", type=int, default=50, help="coroutines, and closures, that move")
    ap.add_argument("--case", choices=("coroutines", "functions"), action="append",
                    help="only this case (repeatable; default both)")
    args = ap.parse_args()
    if args.quick:
        args.heap, args.walks, args.n = 30_000, 2, 10
    heap = [[] for _ in range(args.heap)]
    gc.collect()
    out = {"machine": machine(), "heap_objects": args.heap, "tracked_objects": len(gc.get_objects())}
    for name, case in (("coroutines", coroutines), ("functions", functions)):
        if args.case and name not in args.case:
            continue
        out[name] = row = case(heap, args.n, args.walks)
        print(f"{name}: {args.n} moving, {row['walks_that_missed_some']} of {args.walks} walks missed some "
              f"(found p50 {row['found']['p50']}, min {row['found_min']}; one get_referrers pass found "
              f"min {row['single_pass_found_min']}); moves during a walk p50 {row['moves_during_a_walk']['p50']:,}, "
              f"walk p50 {row['walk_seconds']['p50']:.2f} s; located: {row['located']}", flush=True)
    path = write_result("walk_moves", out, args.quick)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
