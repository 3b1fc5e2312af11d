"""Imports cut in half by a fork: after `os.fork` the child can import again
what livepatch's own threads were importing at that moment.

The agent and the engine import code lazily on their threads (the first
verify, apply or rollback loads the bundle reader, the engine, the signing
code). A fork at such a moment copies a module lock owned by a thread that
does not exist in the child, and a module object whose body stopped
half-way: the child's next import of that module would wait forever, or get
the half-built module. CPython re-creates only the global import lock after
a fork. So the idents of livepatch's threads are noted just before each fork
and, in the child, module locks they owned are dropped along with the
modules they were still initialising, so the child imports those afresh.
Threads of the program are left alone: what they were importing is theirs."""

from __future__ import annotations

import os
import sys

_THREAD_PREFIX = "livepatch"
_ours_at_fork: frozenset = frozenset()
_installed = False


def install() -> None:
    global _installed
    if not _installed:
        _installed = True
        os.register_at_fork(before=_note_our_threads, after_in_parent=_forget, after_in_child=_repair_in_child)


def _note_our_threads() -> None:
    global _ours_at_fork
    # livepatch's threads are threading's: none before it is imported (and
    # `import livepatch` alone need not import it)
    threading = sys.modules.get("threading")
    if threading is None:
        return
    me = threading.get_ident()
    _ours_at_fork = frozenset(t.ident for t in threading.enumerate()
                              if t.ident != me and t.name.startswith(_THREAD_PREFIX))


def _forget() -> None:
    global _ours_at_fork
    _ours_at_fork = frozenset()


def _repair_in_child() -> None:
    dead = _ours_at_fork
    _forget()
    if dead:
        repair(dead)


def repair(dead_threads) -> list[str]:
    """Drop the module locks owned by `dead_threads` and the modules they
    were initialising; returns those modules' names. Only in a child just
    forked, where no other thread runs."""
    try:
        from importlib import _bootstrap
        locks = _bootstrap._module_locks
    except (ImportError, AttributeError):  # an interpreter without these internals: nothing to do
        return []
    dropped = []
    for name, ref in list(locks.items()):
        lock = ref()
        if lock is None or getattr(lock, "owner", None) not in dead_threads:
            continue
        del locks[name]
        module = sys.modules.get(name)
        if module is not None and getattr(getattr(module, "__spec__", None), "_initializing", False):
            del sys.modules[name]
            dropped.append(name)
    blocking = getattr(_bootstrap, "_blocking_on", None)
    if blocking is not None:  # what the dead threads waited for (deadlock detection reads it)
        for ident in dead_threads:
            blocking.pop(ident, None)
    return dropped
