"""Safe points: is any target running on a thread's stack or suspended in a
generator, coroutine or async generator?

Three speeds. `scan_stacks` walks every thread's whole `f_back` chain before
the critical section and returns the frames it proved clean; `first_busy`
is the cheap yes/no inside the section after a GIL handoff, which only walks
down to the first of those frames (usually a thread's top frame; the
one-call commit in `commit.py` asks the same with set operations, one frame
deep); `describe` is the slow, human-readable report used only when giving
up.

Why stopping at a proven frame is sound: while a plain function's frame is
running, the frames below it cannot change (its callers are all waiting
for it to return), so a frame that was clean with a clean chain below it
and is still on a stack still has that chain. A generator or coroutine
frame can be suspended and resumed from elsewhere, so it is never trusted.
The proven frames are held by reference for one attempt only, so no
address is reused by a new frame meanwhile."""

from __future__ import annotations

import gc
import inspect
import sys
import threading
import traceback
import types

from .locate import frame_code, suspended_frame

_SUSPENDABLE = (types.GeneratorType, types.CoroutineType, types.AsyncGeneratorType)
_RESUMABLE = inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR
NOTHING_PROVEN = frozenset([None])


def scan_stacks(frames_map: dict, code_ids) -> tuple[object, set]:
    """(first frame running one of `code_ids` or None, frames proven clean).
    The proven set always contains None (the end of every chain)."""
    proven = {None}
    for frame in frames_map.values():
        while frame is not None:
            if id(frame.f_code) in code_ids:
                return frame, NOTHING_PROVEN  # nothing is committed this attempt
            if not frame.f_code.co_flags & _RESUMABLE:
                proven.add(frame)
            frame = frame.f_back
    return None, proven


def first_busy(frames_map: dict, code_ids, proven=NOTHING_PROVEN) -> object:
    """The first frame found running one of `code_ids`, or None; walks each
    chain only down to a frame in `proven` (see the module notes).

    Kept minimal on purpose: it runs with every other thread held off."""
    if proven.issuperset(frames_map.values()):  # no thread ran since: one C-level call
        return None
    for frame in frames_map.values():
        while frame not in proven:
            if id(frame.f_code) in code_ids:
                return frame
            frame = frame.f_back
    return None


def first_suspended(objects, code_ids) -> object:
    for obj in objects:
        if type(obj) in _SUSPENDABLE and id(frame_code(obj)) in code_ids and suspended_frame(obj) is not None:
            return obj
    return None


def young_suspended(code_ids) -> object:
    """A suspended generator-like created since the last collection (the
    heap scan saw everything older). Only valid while gc stays disabled."""
    return first_suspended(gc.get_objects(0), code_ids)


def count_running(code_ids) -> int:
    """Frames on any stack still executing one of `code_ids` (transition)."""
    n = 0
    for frame in sys._current_frames().values():
        while frame is not None:
            if id(frame.f_code) in code_ids:
                n += 1
            frame = frame.f_back
    return n


def describe(frames_map: dict, suspended: list, code_ids, target_of: dict) -> list[dict]:
    """A report of every blocker: thread name and id with the stack lines
    that hold a target, and every suspended generator/coroutine."""
    names = {t.ident: t.name for t in threading.enumerate()}
    blockers = []
    for tid, top in frames_map.items():
        holding = []
        frame = top
        while frame is not None:
            if id(frame.f_code) in code_ids:
                holding.append(frame)
            frame = frame.f_back
        if not holding:
            continue
        stack = traceback.format_list(traceback.extract_stack(top))
        blockers.append({
            "kind": "thread",
            "thread_name": names.get(tid, "?"),
            "thread_id": tid,
            "targets": sorted({target_of.get(id(f.f_code), f.f_code.co_qualname) for f in holding}),
            "holding": [f"{f.f_code.co_filename}:{f.f_lineno} in {f.f_code.co_qualname}" for f in holding],
            "stack": [line.rstrip("\n") for line in stack],
        })
    for obj in suspended:
        frame = suspended_frame(obj)
        if frame is None:
            continue
        code = frame_code(obj)
        blockers.append({
            "kind": type(obj).__name__,
            "targets": [target_of.get(id(code), code.co_qualname)],
            "holding": [f"{code.co_filename}:{frame.f_lineno} in {code.co_qualname} (suspended)"],
        })
    return blockers
