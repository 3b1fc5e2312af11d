"""The commit: the final activeness check and every store of a transition in
one critical section that no other Python thread can enter, all or nothing.

Two ways to get there. Both leave everything as it was if a store fails.

In one C-level call (`OneCall`), used whenever it is safe:

* Another Python thread can only run when this one drops the GIL, and it
  drops it only at an eval-breaker check in bytecode or inside C code that
  releases it on purpose (blocking I/O). So the check and the stores are
  composed from C-level iterators (`chain`, `map`, `starmap`) and consumed
  by one `list()` call: no bytecode runs between the check and the last
  store, whatever the switch interval or the OS scheduler does. No GIL
  handoff is needed, so the call runs as soon as this thread holds the GIL,
  not after queueing for it twice with its memory going cold meanwhile.
* Unless Python code runs inside that call. An audit hook is called by
  every `__code__` store and by `sys._current_frames`, and one written in
  Python runs bytecode there (profilers cannot see it: hooks run with
  tracing off). So the call begins with `sys.audit(0)`, which raises
  TypeError only when some audit hook is installed (with none, CPython
  returns before looking at the event); the commit then goes the second
  way. The caller also sends it the second way when a store would run
  Python code (a module class with its own `__setattr__`, a metaclass) or
  the check needs Python code (generator targets: see `young_suspended`).
  The garbage collector is off, and every replaced value stays referenced,
  so no finalizer runs inside.
* The check: every thread's top frame either is a frame the caller's scan
  proved clean, or is not a target and was called by such a frame (one
  call since the scan: its caller is still running, so the chain below is
  the proven one; this also covers a generator frame, never proven itself).
  `set` operations and `attrgetter` maps, no bytecode; the per-frame part
  runs only if some top frame is not proven (the committing thread's own
  frame is, see `attempt`). Otherwise the attempt is STALE: the caller
  rescans, or walks the stacks after a handoff.
* A store that fails is rewound by the first call in the exception handler
  (the eval breaker is checked only after a call returns, at backward
  jumps and at function entry, none of which lies before it), undoing
  exactly the stores that took effect (each sets a different attribute, so
  the order does not matter).
* The caller scans every stack; the attempt builds the call, reads ahead
  what the call will touch, and makes the call, without leaving the GIL
  (each sleep there cost the apply a wait behind every busy thread, for
  no shorter stall: YIELD_AROUND_ONE_CALL). A thread that ran meanwhile
  usually passes the check; if not, the caller rescans.
* The check also compares the refcount of every target code with the one
  read when the located functions were last known complete (`holders`):
  a function made from old code since, a new generator, anything that
  took a reference, makes the attempt CHANGED, and the caller adds what
  is new (`locate.young_snapshot`) before trying again.

After a GIL handoff (`run`), when the first way cannot be used, the reasoning
is this (`Python/ceval_gil.c`):

* Another thread only runs when the holder drops the GIL: voluntarily (a
  blocking call) or at an eval-breaker check after a waiting thread set a
  drop request. A waiter sets that request when one wait iteration (as long
  as the switch interval in force when it started) ends with no GIL switch
  since it started. A switch is counted only when the GIL changes hands:
  dropping and re-taking it with nobody in between counts nothing, so a
  waiter that has waited all along may ask at any moment.
* So the critical section starts right after a switch that is certain: this
  thread blocks on a lock that only a helper thread releases, and the
  helper needs the GIL to release it. When this thread takes the GIL back,
  it takes it from another thread: every wait iteration that started
  earlier is void. The interval is raised in the same C-level call that
  takes the GIL back, so iterations starting later wait long. (The handoff
  costs latency while threads queue for the GIL, none inside the section;
  confirming a switch instead by watching other threads' frames move after
  `sleep(0)` costs ~40 us of cold reads inside it.)
* Except iterations that start while this thread is taking the GIL back: a
  waiter woken when the helper let go of it, or a thread just forced to
  give it up, tries again at once and can read the interval in force
  before this thread has set the long one (the OS often runs the woken
  thread first). So the helper sets a longer interval before it lets go:
  COVER times the old one, or HOLD_INTERVAL when Python code runs inside
  the stores. Every wait iteration that begins after this thread took the
  GIL back lasts at least that long, and every one that began earlier is
  void: no thread asks for the GIL for that long, whatever the OS did to
  this thread meanwhile.
* That matters only when Python code runs inside the stores (an audit
  hook, a Python `__setattr__`): then the section must end, undoing
  included, within a quarter of HOLD_INTERVAL. The clock is read after every
  store, in the same C-level loop, and past the deadline the stores are
  undone and the attempt retried (LATE); unless other threads may already
  have run amid them (see below), when undoing would tear a second time:
  the stores are then finished and the commit reported. Measured with an
  audit hook spinning 0.8 ms on every third store (switch interval 1 ms,
  40 commits): before, 537,493 torn calls and 6 commits with other threads
  inside; after, none. With COVER intervals only (4 ms here), the OS
  descheduling this thread for a few ms inside a slow hook opened the
  window on a loaded machine (84,333 torn calls in 10 commits beside
  `pytest -n 2`); a hook keeping this thread off the CPU for 8 ms on every
  third store, holding the GIL, tore 290,888 calls in 10 commits then, and
  none with HOLD_INTERVAL (tests/test_stress.py runs both hooks).
* The check (Python code) runs inside that window. If it finishes too late
  (the OS preempted this thread for half an interval), the attempt is
  abandoned before any store and retried. The stores are issued by one
  C-level call (`list(starmap(call, ops))`), so no bytecode of ours runs
  between them: without audit hooks nothing can switch there at all; with
  a Python audit hook, whose code runs inside every `__code__` store, no
  thread asks for the GIL unless one store alone outlasts the time left,
  or the OS preempts this thread that long inside it.
* Everything is restored at the end and this thread sleeps briefly, long
  enough for a waiting thread to take the GIL, so waiters neither sit out
  the long interval nor wait for the caller's bookkeeping. HOLD_INTERVAL is
  short: a waiter whose iteration starts inside the window is deaf to the
  holder for that long afterwards.
* The garbage collector is disabled and every replaced value stays
  referenced by the undo list, so no finalizer runs inside the section.
* What we cannot prevent is code inside the section that releases the GIL
  itself (an audit hook doing I/O, for example), or a single store, or the
  OS descheduling this thread, outlasting the time left inside it. We detect it: any
  thread whose top frame changed between the check and the end of the
  stores ran in between, and so may any other thread if this one was off
  the CPU inside the section for longer than a GIL handoff takes (it had to
  wait for the GIL back). The outcome names them, so the status reports it.

A store that fails midway is undone (in reverse, inside the same section)
before the error is raised, so a failed commit leaves everything as it was."""

from __future__ import annotations

import gc
import operator
import queue
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from itertools import chain, repeat, starmap, tee
from operator import attrgetter, itemgetter

from . import atfork
from .errors import CommitFailed, Problem

# Longer than any realistic commit; restored immediately afterwards.
HOLD_INTERVAL = 0.05
# Switch interval (times the one in force) from the helper letting go of the
# GIL until this thread takes it back: see _Handoff.switch.
COVER = 4
# How long to leave the GIL before a commit and after it: a woken waiter
# takes it well within this, instead of this thread re-taking it.
RELEASE_SLEEP = 1e-4
# Give up one attempt if the helper thread cannot get the GIL for this long.
HANDOFF_TIMEOUT = 2.0
# Off the CPU inside the section for longer than this: the GIL may have been
# lost (a handoff and back costs more than this); shorter is the OS.
OFF_CPU_SUSPECT_NS = 200_000
PREEMPTED = "the committing thread was preempted before its stores (the machine is overloaded)"
LATE = "the stores ran past the time no other thread can ask for the GIL (slow audit hook or __setattr__?); undone"
NO_HANDOFF = "the helper thread did not get the GIL within the handoff timeout (too many threads queued for it)"
STALE = "a thread ran more than one call deep since its stack was scanned"
CHANGED = "something came to hold (or let go of) a target's code since it was located"
HOOKED = "an audit hook is installed: its code could run inside the stores"
# False: always commit after a GIL handoff (`run`), never in one call.
ONE_CALL_ENABLED = True
# True: leave the GIL just before the one call and just after it. Measured
# with 4 and 16 busy threads (benchmarks/stall.py), each sleep costs the apply
# a wait for the GIL behind them (tens of ms) and shortens no worker's stall.
YIELD_AROUND_ONE_CALL = False
ONE_CALL = "one call"
AFTER_HANDOFF = "after handoff"
_CLEAN = {True: None}  # _CLEAN[False] raises KeyError: a check failed
_ALL_PROVEN = tuple  # what is left to check when every top frame is proven: nothing
_SAME_HOLDERS = {0: None}  # a refcount difference other than 0 raises KeyError(difference): CHANGED
_ON_TIME = {True: None}  # _ON_TIME[False] raises KeyError: past the deadline
_second = itemgetter(1)
_codes = partial(map, attrgetter("f_code"))
_ids = partial(map, id)
_callers = partial(map, attrgetter("f_back"))
_call = operator.call


@dataclass
class Outcome:
    committed: bool
    pause_ns: int = 0  # GIL held for the commit: the one call, or from taking it after the handoff to handing it back
    blocker: object = None  # what the final check found, when not committed
    frames: dict = field(default_factory=dict)  # the frames the check saw
    interrupted_by: list = field(default_factory=list)  # threads that ran inside
    window_ns: tuple = (0, 0)  # perf_counter_ns at the start and end of pause_ns
    critical_ns: int = 0  # of which the final check plus the stores
    method: str = AFTER_HANDOFF


class _Handoff:
    """A helper thread that takes the GIL between two holds of the caller:
    `switch()` returns (holding the GIL again) only after the helper ran."""

    def __init__(self):
        self._requests = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="livepatch-handoff", daemon=True)
        self._thread.start()
        self.ident = self._thread.ident  # blocked on the queue outside switch(): never "ran inside"

    def _serve(self):
        get, set_interval = self._requests.get, sys.setswitchinterval
        while True:
            done, intervals, abandoned = get()
            # One C-level call: the caller may have given up waiting (then the
            # old interval stays), and cannot do so in the middle of this.
            deque(map(set_interval, map(intervals.__getitem__, map(len, (abandoned,)))), maxlen=0)
            done.release()  # needs the GIL: this is the switch

    def switch(self, timeout: float, then_interval: float, interval: float, cover: float) -> bool:
        """Returns holding the GIL, taken back from another thread, with the
        switch interval set to `then_interval` (also if it timed out; the
        caller restores it), and says whether it was taken back in time.
        `interval`: the one in force until now; `cover`: the one the helper
        sets before it lets go of the GIL."""
        # a fresh lock per switch: a late release after a timeout is harmless
        done, abandoned = threading.Lock(), []
        done.acquire()
        self._requests.put((done, (cover, interval), abandoned))
        # The GIL is taken back inside acquire(); the interval is set by the
        # next call of the same C-level loop, with no bytecode in between,
        # so a thread that starts waiting for the GIL from then on waits
        # `then_interval` before it asks for it.
        took, _ = starmap(_call, ((done.acquire, True, timeout), (sys.setswitchinterval, then_interval)))
        if not took:
            abandoned.append(True)
        return took


_handoff = None
_handoff_lock = threading.Lock()
# (switch interval, GC was enabled) while run() has changed them: a child
# forked meanwhile (possible while this thread waits for the handoff)
# restores them, since the thread that would have is not in it.
_changed = None


def _the_handoff() -> _Handoff:
    global _handoff
    with _handoff_lock:
        if _handoff is None:
            _handoff = _Handoff()
        return _handoff


def _forget_handoff_in_child():
    global _handoff, _handoff_lock, _changed
    _handoff, _handoff_lock = None, threading.Lock()  # the helper thread did not survive fork
    if _changed is not None:
        interval, gc_was_enabled = _changed
        _changed = None
        sys.setswitchinterval(interval)
        if gc_was_enabled:
            gc.enable()


atfork.on_child_reset(_forget_handoff_in_child)


class OneCall:
    """The one-call commit of one transition's `ops` (see the module notes);
    `undo[i]` reverses `ops[i]`. Built once, before the attempts."""

    def __init__(self, ops: list, undo: list):
        self._undo = undo
        self._done = []  # one mark per store that took effect
        self._began = []  # non-empty once the check passed and the stores began
        self._steps = [(self._began.append, True)]
        mark = (self._done.append, None)  # one shared tuple: nothing cold to touch per store
        for op in ops:
            self._steps += (op, mark)
        # Everything a store reads or writes besides shared objects: the op
        # tuples, the owners, the values stored and the values they replace.
        self._touched = (self._steps, [op[1] for op in ops], [op[-1] for op in ops],
                         [op[-1] for op in undo])

    @staticmethod
    def fits(ops: list) -> bool:
        """Every op sets a different attribute: then undoing the stores that
        took effect in any order restores the state before the commit."""
        return len({(id(op[1]), op[2]) for op in ops}) == len(ops)

    def attempt(self, proven: set, code_ids, *, new_slice: bool = True, holders=None) -> Outcome:
        """Check every thread's stack against the scan that proved `proven`
        clean and issue every op, all inside one C-level call; `code_ids`
        are the targets that may not be running. Call it from the frame
        that scanned: this frame is then one call above a proven one.
        `new_slice`: leave the GIL first, so the call starts a GIL slice
        (only with YIELD_AROUND_ONE_CALL). `holders`: (codes, refcounts
        read by `locate.young_snapshot`); a code whose refcount differs
        inside the call gained or lost a holder since (blocker CHANGED).

        Not committed (blocker STALE, CHANGED or HOOKED): nothing changed;
        rescan, look for new holders, or go through `run`. Raises CommitFailed, with everything restored, if
        a store fails."""
        me = threading.get_ident()
        clock = time.perf_counter_ns
        done, began = self._done, self._began
        del done[:], began[:]
        # This frame is the committing thread's top frame inside the call.
        # Called by a proven frame and no target itself, it is proven too,
        # so on a quiet machine the check finds nothing to look into. Taken
        # out again below, so the caller's set holds no cycle.
        here = sys._getframe()
        trust_here = here.f_back in proven and id(here.f_code) not in code_ids
        if trust_here:
            proven.add(here)
        # Everything is built before the GIL is left: after it is taken back,
        # only the reads ahead and the call remain.
        # zip stops at the shorter: exactly the undo ops of the stores that took effect
        rewind = starmap(_call, map(_second, zip(done, self._undo)))
        tops, tops_too, tops_kept = tee(map(_call, repeat(sys._current_frames, 1)), 3)
        # Top frames the scan did not prove clean, if there are any: each must
        # not be a target, and must have been called by a proven frame (one
        # call since the scan). Built lazily; only run if some top is unproven.
        unproven, unproven_too = tee(map(proven.__rsub__, map(frozenset, map(dict.values, tops_too))))
        look_closer = chain(
            map(_CLEAN.__getitem__, map(code_ids.isdisjoint, map(_ids, map(_codes, unproven)))),
            map(_CLEAN.__getitem__, map(proven.issuperset, map(_callers, unproven_too))))
        then = {True: _ALL_PROVEN, False: partial(iter, look_closer)}
        codes, expected = holders or ((), ())
        section = chain(
            starmap(_call, ((sys.audit, 0), (clock,))),
            chain.from_iterable(map(_call, map(then.__getitem__, map(proven.issuperset, map(dict.values, tops))))),
            map(_SAME_HOLDERS.__getitem__, map(operator.sub, map(sys.getrefcount, codes), expected)),
            starmap(_call, self._steps),
            starmap(_call, ((clock,), (sys._current_frames,), (clock,))),
        )
        if new_slice and YIELD_AROUND_ONE_CALL:
            time.sleep(RELEASE_SLEEP)
        # After waiting for the GIL behind busy threads, everything the call
        # will touch is cold (a first touch costs ~0.5 us per cache line on a
        # shared machine). Read it ahead here, outside the section, where a
        # thread switch is harmless: the thread states, top frames and the
        # proven set once more, and every object a store touches. tuple()
        # increments each reference count in a tight C loop, so those misses
        # overlap instead of queueing one store after another in the section
        # (measured, 100 stores behind 16 busy threads: ~12 us here saves
        # ~20 us inside; reading every field a store uses costs more than it
        # saves).
        proven.issuperset(sys._current_frames().values())
        # Let go again before the call: it holds the replaced code objects,
        # whose refcounts the call compares (`holders`).
        warm = tuple(map(tuple, self._touched))
        del warm
        gc_was_enabled = gc.isenabled()
        gc.disable()  # a collection could run finalizers (Python code) inside
        failure = None
        try:
            try:
                out = list(section)
            except BaseException as exc:
                list(rewind)  # the first call in the handler: see the module notes
                failure = exc
        finally:
            if gc_was_enabled:
                gc.enable()
            if trust_here:
                proven.discard(here)
        # everything else runs after the section (`warm` is let go after the GIL)
        frames = next(tops_kept, {})
        # Nothing that outlives this call may hold this frame (or it would
        # hold the caller's frames, and what they hold, until a collection):
        # this thread is the one committing, the others are what counts.
        frames.pop(me, None)
        del tops, tops_too, tops_kept, unproven, unproven_too, look_closer, then, section, rewind, here
        if failure is not None:
            problems = [Problem("commit-failed", "", f"{type(failure).__name__}: {failure}")]
            if began:
                raise CommitFailed("a store failed inside the commit; all earlier stores were undone",
                                   problems) from failure
            if audit_hooks_installed():
                return Outcome(False, blocker=HOOKED, frames=frames, method=ONE_CALL)
            if isinstance(failure, KeyError) and failure.args == (False,):
                return Outcome(False, blocker=STALE, frames=frames, method=ONE_CALL)
            if isinstance(failure, KeyError) and type(failure.args[0]) is int:
                return Outcome(False, blocker=CHANGED, frames=frames, method=ONE_CALL)
            raise CommitFailed("the final check inside the commit failed; nothing was stored",
                               problems) from failure
        start, stored, after, end = out[1], out[-3], out[-2], out[-1]
        after.pop(me, None)
        del out
        if YIELD_AROUND_ONE_CALL:
            time.sleep(RELEASE_SLEEP)
        # Nothing inside can release the GIL (no audit hook, no Python code),
        # so a thread whose top frame changed is the only trace worth taking.
        return Outcome(True, end - start, None, frames, _ran_inside(frames, after, {me}, 0),
                       (start, end), stored - start, ONE_CALL)


def audit_hooks_installed() -> bool:
    """Whether any audit hook (Python or C) is installed. `sys.audit` returns
    before looking at its arguments when there is none, so a non-str event
    raises TypeError only when there is one (CPython 3.11-3.13)."""
    try:
        sys.audit(0)
    except TypeError:
        return True
    return False


def run(ops: list, undo: list, check, *, python_setattr: bool = False) -> Outcome:
    """Run `check(frames_map)`; if it returns None, issue every op of `ops`
    (tuples `(callable, *args)`), all inside one critical section.

    `undo[i]` reverses `ops[i]`. `python_setattr`: some store goes through
    a Python `__setattr__`; with that or an audit hook (checked here), Python
    code runs inside the stores, so the GIL could be asked for there.
    Returns an Outcome; raises CommitFailed, with everything restored, if a
    store fails."""
    global _changed
    me = threading.get_ident()
    interval = sys.getswitchinterval()
    gc_was_enabled = gc.isenabled()
    _changed = (interval, gc_was_enabled)
    gc.disable()
    handoff = _the_handoff()
    committed, start, end = False, 0, 0
    # The snapshot of top frames after the stores is taken by the same
    # C-level call, so a switch after the last store (harmless) is not
    # mistaken for one inside the commit. Built here, outside the section.
    ops_then_snapshot = ops + [(sys._current_frames,)]
    try:
        # Let threads that waited through the caller's preparation run first;
        # otherwise their pause would run on through the helper and the section.
        time.sleep(RELEASE_SLEEP)
        # Python code inside the stores (an audit hook, a Python __setattr__)
        # can lose the GIL to a thread that asked for it: then the window
        # nobody asks in is made as long as the held interval, so that the
        # OS descheduling this thread inside it must last tens of ms to open it.
        careful = python_setattr or audit_hooks_installed()
        cover = HOLD_INTERVAL if careful else min(HOLD_INTERVAL, COVER * interval)
        took = handoff.switch(HANDOFF_TIMEOUT, HOLD_INTERVAL, interval, cover)
        if not took:
            return Outcome(False, blocker=NO_HANDOFF)
        start = time.perf_counter_ns()  # the GIL was just taken from another thread
        # No thread asks for the GIL back before `cover` (see the module
        # notes). Python code inside the stores can lose it after that: the
        # section must end within a quarter of it, its undoing included.
        if careful:
            deadline = start + int(cover * 0.25e9)
        else:  # C stores cannot lose the GIL: only the check must end in time
            deadline = start + int(interval * 5e8)
        cpu_start = time.thread_time_ns()
        check_start = time.perf_counter_ns()
        frames = sys._current_frames()
        blocker = check(frames)
        checked = time.perf_counter_ns()
        if blocker is None and checked > deadline:
            blocker = PREEMPTED
        if blocker is None:
            pending = iter(ops_then_snapshot)
            stores = starmap(_call, pending)
            if careful:  # the clock is read after each store, in the same C-level loop
                stores = chain.from_iterable(zip(stores, map(_ON_TIME.__getitem__, map(
                    deadline.__gt__, map(_call, repeat(time.perf_counter_ns))))))
            try:
                after = list(stores)[-2 if careful else -1]  # the snapshot (a check follows it if careful)
            except BaseException as exc:
                late = isinstance(exc, KeyError) and exc.args == (False,) and time.perf_counter_ns() > deadline
                off_cpu = (time.perf_counter_ns() - start) - (time.thread_time_ns() - cpu_start)
                if late and _ran_inside(frames, (now := sys._current_frames()), {me, handoff.ident}, off_cpu):
                    # Other threads already ran amid the stores (a hook that
                    # releases the GIL): undoing would tear a second time.
                    # Finish instead, and report it like any interrupted commit.
                    try:
                        after = [now, *starmap(_call, pending)][-1]
                    except BaseException as failed:
                        _undo(undo[:_stores_done(pending, ops_then_snapshot, failed=True)])
                        raise _store_failed(failed) from failed
                else:
                    _undo(undo[:_stores_done(pending, ops_then_snapshot, failed=not late)])
                    if not late:
                        raise _store_failed(exc) from exc
                    blocker = LATE
            if blocker is None:
                stored = time.perf_counter_ns()
                off_cpu = (stored - start) - (time.thread_time_ns() - cpu_start)
                committed = True
    finally:
        sys.setswitchinterval(interval)
        if gc_was_enabled:
            gc.enable()
        _changed = None
        if start:
            end = time.perf_counter_ns()
        time.sleep(RELEASE_SLEEP)  # hand the GIL over now, not after the caller's bookkeeping
    # everything else is done after the GIL was handed over
    if not committed:
        return Outcome(False, end - start, blocker, frames, window_ns=(start, end))
    return Outcome(True, end - start, None, frames, _ran_inside(frames, after, {me, handoff.ident}, off_cpu),
                   (start, end), stored - check_start)


def _ran_inside(before: dict, after: dict, ours: set, off_cpu_ns: int) -> list:
    moved = sorted(tid for tid in before.keys() | after.keys()
                   if tid not in ours and before.get(tid) is not after.get(tid))
    # A thread spinning in one frame keeps its top frame; but if this thread
    # was off the CPU long enough to have waited for the GIL, any of them
    # may have run (reported as thread id 0 if there is no other thread).
    if not moved and off_cpu_ns > OFF_CPU_SUSPECT_NS:
        moved = [tid for tid in before if tid not in ours] or [0]
    return moved


def _undo(undo_ops: list) -> None:
    deque(starmap(_call, reversed(undo_ops)), maxlen=0)


def _stores_done(pending, ops_then_snapshot: list, failed: bool) -> int:
    """How many stores took effect: all taken from `pending` (the ops, then
    the snapshot), except the last if it `failed`; never the snapshot."""
    taken = len(ops_then_snapshot) - operator.length_hint(pending)
    return min(len(ops_then_snapshot) - 1, taken - failed)


def _store_failed(exc: BaseException) -> CommitFailed:
    return CommitFailed("a store failed inside the commit; all earlier stores were undone",
                        [Problem("commit-failed", "", f"{type(exc).__name__}: {exc}")])
