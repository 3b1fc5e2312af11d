"""What a forked child does, in two phases: first every reset (locks a
thread of the parent held at the fork, helper threads that did not come
along, an engine's half-done transition), then what starts something (the
agent's own control channel, which may re-apply recorded patches at once).

`os.register_at_fork` runs hooks in the order they were registered, and
modules register theirs when they are imported: the agent package is
imported before most of what its start uses, so a reset registered by a
module imported later would run after the start had already needed it (a
child forked while the parent's agent thread held the engine lock waited
forever in that lock, inside the fork). Everything here is registered
through one hook, resets before starts, each hook once."""

from __future__ import annotations

import os

_resets: list = []
_starts: list = []


def on_child_reset(fn) -> None:
    """Call `fn()` in every forked child before any start hook."""
    if fn not in _resets:
        _resets.append(fn)


def on_child_start(fn) -> None:
    """Call `fn()` in every forked child after every reset hook."""
    if fn not in _starts:
        _starts.append(fn)


def _run_in_child() -> None:
    for fn in (*_resets, *_starts):
        try:
            fn()
        except Exception:  # as os.register_at_fork does: report it, run the others
            import traceback
            traceback.print_exc()


os.register_at_fork(after_in_child=_run_in_child)
