"""The commit: the final activeness check and every store of a transition in
one critical section that no other Python thread can enter, all or nothing.

Why this holds under the GIL (CPython 3.11-3.13, `Python/ceval_gil.c`):

* Another thread only runs when the holder drops the GIL: voluntarily (a
  blocking call) or at an eval-breaker check after a waiting thread set a
  drop request. A waiter sets that request only after a full switch interval
  passes *with no GIL switch in between*, and each wait iteration re-reads
  the interval. So right after this thread (re)acquires the GIL, no drop
  request can exist for at least one interval.
* We therefore start with `time.sleep(0)` (drop and re-take the GIL), then
  raise the switch interval so waiters starting a new iteration wait long.
  The check and the stores, tens of microseconds for typical patches, then
  run inside that fresh window: even the Python code of the check, and the
  Python code of any audit hook that fires on a `__code__` store, meet no
  drop request. Everything is restored and the GIL handed over at the end
  (a second `sleep(0)`) so waiters do not sit out the long interval.
* The stores are issued by one C-level call (`deque(starmap(call, ops))`),
  so no bytecode of ours runs between them either.
* The garbage collector is disabled and every replaced value stays
  referenced by the undo list, so no finalizer runs inside the section.
* What we cannot prevent is code inside the section that releases the GIL
  itself (an audit hook doing I/O, for example), or the OS descheduling this
  thread for longer than a switch interval inside it. We detect it: the top frame
  and instruction of every other thread are compared before the check and
  after the stores; any thread that moved ran during the commit, and the
  outcome says which, so the status can report it.

A store that fails midway is undone (in reverse, inside the same section)
before the error is raised, so a failed commit leaves everything as it was."""

from __future__ import annotations

import gc
import operator
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from itertools import starmap

from .errors import CommitFailed, Problem

# Long enough that no waiter asks for the GIL during any realistic commit;
# restored immediately afterwards.
HOLD_INTERVAL = 1.0
_call = operator.call


@dataclass
class Outcome:
    committed: bool
    pause_ns: int = 0
    blocker: object = None  # what the final check found, when not committed
    frames: dict = field(default_factory=dict)  # the frames the check saw
    interrupted_by: list = field(default_factory=list)  # threads that ran inside
    window_ns: tuple = (0, 0)  # perf_counter_ns at the start and end of the section


def _positions(frames_map: dict) -> dict:
    return {tid: (id(f), f.f_lasti) for tid, f in frames_map.items()}


def run(ops: list, undo: list, check) -> Outcome:
    """Run `check(frames_map)`; if it returns None, issue every op of `ops`
    (tuples `(callable, *args)`), all inside one critical section.

    `undo[i]` reverses `ops[i]`. Returns an Outcome; raises CommitFailed,
    with everything restored, if a store fails."""
    me = threading.get_ident()
    interval = sys.getswitchinterval()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        time.sleep(0)  # fresh GIL acquisition: a full interval with no drop request
        sys.setswitchinterval(HOLD_INTERVAL)
        start = time.perf_counter_ns()
        cpu_start = time.thread_time_ns()
        before = sys._current_frames()
        blocker = check(before)
        if blocker is not None:
            end = time.perf_counter_ns()
            return Outcome(False, end - start, blocker, before, window_ns=(start, end))
        # The snapshot of thread positions after the stores is taken by the
        # same C-level call, so a switch after the last store (harmless) is
        # not mistaken for one inside the commit.
        pending = iter(ops + [(sys._current_frames,)])
        try:
            after = list(starmap(_call, pending))[-1]
        except BaseException as exc:
            done = len(ops) - operator.length_hint(pending)  # stores that took effect
            _undo(undo[:done])
            raise CommitFailed(
                "a store failed inside the commit; all earlier stores were undone",
                [Problem("commit-failed", "", f"{type(exc).__name__}: {exc}")],
            ) from exc
        end = time.perf_counter_ns()
        off_cpu = (end - start) - (time.thread_time_ns() - cpu_start)
    finally:
        sys.setswitchinterval(interval)
        if gc_was_enabled:
            gc.enable()
        time.sleep(0)  # hand the GIL over now, not after the long interval
    was, now = _positions(before), _positions(after)
    moved = sorted(tid for tid in was.keys() | now.keys() if tid != me and was.get(tid) != now.get(tid))
    # A thread spinning in a tight loop may stop at the same instruction
    # again; being off the CPU for half a switch interval also means others
    # could have run, so that counts too (reported as thread id 0 if alone).
    if not moved and off_cpu > interval * 1e9 / 2:
        moved = [tid for tid in was if tid != me] or [0]
    return Outcome(True, end - start, None, before, moved, (start, end))


def _undo(undo_ops: list) -> None:
    deque(starmap(_call, reversed(undo_ops)), maxlen=0)
