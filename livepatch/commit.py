"""The commit: the final activeness check and every store of a transition in
one critical section that no other Python thread can enter, all or nothing.

Why this holds under the GIL (CPython 3.11-3.13, `Python/ceval_gil.c`):

* Another thread only runs when the holder drops the GIL: voluntarily (a
  blocking call) or at an eval-breaker check after a waiting thread set a
  drop request. A waiter sets that request when one wait iteration (as long
  as the switch interval in force when it started) ends with no GIL switch
  since it started. A switch is counted only when the GIL changes hands:
  dropping and re-taking it with nobody in between counts nothing, so a
  waiter that has waited all along may ask at any moment.
* We therefore `time.sleep(0)` until another thread has actually run in
  between (its top frame or instruction moved; a waiting thread is woken by
  each drop and nearly always wins within a try or two; if none moves after
  a few tries, no thread is waiting for the GIL). Right after such a
  switch, every wait iteration is either stale (started before it: no
  request) or started after it (at least one switch interval away). The
  interval is then raised so iterations starting later wait long.
* The check (Python code) runs inside that window. If it finishes too late
  (the OS preempted this thread for half an interval), the attempt is
  abandoned before any store and retried. The stores are issued by one
  C-level call (`list(starmap(call, ops))`), so no bytecode of ours runs
  between them: without audit hooks nothing can switch there at all; with
  a Python audit hook, whose code runs inside every `__code__` store, the
  window guarantees no drop request unless the OS preempts this thread for
  half an interval inside those few microseconds.
* Everything is restored and the GIL handed over at the end (a last
  `sleep(0)`) so waiters do not sit out the long interval. HOLD_INTERVAL is
  short: a waiter whose iteration starts inside the window is deaf to the
  holder for that long afterwards.
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

# Longer than any realistic commit; restored immediately afterwards.
HOLD_INTERVAL = 0.05
# sleep(0) tries to see another thread run before the window (see above)
HANDOFF_TRIES = 4
PREEMPTED = "the committing thread was preempted before its stores (the machine is overloaded)"
_call = operator.call


@dataclass
class Outcome:
    committed: bool
    pause_ns: int = 0
    blocker: object = None  # what the final check found, when not committed
    frames: dict = field(default_factory=dict)  # the frames the check saw
    interrupted_by: list = field(default_factory=list)  # threads that ran inside
    window_ns: tuple = (0, 0)  # perf_counter_ns at the start and end of the section


_lasti = operator.attrgetter("f_lasti")


def _positions(frames_map: dict) -> dict:
    # C-level maps: this runs inside the pause, right after a GIL handoff,
    # when every cache is cold
    frames = frames_map.values()
    return dict(zip(frames_map, zip(map(id, frames), map(_lasti, frames))))


def _fresh_switch(me: int):
    """sleep(0) until another thread ran in between (see the module notes);
    returns the frames seen right after and the time of the acquisition."""
    seen = _positions(sys._current_frames())
    seen.pop(me, None)
    for _ in range(HANDOFF_TRIES):
        time.sleep(0)
        start = time.perf_counter_ns()
        frames = sys._current_frames()
        now = _positions(frames)
        now.pop(me, None)
        if not now or now != seen:
            break
    return frames, start


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
        before, start = _fresh_switch(me)
        sys.setswitchinterval(HOLD_INTERVAL)
        cpu_start = time.thread_time_ns()
        blocker = check(before)
        if blocker is None and time.perf_counter_ns() - start > interval * 5e8:
            blocker = PREEMPTED
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
