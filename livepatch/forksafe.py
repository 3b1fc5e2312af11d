"""Fork safety: after `os.fork` the child's engines are clean and usable
whatever the parent's threads were doing in them.

Only the forking thread exists in the child. A thread that was inside an
engine (waiting for a safe point, committing, committing at import) is gone
with the engine lock held and perhaps the garbage collector disabled. In the
child each engine gets a new lock, the collector is enabled again if a
transition had disabled it, and a transition whose stores took effect but
whose bookkeeping did not finish is undone (the child's patch stack then
says truthfully what runs). The import hook's lock is re-created; the
commit's handoff helper thread is re-created on first use (commit.py); the
service's gc.callbacks, if a heap walk's collection had set them aside,
are put back (young.py)."""

from __future__ import annotations

import weakref

from . import atfork

_engines = weakref.WeakSet()


def track(engine) -> None:
    _engines.add(engine)
    install()  # whoever creates an engine: the package creates its own only on first use


def install() -> None:
    atfork.on_child_reset(_after_fork_in_child)  # once however often called


def _after_fork_in_child() -> None:
    from . import imports, young
    imports.reinit_in_child()
    young.restore_in_child()
    for engine in list(_engines):
        engine._reinit_in_child()


_MISSING = object()


def _in_effect(op) -> bool:
    fn, owner, name = op[0], op[1], op[2]
    if fn is delattr:
        return name not in getattr(owner, "__dict__", {})
    return getattr(owner, name, _MISSING) is op[3]


def undo_effective(ops: list, undo: list) -> int:
    """Undo, last first, every op of `ops` that is in effect; returns how
    many. Only in a child just forked, where no other thread runs."""
    done = [i for i, op in enumerate(ops) if _in_effect(op)]
    for i in reversed(done):
        fn, *args = undo[i]
        try:
            fn(*args)
        except Exception:
            pass
    return len(done)
