"""`livepatch run -- python app.py ARGS` / `-- python -m pkg ARGS`: start the
agent, then run the program as that interpreter would have: `sys.argv`,
`sys.path[0]` and a `__main__` module set up as for the plain command.

The CLI executes `PYTHON -c "from livepatch.agent.launch import main; main()"
-- app.py ARGS` (or `-- -m pkg ARGS`), so the program runs in the same
interpreter the operator named."""

from __future__ import annotations

import os
import runpy
import sys


def main() -> None:
    argv = sys.argv[1:]
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        sys.exit("livepatch run: nothing to run (expected app.py ARGS or -m module ARGS)")
    from . import start
    start()
    if argv[0] == "-m":
        if len(argv) < 2:
            sys.exit("livepatch run: -m needs a module name")
        sys.argv = [argv[1]] + argv[2:]  # run_module replaces argv[0] with the module's path
        sys.path[0] = os.getcwd()  # as `python -m` does
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(argv)
        sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))  # as `python app.py` does
        runpy.run_path(argv[0], run_name="__main__")
