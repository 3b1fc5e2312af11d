"""What keeps `livepatch status`, `apply` and `rollback` quick to start:
written out in full they are parsed without argparse (livepatch/cli_quick.py),
exactly as argparse parses them; otherwise the parser is made for the
command on the command line alone (the others, and the modules that define
them, are left out), and that command parses exactly as in the whole
parser; and the modules the three commands import, from the installed
command script's start to its exit, are these and no more. The time it
takes is measured by benchmarks/startup.py."""
import argparse
import io
import os
import random
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout

import pytest

from livepatch import cli, cli_quick

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "packaging", "bin", "livepatch")


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
    assert added - {"__future__"} == {"livepatch", "livepatch.forkimports", "livepatch.atfork"}


# ---------------------------------------------------------------- the parser without argparse

_KINDS = {argparse._StoreTrueAction: None, argparse._StoreAction: "store", argparse._AppendAction: "append"}


@pytest.mark.parametrize("name", sorted(cli_quick.OPTIONS))
def test_the_quick_parsers_tables_are_the_commands_definitions(name):
    """Every option and positional of the command, by the same name, with
    the same default and kind of value: one added to the command in
    cli_agent.py and not here fails this."""
    actions = [a for a in WHOLE[name]._actions if a.dest != "help"]
    options = {s: (a.dest, _KINDS[type(a)]) for a in actions for s in a.option_strings}
    assert options == cli_quick.OPTIONS[name]
    positionals = tuple((a.dest, a.nargs is None) for a in actions if not a.option_strings)
    assert positionals == cli_quick.POSITIONALS[name]
    assert {a.dest: a.default for a in actions} == cli_quick._defaults(name)
    # the values with a type are made by the same functions
    assert {a.dest: a.type for a in actions if a.type} == {d: t for d, t in (("timeout", cli.seconds),
                                                                              ("patch_id", cli.patch_id))
                                                           if d in cli_quick._defaults(name)}


def _argparse(p, argv):
    """What the whole parser makes of `argv`: its namespace's fields, or the error it reports."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with redirect_stdout(out), redirect_stderr(err):
            return vars(cli._parse_all(p, argv))
    except cli.CliError as exc:
        return ("error", str(exc))
    except SystemExit as exc:  # --help
        return ("exit", exc.code)


WORDS = ["status", "apply", "rollback", "history", "123", "4194305", "web", "fix.lpb", "HP-1", "-HP", "bad id!", "",
         "--json", "--tree", "--timeout", "7", "0.5", "900", "nan", "-1", "--force", "--all", "--dry-run", "--continue",
         "--allow-downgrade", "--authorization", "a.rb", "-h", "--help", "--", "--time", "--timeout=3", "--jso",
         "--version", "-j"]


def _command_lines():
    yield from (["status", "123"], ["apply", "123", "fix.lpb"], ["rollback", "123"], ["--json", "status", "web"],
                ["rollback", "123", "HP-1", "--all", "--json"], ["apply", "--timeout", "7", "123", "fix.lpb", "--force",
                                                                 "--authorization", "a.rb", "--authorization", "b.rb"])
    rnd = random.Random(14)  # the same lines at every run
    values = {"timeout": ("7", "0.5", "0", " 600 ", "900", "nan", "-1", "1e2"), "authorization": ("a.rb", "-x", "")}
    for _ in range(1500):
        command = rnd.choice(sorted(cli_quick.OPTIONS))
        # a line as a person writes one: the positionals, options in any order, sometimes a word out of place
        words = [rnd.choice(("123", "web", "0", "2147483648"))]
        words += [rnd.choice(("fix.lpb", "HP-1", "bad id!", ""))] * rnd.randint(0, 2)
        options = sorted(cli_quick.OPTIONS[command].items())
        for option, (dest, kind) in rnd.sample(options, rnd.randint(0, min(3, len(options)))):
            words.insert(rnd.randint(0, len(words)), option if kind is None else (option, rnd.choice(values[dest])))
        words = [w for word in words for w in (word if isinstance(word, tuple) else (word,))]
        if rnd.random() < 0.3:
            words.insert(rnd.randint(0, len(words)), rnd.choice(WORDS))
        yield ["--json"] * rnd.randint(0, 1) + [command] + words
        yield rnd.choices(WORDS, k=rnd.randint(1, 5))


def test_what_the_quick_parser_parses_argparse_parses_alike_and_the_rest_it_leaves_to_argparse():
    whole = cli.parser()
    quick = 0
    for argv in _command_lines():
        ours = cli_quick.parse(argv)
        if ours is None:
            continue
        quick += 1
        theirs = _argparse(whole, argv)
        assert (argv, vars(ours)) == (argv, theirs)
    # the lines as written in the README and by scripts take the quick way
    for argv in (["status", "123"], ["apply", "123", "fix.lpb", "--timeout", "7"], ["rollback", "123", "HP-1"],
                 ["--json", "rollback", "web", "--all", "--tree"]):
        assert cli_quick.parse(argv) is not None, argv
    assert quick > 300


def test_a_line_the_quick_parser_leaves_out_fails_as_argparse_says():
    # each of these is refused by argparse with its own message; the quick parser takes none of them
    for argv, message in ((["status"], "the following arguments are required: SERVICE|PID"),
                          (["apply", "123"], "the following arguments are required: bundle"),
                          (["rollback", "123", "--timeout", "900"], "argument --timeout: must be a number of seconds"),
                          (["rollback", "123", "bad id!"], "is not a patch id"),
                          (["status", "123", "extra"], "unrecognized arguments: extra"),
                          (["status", "123", "--timeout", "7"], "unrecognized arguments: --timeout 7")):
        assert cli_quick.parse(argv) is None
        r = _main(*argv)
        assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1, (argv, r.stderr)


# ---------------------------------------------------------------- what the hot commands import

# From the command script's first line to its exit, beyond what the
# interpreter itself starts with: the package, the command modules, the
# client and the protocol on the C socket and json types. Not argparse (nor
# gettext, locale), json or re (nor enum, functools, collections), base64,
# struct, socket, threading, the bundle parser, the engine.
_COMMON = {"__future__", "livepatch", "livepatch.forkimports", "livepatch.atfork", "livepatch.cli", "livepatch.cli_quick",
           "livepatch.cli_agent", "livepatch.client", "livepatch.agent", "livepatch.agent.protocol",
           "livepatch.agent.runtime_dir", "_socket", "_json", "atexit", "errno"}
HOT_PATHS = {"status": _COMMON,
             "apply": _COMMON | {"livepatch.cancel", "livepatch.bundlefile", "stat", "binascii"},
             "rollback": _COMMON | {"livepatch.cancel"}}


def _imported(argv, env) -> set:
    out = subprocess.run([sys.executable, "-X", "importtime", *argv], capture_output=True, text=True, timeout=60,
                         env=env, cwd="/")
    return out.returncode, {line.split("|")[2].strip() for line in out.stderr.splitlines()
                            if line.startswith("import time:") and "|" in line and "self [us]" not in line}


@pytest.fixture(scope="module")
def agent_process(tmp_path_factory):
    """A process with an agent (started as under `livepatch run`) that accepts unsigned bundles."""
    d = tmp_path_factory.mktemp("hot")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIVEPATCH_")}
    env.update(LIVEPATCH_AUTOSTART="1", LIVEPATCH_NAME="cli-startup", LIVEPATCH_STATE_DIR=str(d / "state"),
               LIVEPATCH_ALLOW_UNSIGNED="1")
    proc = subprocess.Popen([sys.executable, "-c", "import sys; print('up', flush=True); sys.stdin.read()"], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=str(d))
    try:
        assert proc.stdout.readline().strip() == "up"  # the agent listens before the program's first line
        yield proc.pid, d
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)


def test_status_apply_and_rollback_import_what_they_need_and_nothing_more(agent_process):
    pid, d = agent_process
    bogus = d / "bogus.lpb"
    bogus.write_bytes(b"not a bundle")  # refused by the agent, which verifies: the whole request path runs
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIVEPATCH_")}
    _, bare = _imported(["-c", "pass"], env)
    for argv, code in ((["status", str(pid)], 0), (["apply", str(pid), str(bogus)], 4), (["rollback", str(pid)], 3)):
        returncode, modules = _imported([SCRIPT, *argv], env)
        assert returncode == code, argv
        assert (argv[0], sorted(modules - bare)) == (argv[0], sorted(HOT_PATHS[argv[0]] - bare))
    # --json output is json's: it needs no parser either
    returncode, modules = _imported([SCRIPT, "--json", "status", str(pid)], env)
    assert returncode == 0 and "json" in modules
    assert sorted(modules & {"argparse", "gettext", "locale", "livepatch.cli_argparse"}) == []
