"""`livepatch run`: start a Python program with the agent already listening."""

from __future__ import annotations

import os

from .cli import CliError


def cmd_run(args):
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if len(command) < 2:
        raise CliError("usage: livepatch run [--name NAME] [--trust DIR] -- PYTHON app.py ARGS | PYTHON -m module ARGS", 2)
    env = dict(os.environ)
    if args.name:
        env["LIVEPATCH_NAME"] = args.name
    if args.trust:
        env["LIVEPATCH_TRUST"] = os.path.abspath(args.trust)
    if args.allow_unsigned:
        env["LIVEPATCH_ALLOW_UNSIGNED"] = "1"
    python, rest = command[0], command[1:]
    # exec: the service keeps this PID, its signals and its exit status
    os.execvpe(python, [python, "-c", "from livepatch.agent.launch import main; main()", "--", *rest], env)
