"""How a CPython command line is read: which options go to the interpreter
and what it runs (`-c CODE`, `-m MODULE`, a script, or nothing). Shared by
`livepatch run` (checks before the exec) and the agent's autostart (which
interpreters are helpers, not the program); standard library only."""

from __future__ import annotations

import os


def parse(argv: list) -> tuple[dict, int]:
    """The single-letter options in `argv` (the words after the interpreter),
    each with the word it was in, and the index where the interpreter's
    options end: after -c CODE / -m MODULE, or at the script."""
    flags: dict = {}
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            return flags, i + 1
        if a == "--check-hash-based-pycs":
            i += 2
            continue
        if a.startswith("--"):
            i += 1
            continue
        if not a.startswith("-") or a == "-":
            return flags, i
        for j, ch in enumerate(a[1:], 1):
            flags.setdefault(ch, a)
            if ch in "cm":
                return flags, i + (1 if a[j + 1:] else 2)
            if ch in "WX":
                if not a[j + 1:]:
                    i += 1  # the argument is the next word
                break
        i += 1
    return flags, i


def program(argv: list) -> tuple[str, str]:
    """What the interpreter runs: ("-c", code), ("-m", module), ("", script),
    or ("", "") for an interactive session or standard input."""
    flags, end = parse(argv)
    for opt in ("c", "m"):
        if opt in flags:
            word = flags[opt]
            attached = word[word.index(opt) + 1:]
            return "-" + opt, attached or (argv[end - 1] if end - 1 < len(argv) else "")
    return "", argv[end] if end < len(argv) and argv[end] != "-" else ""


def program_name(argv: list) -> str:
    """A name for what the interpreter runs: the module of -m, the script's
    file name (a console script's too), else "python"."""
    kind, what = program(argv)
    if kind == "-m" and what:
        return what
    return os.path.basename(what) if kind == "" and what else "python"
