"""One transition, from locating its targets to the commit: locate once,
prepare, then sample safe points in short bursts (each sample one attempt
at the commit, see commit.py) until one commits or the deadline passes.

Locating is the only work that grows with the heap, so it is done once per
transition (again only if someone collects or freezes by hand meanwhile).
What can change between locating and the commit is found without it:

* The collector stays off from before locating until the end, so every
  object made since is in the young generation. `locate.young_snapshot`
  reads the functions and generator-likes among them, together with the
  refcount of every target code, in one C-level call.
* A function made from a target's old code since (a closure, a copy, a
  re-run decorator), or a new generator running it, holds a reference to
  that code: each attempt, and the final check inside the commit, compare
  refcounts with the snapshot's; on a difference a fresh snapshot adds what
  is new (and the plan is made again when that includes functions). A
  frame running the code holds it too, so a snapshot's refcounts are kept
  only when the stacks were clean just before and just after it. Something
  else may hold a code too (a profiler, a reader of `__code__`): when the
  refcounts keep differing, the check after a GIL handoff, where Python may
  run, looks at the young functions itself, and commits when none is new.
* The heap walk (`heapwalk`) runs while other threads run: a function made
  meanwhile is young and found the same way.

The codes checked so are the ones that must not be running (not
`allow_active`, not `force`): a running frame holds its code too, so the
refcount of code that may run is no evidence."""

from __future__ import annotations

import gc
import sys
import time
from collections import Counter
from types import FunctionType

from . import commit as _commit
from .checks import code_kind
from .errors import Cancelled, Problem, TargetBusy
from .locate import HeapIndex, gc_counts, holders_unchanged, young_snapshot
from .safepoint import NOTHING_PROVEN, describe, first_busy, scan_stacks, young_suspended

HEAP_CHANGED = "heap changed during the attempt (a garbage collection ran)"
RUNNING = "a thread was running a target"
# How long to keep sampling for a safe point before backing off.
BURST_SECONDS = 0.25
# How long to let a thread seen running a target go on before looking again.
BUSY_PAUSE = 0.001
# Snapshots in a row that may each bring new functions before the plan is
# taken as it is (a service making closures of a target non-stop).
MAX_REPLANS = 8


class _Plan:
    """The ops of one plan and what the attempts check, built from an index."""

    def __init__(self, engine, build, heap, force, restore_defaults, plain_owner):
        self.switches, self.stores = build(heap)
        self.ops, self.undo, self.saved, self.functions = engine._make_ops(
            self.switches, self.stores, heap, restore_defaults)
        engine._in_flight = (self.ops, self.undo)
        self.busy_ids = {id(s.old) for s in self.switches if not (force or s.allow_active or s.implied)}
        codes = {id(s.old): s.old for s in self.switches if id(s.old) in self.busy_ids}
        self.codes = tuple(codes.values())  # whose refcounts the check compares
        self.gen_codes = [c for c in self.codes if code_kind(c) != "function"]
        self.gen_ids = {id(c) for c in self.gen_codes}
        self.python_setattr = not all(plain_owner(g.owner) for g in self.stores)
        self.one_call = (_commit.ONE_CALL_ENABLED and not self.gen_ids and not self.python_setattr
                         and not _commit.audit_hooks_installed() and _commit.OneCall.fits(self.ops))
        self.in_one_call = _commit.OneCall(self.ops, self.undo) if self.one_call else None


def run(engine, action, patch_id, build, modules, timeout, force, restore_defaults=None, cancelled=None, *,
        plain_owner):
    """(outcome, plan, attempts) of the committed transition; raises
    TargetBusy past the deadline, Cancelled when `cancelled()` says so.
    `plain_owner(owner)`: storing into it runs no Python code."""
    deadline = time.monotonic() + max(0.0, timeout)
    attempts = 0
    why_not = Counter()  # reason -> attempts it stopped: the message says what kept failing, not only the last
    backoff = 0.01
    outcome = None
    gc_was_enabled = gc.isenabled()
    engine._gc_owed = gc_was_enabled  # first: a child forked from here on enables it again
    gc.disable()  # every object made from here on stays young (see the module notes)
    heap = plan = None
    try:
        while True:
            if cancelled is not None and cancelled():
                raise Cancelled(f"{action} of {patch_id!r} cancelled by its client after {attempts} attempts; "
                                "nothing was changed")
            if heap is None:
                counts = gc_counts()
                heap, plan = HeapIndex.scan(modules), None
                counts = heap.take_counts(counts)  # a walk's own collections kept what they moved
                if counts is None:  # collected by hand during the walk
                    heap = None
                    continue
            expected, replans = None, 0
            while expected is None:
                if plan is None:
                    plan = _Plan(engine, build, heap, force, restore_defaults, plain_owner)
                young, expected, now = young_snapshot(plan.codes)
                if now != counts:
                    break
                if heap.add_young(young) and replans < MAX_REPLANS:
                    replans += 1
                    plan = expected = None
                del young
            if now != counts:  # collected or frozen by hand: objects left the young generation
                heap = plan = None
                continue
            added = heap.find_suspendables(plan.gen_codes)
            counts = heap.take_counts(counts)
            if counts is None:
                heap = plan = None
                continue
            if added:  # functions made during its walk: plan with them
                plan = None
                continue
            suspended = heap.suspended_in(plan.busy_ids)
            busy_ids, gen_ids = plan.busy_ids, plan.gen_ids
            proven = NOTHING_PROVEN

            def check(frames_map):
                found = first_busy(frames_map, busy_ids, proven)
                if found is None and not holders_unchanged(plan.codes, expected):
                    # Python may run here: look at what is young itself. A
                    # holder that is no function (a reader keeping `__code__`)
                    # does not stop the commit.
                    young, _, now = young_snapshot(plan.codes)
                    if now != counts:
                        return HEAP_CHANGED
                    known = {id(f) for f in heap.functions}
                    if any(type(f) is FunctionType and id(f.__code__) in busy_ids and id(f) not in known
                           for f in young):
                        return _commit.CHANGED
                if found is None and gen_ids:
                    if gc_counts() != counts:
                        return HEAP_CHANGED
                    found = young_suspended(gen_ids)
                return found

            one_call = plan.one_call
            holders = (plan.codes, expected)
            stale = changed = 0
            replan = False
            engine._in_flight = (plan.ops, plan.undo)
            burst_end = min(deadline, time.monotonic() + BURST_SECONDS)
            while not suspended:
                if cancelled is not None and attempts and cancelled():
                    break  # between attempts: raised at the top of the loop
                attempts += 1
                # Walk every stack now: the section then only checks what
                # changed since. A target seen running skips the section.
                frames = sys._current_frames()
                busy, proven = scan_stacks(frames, busy_ids)
                if busy is None and plan.codes and not holders_unchanged(plan.codes, expected):
                    # Something came to hold a target's code, or let go of it
                    # (a frame that ran it when the refcounts were read): read
                    # them again with what is young, and keep them if the
                    # stacks are clean on both sides of the reading.
                    young, refs, now = young_snapshot(plan.codes)
                    if now != counts or heap.add_young(young):
                        replan = now == counts
                        outcome = _commit.Outcome(False, blocker=_commit.CHANGED if replan else HEAP_CHANGED)
                        del frames, busy, young
                        break
                    del young
                    frames = sys._current_frames()
                    busy, proven = scan_stacks(frames, busy_ids)
                    if busy is None:
                        expected = refs
                        holders = (plan.codes, expected)
                tried_one_call = busy is None and one_call
                if tried_one_call:
                    # A thread that ran since the scan is usually at most one
                    # call deeper; if not (STALE), scan again and retry.
                    outcome = plan.in_one_call.attempt(proven, busy_ids, holders=holders)
                    if outcome.blocker is _commit.STALE:
                        frames = sys._current_frames()
                        busy, proven = scan_stacks(frames, busy_ids)
                        if busy is None:
                            outcome = plan.in_one_call.attempt(proven, busy_ids, new_slice=False, holders=holders)
                    if outcome.blocker is _commit.HOOKED:
                        one_call = False
                    elif outcome.blocker is _commit.CHANGED:
                        changed += 1
                        one_call = changed < 2  # then let the check after a handoff look at what is young
                    elif outcome.blocker is _commit.STALE:
                        stale += 1
                        one_call = stale < 2  # then walk the changed stacks after a handoff
                if busy is not None:
                    outcome = _commit.Outcome(False, blocker=busy, frames=frames)
                    time.sleep(BUSY_PAUSE)
                elif not tried_one_call:
                    outcome = _commit.run(plan.ops, plan.undo, check, python_setattr=plan.python_setattr)
                del frames, busy
                if not outcome.committed:
                    why_not[outcome.blocker if isinstance(outcome.blocker, str) else RUNNING] += 1
                proven = NOTHING_PROVEN  # frames are not kept alive past one attempt
                if outcome.committed or outcome.blocker is HEAP_CHANGED or time.monotonic() >= burst_end:
                    break
            if outcome is not None and outcome.committed:
                # The frames it saw include this one (the committing thread's
                # top frame is called from here): a cycle through this
                # frame's locals, the index among them, which would hold the
                # module namespaces until a collection (see locate's count).
                outcome.frames = {}
                return outcome, plan, attempts
            if outcome is not None and outcome.blocker is HEAP_CHANGED:
                heap = plan = None
            if replan and time.monotonic() < deadline:
                plan = None
                continue  # new functions run old code: plan again at once
            if cancelled is not None and cancelled():
                continue  # raised at the top of the loop
            if time.monotonic() >= deadline:
                target_of = {id(s.old): s.target for s in plan.switches} if plan else {}
                frames = outcome.frames if outcome else sys._current_frames()
                last_reason = outcome.blocker if outcome and isinstance(outcome.blocker, str) else None
                engine._in_flight = None
                blockers = describe(frames, suspended, busy_ids, target_of)
                problems = [Problem("busy", ", ".join(b["targets"]),
                                    (f"thread {b['thread_name']!r} (id {b['thread_id']}) is running it: "
                                     if b["kind"] == "thread" else f"a suspended {b['kind']} holds it: ")
                                    + "; ".join(b["holding"])) for b in blockers]
                if last_reason is not None or not problems:
                    # the last attempt's own reason comes first: threads found
                    # in targets now may not have been there when it checked
                    problems.insert(0, Problem("busy", "", last_reason or HEAP_CHANGED))
                tally = "; ".join(f"{n} {reason}" for reason, n in why_not.most_common())
                raise TargetBusy(f"no safe point for {patch_id!r} within {timeout:g}s after {attempts} attempts"
                                 + (f" ({tally})" if tally else ""),
                                 problems, blockers)
            engine._in_flight = None
            del suspended
            time.sleep(min(backoff, max(0.0, deadline - time.monotonic())))
            backoff = min(backoff * 2, 0.2)
    finally:
        if gc_was_enabled:
            gc.enable()
        engine._gc_owed = False
