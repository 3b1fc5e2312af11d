"""Who holds a patch's targets right now: the report `assess` gives next to
whether the baseline matches, so an operator knows before applying that a
thread is inside a target (the apply waits for it to leave) or that a
suspended generator or coroutine holds one (it leaves only when something
resumes it to its end, so the apply usually waits out its timeout).

One look, made with the same machinery as the transition's final report
(`safepoint.describe`); it changes nothing and keeps no frame alive."""

from __future__ import annotations

import sys
import threading

#: the verdict for a bundle that would apply but whose target a suspended
#: generator or coroutine holds (see verdict())
BLOCKED = "blocked"


def holders(switches, heap) -> list[dict]:
    """`safepoint.describe` blockers for the targets of `switches` that an
    apply without --force waits for (not allow_active, not implied), as
    they are now. The calling thread is left out: it is the one asking."""
    # here, not at the top: the CLI imports this module for sentence() only
    from .checks import code_kind
    from .safepoint import describe
    codes = [s.old for s in switches if not (s.allow_active or s.implied)]
    if not codes:
        return []
    code_ids = {id(c) for c in codes}
    target_of = {id(s.old): s.target for s in switches}
    heap.find_suspendables([c for c in codes if code_kind(c) != "function"])
    suspended = heap.suspended_in(code_ids)
    frames = sys._current_frames()
    frames.pop(threading.get_ident(), None)
    try:
        found = describe(frames, suspended, code_ids, target_of)
    finally:
        del frames, suspended
    for b in found:
        b.pop("stack", None)  # the holding lines say where; the whole stack is for TargetBusy
    return found


def suspended_holders(busy_now) -> list[dict]:
    return [b for b in busy_now or () if b.get("kind") != "thread"]


def verdict(assessment: dict, force: bool = False) -> dict:
    """An "applies" assessment becomes "blocked" when a suspended generator
    or coroutine holds a target and the apply would not be forced: threads
    leave targets by themselves, a suspended frame only when resumed to its
    end, which for a long-lived connection's handler may be never. With
    --force the apply does not wait for either (they finish on old code)."""
    if assessment.get("verdict") == "applies" and not force and suspended_holders(assessment.get("busy_now")):
        return {**assessment, "verdict": BLOCKED}
    return assessment


def sentence(patch_id: str, busy_now, timeout: float | None = None) -> str:
    """One plain line for the CLI about who holds what now ('' if nobody)."""
    if not busy_now:
        return ""
    parts = []
    for b in busy_now:
        targets = ", ".join(b.get("targets") or []) or "?"
        where = "; ".join(b.get("holding") or [])
        if b.get("kind") == "thread":
            parts.append(f"{targets} is running on thread {b.get('thread_name')!r} (id {b.get('thread_id')}): {where}")
        else:
            parts.append(f"{targets} is held by a suspended {b.get('kind')}: {where}")
    wait = f"up to {timeout:g}s (--timeout)" if timeout is not None else "up to --timeout"
    suspended = suspended_holders(busy_now)
    then = ("and then refuse unless it is resumed to its end; use --force to patch anyway "
            "(the holders finish on the old code), or apply when it has finished" if suspended else
            "for it to leave, then refuse if it has not; use a longer --timeout, or --force")
    return f"{patch_id}'s target " + "; ".join(parts) + f" — apply would wait {wait} {then}"
