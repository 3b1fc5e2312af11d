"""Starting the agent from the environment, early in a new interpreter.

livepatch-autostart.pth (installed at the root of site-packages) imports
this module while the interpreter processes its site-packages, before the
program's `__main__` runs, when LIVEPATCH_AUTOSTART=1: that is how
`livepatch run` starts an agent without touching the command, and how
spawned children (multiprocessing spawn/forkserver, uvicorn workers, a
reloader's child) get one. The options come from LIVEPATCH_NAME,
LIVEPATCH_TRUST, LIVEPATCH_ALLOW_UNSIGNED, LIVEPATCH_STATE_DIR and
LIVEPATCH_FOLLOW (read by `start()`).

Nothing here may stop the program from starting: a failure is one line on
stderr and the program runs without an agent."""

from __future__ import annotations

import os
import sys


# Interpreters that never run the program's code: multiprocessing's
# resource tracker (started by uvicorn --workers, spawn and forkserver pools)
# would otherwise show up as one more process of the service, and the
# livepatch command itself (run from inside a service's environment) as one
# more process that re-applies the service's patches to itself.
_HELPERS = ("from multiprocessing.resource_tracker import main",)
_CLI_MODULES = ("livepatch", "livepatch.cli", "livepatch.__main__")


def _is_helper() -> bool:
    from livepatch import pyargs
    kind, what = pyargs.program(getattr(sys, "orig_argv", [])[1:])
    if kind == "-c":
        return what.startswith(_HELPERS)
    if kind == "-m":
        return what in _CLI_MODULES
    return os.path.basename(what) == "livepatch"


def run() -> None:
    if _is_helper():
        return
    try:
        from . import start
        start()
    except Exception as exc:
        # logging is not configured this early and a .pth error would print a
        # traceback and skip the rest of site-packages: one line, then go on
        sys.stderr.write(f"livepatch: no agent in process {os.getpid()}: {type(exc).__name__}: {exc}\n")
