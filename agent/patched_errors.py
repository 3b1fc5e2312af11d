"""The agent's own health signal: exceptions that propagate out of patched
functions while an observation runs (the updater watches one after each
install, and rolls the patch back when there are too many).

On Python 3.12+ this uses `sys.monitoring`: while, and only while, an
observation runs, the PY_UNWIND event (a frame left by an exception) is on,
and its callback counts the frames whose code object is one of the observed
patch's new code objects (nested code included). CPython delivers PY_UNWIND
for every code object (it cannot be set per code object, unlike PY_START),
so the callback's first step is an identity test against that set; the
event fires only when an exception leaves a frame, never on normal calls
and returns. With no observation running nothing is registered, and this
module is not even imported: it costs nothing.

Python 3.11 has no `sys.monitoring`, and tracing through `sys.setprofile`
would slow every call of every thread, so 3.11 gets no signal: `start`
answers `supported: false` and the updater relies on the service's HTTP
and command checks alone."""

from __future__ import annotations

import os
import sys
import threading
import time

from livepatch import atfork

TOOL_NAME = "livepatch"
MAX_SAMPLES = 5
# An observation ends by itself after this long (at most MAX_SECONDS), so a
# client that never says stop leaves no event on.
DEFAULT_SECONDS, MAX_SECONDS = 600.0, 86400.0

_lock = threading.Lock()
_watch: dict | None = None  # the observation under way


def supported() -> bool:
    return hasattr(sys, "monitoring")


def _codes(engine, patch_id):
    """The new code objects of `patch_id` (or of every applied patch), with
    the code objects nested in their constants: what runs the patch."""
    out, todo = {}, list(engine.patched_codes(patch_id))
    while todo:
        code = todo.pop()
        if id(code) not in out:
            out[id(code)] = code
            todo += [c for c in code.co_consts if isinstance(c, type(code))]
    return out


def _tool_id():
    mon = sys.monitoring
    for tool in (4, 3):  # the ids sys.monitoring leaves to tools other than debuggers, coverage, profilers, optimizers
        current = mon.get_tool(tool)
        if current is None:
            mon.use_tool_id(tool, TOOL_NAME)
            return tool
        if current == TOOL_NAME:
            return tool
    return None


def _on_unwind(code, offset, exc):
    w = _watch
    if w is not None and id(code) in w["codes"]:
        w["count"] += 1
        if len(w["samples"]) < MAX_SAMPLES:
            w["samples"].append({"function": code.co_qualname, "file": os.path.basename(code.co_filename),
                                 "error": type(exc).__name__, "message": str(exc).splitlines()[0][:200] if str(exc) else ""})


def start(engine, patch_id=None, seconds=DEFAULT_SECONDS) -> dict:
    """Begin counting (replacing an observation under way) for `seconds`."""
    global _watch
    if not supported():
        return {"supported": False, "why": "Python 3.11 has no sys.monitoring; no per-function signal without "
                                           "slowing every call"}
    codes = _codes(engine, patch_id)
    mon = sys.monitoring
    with _lock:
        tool = _tool_id()
        if tool is None:
            return {"supported": False, "why": "every sys.monitoring tool id is taken by other tools"}
        if _watch is not None:
            _watch["timer"].cancel()
        timer = threading.Timer(seconds, _expire, args=(patch_id,))
        timer.daemon, timer.name = True, "livepatch-observe"
        _watch = {"codes": codes, "count": 0, "samples": [], "since": time.time(), "patch": patch_id, "tool": tool,
                  "timer": timer}
        mon.register_callback(tool, mon.events.PY_UNWIND, _on_unwind)
        mon.set_events(tool, mon.events.PY_UNWIND)
        timer.start()
    return {"supported": True, "observing": patch_id, "code_objects": len(codes)}


def read() -> dict:
    w = _watch
    if w is None:
        return {"supported": supported(), "observing": False}
    return {"supported": True, "observing": True, "patch": w["patch"], "count": w["count"],
            "samples": list(w["samples"]), "seconds": round(time.time() - w["since"], 3)}


def stop() -> dict:
    """End the observation: the event is turned off and the tool id freed."""
    global _watch
    with _lock:
        out, w = read(), _watch
        if w is not None:
            w["timer"].cancel()
            mon = sys.monitoring
            mon.set_events(w["tool"], mon.events.NO_EVENTS)
            mon.register_callback(w["tool"], mon.events.PY_UNWIND, None)
            mon.free_tool_id(w["tool"])
            _watch = None
    return out


def _expire(patch_id) -> None:
    w = _watch
    if w is not None and w["patch"] == patch_id and threading.current_thread() is w["timer"]:
        stop()


def handle(engine, request: dict) -> dict:
    action = request.get("action")
    if action == "start":
        patch_id, seconds = request.get("patch_id"), request.get("seconds", DEFAULT_SECONDS)
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds <= MAX_SECONDS:
            raise ValueError(f"seconds must be a number above 0 and at most {MAX_SECONDS:g}")
        if patch_id is not None and patch_id not in engine.applied_ids():
            return {"supported": supported(), "observing": False, "error": f"{str(patch_id)[:128]} is not applied here"}
        return start(engine, patch_id, float(seconds))
    if action == "read":
        return read()
    if action == "stop":
        return stop()
    raise ValueError("action must be start, read or stop")


def _forget_in_child() -> None:
    # a forked worker starts unobserved: its parent's counts are not its own
    global _watch, _lock
    _lock = threading.Lock()  # another thread may have held it at the fork
    if _watch is not None:
        try:
            stop()
        except Exception:
            _watch = None


atfork.on_child_reset(_forget_in_child)
