"""The argparse side of the `livepatch` command: its formatter, parser and
--version action. Imported when a command line is parsed by argparse
(livepatch/cli.py's parser()); `status`, `apply` and `rollback` written out
in full are parsed without it (livepatch/cli_quick.py)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .cli import EXIT_USAGE, CliError


class Formatter(argparse.HelpFormatter):
    """argparse's formatter with the terminal width found as
    shutil.get_terminal_size finds it (COLUMNS, else stdout's terminal, else
    80), once per process: the default imports shutil (and with it bz2, lzma
    and zlib) the first time any parser gets an argument."""

    _columns = None

    def __init__(self, prog, indent_increment=2, max_help_position=24, width=None):
        if width is None:
            width = Formatter._terminal_columns() - 2
        super().__init__(prog, indent_increment, max_help_position, width)

    @classmethod
    def _terminal_columns(cls) -> int:
        if cls._columns is None:
            try:
                columns = int(os.environ["COLUMNS"])
            except (KeyError, ValueError):
                columns = 0
            if columns <= 0:
                try:
                    columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
                except (AttributeError, ValueError, OSError):
                    columns = 0
            cls._columns = columns or 80
        return cls._columns


class Parser(argparse.ArgumentParser):
    """Every parser of the command, subcommands' included (argparse makes
    those of the parent's class), formats with Formatter."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", Formatter)
        super().__init__(*args, **kwargs)
        # the deepest subcommand's sets it last: errors say `livepatch trust reload: ...`
        self.set_defaults(prog=self.prog)

    def error(self, message):
        # one line naming the mistake and where the help is (argparse prints the usage block first)
        raise CliError(f"{message} (see `{self.prog} --help`)", EXIT_USAGE, {"command": self.prog}, kind="UsageError")


class Version(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        from . import __version__
        if getattr(namespace, "json_first", False):
            print(json.dumps({"version": __version__}))
        else:
            print(f"livepatch {__version__}")
        parser.exit()
