"""What keeps `livepatch status` and `livepatch apply` quick to start: the
parser is made for the command on the command line alone (the others, and
the modules that define them, are left out), and that command parses
exactly as in the whole parser. The modules the request path imports are
checked in tests/test_agent.py; the time it takes is measured by
benchmarks/startup.py."""
import argparse
import subprocess
import sys

import pytest

from livepatch import cli


def _commands(ap) -> dict:
    return next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction)).choices


WHOLE = _commands(cli.parser())


@pytest.mark.parametrize("name", sorted(WHOLE))
def test_a_command_parsed_alone_is_the_whole_parsers_command(name):
    alone = _commands(cli.parser(only=name))
    # a command defined in a module that parser() does not list for it would be missing here
    assert list(alone) == [name], f"parser(only={name!r}) lacks {name!r}: list it with its module in cli.parser()"
    assert alone[name].format_help() == WHOLE[name].format_help()
    assert alone[name]._defaults == WHOLE[name]._defaults


def _main(*argv):
    return subprocess.run([sys.executable, "-m", "livepatch", *argv], capture_output=True, text=True, timeout=60)


def test_what_one_command_cannot_settle_is_parsed_by_the_whole_parser():
    # help before the command lists every command
    r = _main("--help", "status")
    assert r.returncode == 0 and all(name in r.stdout for name in WHOLE)
    # an unknown command is named with every choice
    r = _main("no-such-command")
    assert r.returncode == 2 and "no-such-command" in r.stderr and "status" in r.stderr
    # a usage error of the named command comes from that command's parser
    r = _main("status")
    assert r.returncode == 2 and r.stderr.startswith("livepatch status: ")
    # and a command's options parse as always
    args = cli._parse(["apply", "123", "fix.lpb", "--timeout", "7", "--json"])
    assert (args.command, args.target, args.bundle, args.timeout, args.json) == ("apply", "123", "fix.lpb", 7.0, True)


def test_import_livepatch_loads_nothing_but_the_package():
    """Every process under `livepatch run` imports the package at start:
    the engine, its modules and threading come only when used."""
    code = "import sys; before = set(sys.modules); import livepatch; print(' '.join(sorted(set(sys.modules) - before)))"
    added = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                               check=True).stdout.split())
    assert added - {"__future__"} == {"livepatch", "livepatch.forkimports"}
