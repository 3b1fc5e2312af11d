"""`livepatch status`, `apply` and `rollback` command lines parsed without
argparse, which with the gettext and locale lookups it makes for every
parser and the `re` it imports is a third of such a command's run.

Only a command line written out in full is parsed here: the command's
options by their whole names, each value its own word, the positionals in
one run. Anything else (help, an abbreviated option, `--opt=value`, `--`,
a word that starts with "-", a missing or extra argument, a value its
type refuses) is left to argparse (parse() returns None), so that every
error, and every corner of argparse's matching, stays argparse's own. What
is parsed here gives what argparse gives (tests/test_cli_startup.py
compares the two, command line by command line, and these tables with the
parser's definitions in livepatch/cli_agent.py)."""

from __future__ import annotations

# option -> (dest, None for a flag, else "store" or "append")
_TARGET = {"--json": ("json", None), "--tree": ("tree", None)}
_WAITING = {"--timeout": ("timeout", "store"), "--force": ("force", None),
            "--authorization": ("authorization", "append")}
OPTIONS = {
    "status": _TARGET,
    "apply": {**_TARGET, **_WAITING, "--continue": ("keep_going", None), "--dry-run": ("dry_run", None),
              "--allow-downgrade": ("allow_downgrade", None)},
    "rollback": {**_TARGET, **_WAITING, "--all": ("all", None)},
}
# the positionals in order: (dest, required)
POSITIONALS = {"status": (("target", True),), "apply": (("target", True), ("bundle", True)),
               "rollback": (("target", True), ("patch_id", False))}
TIMEOUT_DEFAULT = 5.0


class Arguments:
    """The parsed command line, attribute by attribute (as argparse's Namespace)."""

    def __init__(self, **fields):
        self.__dict__.update(fields)

    def __repr__(self):
        return f"Arguments({', '.join(f'{k}={v!r}' for k, v in self.__dict__.items())})"


def _defaults(command: str) -> dict:
    out = {dest: (None if kind == "append" else False) for dest, kind in OPTIONS[command].values()}
    if "timeout" in out:
        out["timeout"] = TIMEOUT_DEFAULT
    out.update((dest, None) for dest, _ in POSITIONALS[command])
    return out


def _value(dest: str, text: str):
    """A value as the parser's type makes it; ValueError when refused."""
    from . import cli
    try:
        if dest == "timeout":
            return cli.seconds(text)
        if dest == "patch_id":
            return cli.patch_id(text)
    except Exception:
        raise ValueError(text) from None
    return text


def parse(argv: list) -> Arguments | None:
    """The arguments of a status, apply or rollback command line written out
    in full; None for anything else (argparse parses it)."""
    json_first = False
    i = 0
    while i < len(argv) and argv[i] == "--json":
        json_first, i = True, i + 1
    if i == len(argv) or argv[i] not in OPTIONS:
        return None
    command, words = argv[i], argv[i + 1:]
    options, positionals = OPTIONS[command], POSITIONALS[command]
    fields = _defaults(command)
    given, run_ended, k = 0, False, 0
    try:
        while k < len(words):
            word = words[k]
            if word.startswith("-"):
                dest, kind = options[word]  # KeyError: not an option written out in full
                if kind is None:
                    fields[dest] = True
                else:
                    k += 1
                    if k == len(words) or words[k].startswith("-"):
                        return None
                    value = _value(dest, words[k])
                    fields[dest] = value if kind == "store" else [*(fields[dest] or ()), value]
                run_ended = given > 0
            else:
                if run_ended or given == len(positionals):
                    return None
                dest = positionals[given][0]
                fields[dest] = _value(dest, word)
                given += 1
            k += 1
    except (KeyError, ValueError):
        return None
    if any(required for _, required in positionals[given:]):
        return None
    from . import cli_agent
    return Arguments(json_first=json_first, command=command, prog=f"livepatch {command}",
                     func=getattr(cli_agent, f"cmd_{command}"), **fields)
