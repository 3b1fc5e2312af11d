"""The agent's own threads and the "multi-threaded fork" warning.

From Python 3.12, `os.fork()` in a process with more than one OS thread
emits `DeprecationWarning: This process (pid=N) is multi-threaded, use of
fork() may lead to deadlocks in the child`. With an agent, a program that
forks from `__main__` (or runs under `-X dev`, `-W default` or pytest) would
see it only because of the agent's socket thread, which holds nothing a
child needs while it waits for connections (the child starts its own agent).

So the agent puts one filter first in `warnings.filters`: it ignores that
warning only for a fork at which every thread besides the forking one is
one of ours and idle (the socket thread, the engine's handoff helper), as
checked by a before-fork hook (3.13 warns after the fork hooks have run, so
the filter cannot just be added and removed around the fork). With any
other thread (the program's, a native library's, an agent thread serving a
request) the warning is left as it is: then it is about a real hazard."""

from __future__ import annotations

import os
import re
import sys
import threading
import warnings

# threads that only ever block waiting for work, holding no lock
IDLE_THREADS = ("livepatch-agent", "livepatch-handoff")
_MESSAGE = r"This process \(pid=\d+\) is multi-threaded, use of fork\(\) may lead to deadlocks"


class _OursOnly:
    """The filter's message matcher (the warnings machinery calls match())."""

    def __init__(self):
        self.pattern = re.compile(_MESSAGE)
        self.armed = False  # set before a fork at which only our idle threads run
        self.fired = False

    def __repr__(self):
        return "<livepatch: the fork warning its own idle threads alone would cause>"

    def match(self, text) -> bool:
        if self.armed and self.pattern.match(text):
            self.armed, self.fired = False, True
            return True
        return False


_matcher = _OursOnly()


def _os_threads() -> int:
    # what the interpreter counts: field 20 of /proc/self/stat (after the
    # command name in parentheses, field 3 comes first)
    with open("/proc/self/stat", "rb") as fh:
        return int(fh.read().rsplit(b")", 1)[1].split()[17])


def only_ours() -> bool:
    ours = sum(1 for t in threading.enumerate() if t.name in IDLE_THREADS)
    if not ours:
        return False
    try:
        return _os_threads() - ours == 1
    except (OSError, ValueError, IndexError):
        return False


def _before() -> None:
    if _matcher.fired:
        # an ignored warning is remembered per code location; forget it, so a
        # later fork from there with a thread of the program's still warns
        _matcher.fired = False
        warnings._filters_mutated()
    _matcher.armed = only_ours()


def _disarm() -> None:
    _matcher.armed = False


_installed = False


def install() -> None:
    """Once per process (a forked child inherits filter and hooks)."""
    global _installed
    if _installed or sys.version_info < (3, 12) or not hasattr(warnings, "_filters_mutated"):
        return
    _installed = True
    warnings.filters.insert(0, ("ignore", _matcher, DeprecationWarning, None, 0))
    warnings._filters_mutated()
    os.register_at_fork(before=_before, after_in_child=_disarm)
