"""`livepatch run [OPTIONS] -- COMMAND ARGS`: run any Python program with
the agent in it.

The command is executed unchanged (same PID, argv, `__main__`, exit status
and signals as without livepatch); the agent is started inside it by
livepatch-autostart.pth from the LIVEPATCH_* variables set here. Before
the exec this module checks what would otherwise fail later, out of sight:
the command exists and is a Python program (an interpreter, or a script
whose #! line runs one), that interpreter has livepatch with its autostart
file and keeps `site` enabled, and the trusted keys load."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

# shutil, signal and subprocess are imported by the functions of `run`:
# every other command builds this parser too
from . import pyargs
from .cli import EXIT_USAGE, CliError

PTH = "livepatch-autostart.pth"
_PYTHON_NAME = re.compile(r"python(\d+(\.\d+)*)?[a-z]?(-dbg)?$")
# pip writes this when the interpreter path is too long for a #! line
_SH_POLYGLOT = re.compile(r"^'''exec' (?:\"([^\"]+)\"|'([^']+)'|(\S+)) \"\$0\" \"\$@\"", re.M)
_PYENV_SHIM = re.compile(r'^exec "([^"]*/pyenv)" exec "\$program" "\$@"', re.M)
# what the agent would find at start: sys.path as site-packages leave it, before
# the program's directory is put first
_PROBE = ("import importlib.util, json, os, site, sys\n"
          "del sys.path[0]\n"
          "dirs = site.getsitepackages() + [site.getusersitepackages()]\n"
          "print(json.dumps({'livepatch': importlib.util.find_spec('livepatch') is not None,\n"
          "  'pth': any(os.path.exists(os.path.join(d, %r)) for d in dirs),\n"
          "  'version': '%%d.%%d' %% sys.version_info[:2]}))\n" % PTH)


def add_arguments(p) -> None:
    from .cli import service_name
    p.add_argument("--name", type=service_name, help="the service's name in `livepatch ps` (default: the program's name)")
    p.add_argument("--version", dest="app_version", metavar="VERSION",
                   help="the release the program is (status, ps and assess show NAME VERSION as its baseline; "
                        "default: the installed distribution NAME's version)")
    p.add_argument("--trust", metavar="KEYFILE_OR_DIR", help="keys the agent accepts bundles from")
    p.add_argument("--allow-unsigned", action="store_true", help="development only: accept unsigned bundles")
    p.add_argument("--state-dir", metavar="DIR", help="where the service's applied patches and history are kept")
    p.add_argument("--no-follow", action="store_true",
                   help="no agent in forked or spawned children (only in this process)")
    p.add_argument("program", nargs=argparse.REMAINDER, metavar="-- COMMAND ARGS")


def cmd_run(args):
    import signal
    command = list(args.program)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise CliError("nothing to run: expected -- COMMAND ARGS (for example: -- python app.py, -- gunicorn app:app)",
                       EXIT_USAGE)
    env = dict(os.environ)
    if args.trust:
        env["LIVEPATCH_TRUST"] = args.trust
    if args.state_dir:
        env["LIVEPATCH_STATE_DIR"] = args.state_dir
    for var in ("LIVEPATCH_TRUST", "LIVEPATCH_STATE_DIR"):
        if env.get(var):
            env[var] = os.path.abspath(env[var])  # the program may chdir before its agent reads them
    state_dir = env.get("LIVEPATCH_STATE_DIR")
    if state_dir and os.path.exists(state_dir) and not os.path.isdir(state_dir):
        raise CliError(f"{'--state-dir' if args.state_dir else 'LIVEPATCH_STATE_DIR'} {state_dir}: not a directory "
                       "(give a directory for the services' state, or one to be created)")
    if env.get("LIVEPATCH_TRUST"):
        _check_trust(env["LIVEPATCH_TRUST"], "--trust" if args.trust else "LIVEPATCH_TRUST")
    path = _find(command[0], env)
    interpreter, options, program_args = _python_of(path, command, env)
    flags, _ = pyargs.parse(options)
    if "S" in flags:
        raise CliError(f"{interpreter} {flags['S']}: -S disables site-packages, where the agent starts; drop -S")
    if path == interpreter:
        _check_script(options + program_args)
    _check_interpreter(interpreter, env)

    env["LIVEPATCH_AUTOSTART"] = "1"
    env["LIVEPATCH_NAME"] = args.name or _program_name(command, path, interpreter, options, program_args)
    if args.app_version:
        if len(args.app_version) > 100 or not args.app_version.isprintable():
            raise CliError("--version must be printable text of at most 100 characters", EXIT_USAGE)
        env["LIVEPATCH_VERSION"] = args.app_version
    else:
        env.pop("LIVEPATCH_VERSION", None)  # a declaration is made for one program, never inherited from a shell
    if args.allow_unsigned:
        env["LIVEPATCH_ALLOW_UNSIGNED"] = "1"
    else:
        env.pop("LIVEPATCH_ALLOW_UNSIGNED", None)  # development mode only when asked for, never inherited
    if args.no_follow:
        env["LIVEPATCH_FOLLOW"] = "0"
    else:
        env.pop("LIVEPATCH_FOLLOW", None)
    sys.stdout.flush()
    sys.stderr.flush()
    # this interpreter ignores these; an exec keeps ignored signals ignored,
    # which the program would not inherit from a shell
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_DFL)
    # exec: the service keeps this PID, its signals and its exit status.
    # As a shell does: a path as typed (a #! interpreter gets it as the
    # script's name), a bare name as found on PATH.
    try:
        os.execve(command[0] if "/" in command[0] else path, command, env)
    except OSError as exc:
        raise CliError(f"{command[0]}: cannot execute: {exc.strerror}") from None


def _check_script(argv: list) -> None:
    """The script an interpreter is told to run exists (the interpreter
    would start, agent and all, only to exit 2)."""
    kind, script = pyargs.program(argv)
    if kind == "" and script and not os.path.exists(script):
        raise CliError(f"{script}: no such file (the script to run; paths are relative to {os.getcwd()})")
    if kind == "" and script and os.path.isdir(script) and not os.path.exists(os.path.join(script, "__main__.py")):
        raise CliError(f"{script}: is a directory without __main__.py")


def _check_trust(source: str, what: str) -> None:
    if not os.path.lexists(source):  # a link loop or a dangling link: load_trusted says which
        raise CliError(f"{what} {source}: no such file or directory")
    from .signing import load_trusted
    try:
        load_trusted(source)
    except Exception as exc:
        raise CliError(f"{what} {source}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def _find(name: str, env: dict) -> str:
    import shutil
    if "/" in name:
        path = os.path.abspath(name)
        if not os.path.exists(path):
            raise CliError(f"{name}: no such file")
    else:
        path = shutil.which(name, path=env.get("PATH", os.defpath))
        if path is None:
            hint = f" (to run the file {name} here: -- python {name})" if os.path.isfile(name) else ""
            raise CliError(f"{name}: command not found on PATH{hint}")
    if os.path.isdir(path):
        raise CliError(f"{name}: is a directory")
    if not os.access(path, os.X_OK):
        raise CliError(f"{name}: not executable (to run a Python file: -- python {name})")
    return path


def _head(path: str, size: int = 4096) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(size)
    except OSError as exc:
        raise CliError(f"{path}: cannot read: {exc.strerror}") from None


def _is_python_binary(path: str) -> bool:
    """An ELF executable that is a CPython interpreter: by its name (also of
    the file a symlink points to), else by the interpreter's entry point
    being linked in."""
    for name in (os.path.basename(path), os.path.basename(os.path.realpath(path))):
        if _PYTHON_NAME.match(name):
            return True
    try:
        with open(path, "rb") as fh:
            return b"Py_BytesMain" in fh.read(256 * 2**20)
    except OSError:
        return False


def _python_of(path: str, command: list, env: dict, depth: int = 0):
    """(interpreter, its options, program args) for running `command`,
    or a CliError saying why it is not a Python program."""
    import shutil
    head = _head(path)
    if head.startswith(b"\x7fELF"):
        if not _is_python_binary(path):
            raise CliError(f"{command[0]}: not a Python program (an executable that is not a Python interpreter)")
        options, rest = _split_options(command[1:])
        return path, options, rest
    if not head.startswith(b"#!"):
        raise CliError(f"{command[0]}: not a Python program (no #! line; to run a Python file: -- python {command[0]})")
    line = head[2:].split(b"\n", 1)[0].decode("utf-8", "replace").strip()
    words = line.split(None, 1)
    if not words:
        raise CliError(f"{command[0]}: not a Python program (empty #! line)")
    text = head.decode("utf-8", "replace")
    shim = _PYENV_SHIM.search(text)
    if shim and depth < 3:
        # a pyenv shim: pyenv names the interpreter or script it would run
        real = _pyenv_which(shim.group(1), os.path.basename(path), env)
        if real:
            return _python_of(real, [real, *command[1:]], env, depth + 1)
    interp, arg = words[0], (words[1] if len(words) > 1 else "")
    options = [arg] if arg else []
    if os.path.basename(interp) == "env":
        parts = arg.split()
        while parts and (parts[0].startswith("-") or "=" in parts[0]):
            parts.pop(0)  # env's own options (-S) and VAR=value assignments
        if not parts:
            raise CliError(f"{command[0]}: not a Python program (its #! line is #!{line})")
        found = shutil.which(parts[0], path=env.get("PATH", os.defpath))
        if found is None:
            raise CliError(f"{command[0]}: its #! line runs {parts[0]}, which is not found on PATH")
        interp, options = found, parts[1:]
    if os.path.basename(interp) in ("sh", "bash", "dash"):
        poly = _SH_POLYGLOT.search(text)
        if poly:
            interp, options = next(g for g in poly.groups() if g), []
        else:
            raise CliError(f"{command[0]}: not a Python program (a shell script: #!{line})")
    if not os.path.exists(interp):
        raise CliError(f"{command[0]}: its #! line runs {interp}, which does not exist")
    if not _head(interp, 4).startswith(b"\x7fELF") and depth < 3:
        # the #! line names a script (a pyenv shim, say): what that one runs
        try:
            inner, inner_options, _ = _python_of(interp, [interp], env, depth + 1)
        except CliError:
            raise CliError(f"{command[0]}: not a Python program (#!{line})") from None
        return inner, inner_options + options, command[1:]
    if not _is_python_binary(interp):
        raise CliError(f"{command[0]}: not a Python program (#!{line})")
    return interp, options, command[1:]


def _pyenv_which(pyenv: str, name: str, env: dict) -> str | None:
    import subprocess
    try:
        r = subprocess.run([pyenv, "which", name], env=env, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    found = r.stdout.strip()
    return found if r.returncode == 0 and os.path.isfile(found) else None


def _split_options(argv: list) -> tuple[list, list]:
    """The interpreter's own options and the rest (-c/-m with their
    argument stay with the options)."""
    _, end = pyargs.parse(argv)
    return argv[:end], argv[end:]


def _program_name(command, path, interpreter, options, program_args) -> str:
    if path != interpreter and not _PYTHON_NAME.match(os.path.basename(path)):
        return os.path.basename(command[0])  # a console script or a script with a #! line
    return pyargs.program_name(options + program_args)


def _environment_of(python: str) -> str:
    """A virtualenv's directory, else the interpreter's real path."""
    top = os.path.dirname(os.path.dirname(os.path.abspath(python)))
    if os.path.exists(os.path.join(top, "pyvenv.cfg")):
        return os.path.realpath(top)
    return os.path.realpath(python)


def _check_interpreter(python: str, env: dict) -> None:
    """livepatch importable there, with its autostart file in a site-packages
    that interpreter reads. Known without a subprocess for this environment."""
    import subprocess
    if _environment_of(python) == _environment_of(sys.executable):
        import site
        dirs = site.getsitepackages() + [site.getusersitepackages()]
        info = {"livepatch": True, "pth": any(os.path.exists(os.path.join(d, PTH)) for d in dirs)}
    else:
        probe_env = {k: v for k, v in env.items() if not k.startswith("LIVEPATCH_")}
        try:
            r = subprocess.run([python, "-c", _PROBE], env=probe_env, capture_output=True, text=True, timeout=60)
            info = json.loads(r.stdout.strip().splitlines()[-1])
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            raise CliError(f"{python}: did not run as a Python interpreter") from None
        if not info["livepatch"]:
            raise CliError(f"livepatch is not installed for {python} (Python {info['version']}); install it in "
                           f"that environment ({python} -m pip install livepatch) or run the program with "
                           f"{sys.executable}")
    if not info["pth"]:
        raise CliError(f"{python}: livepatch is installed without {PTH} in site-packages, so the agent cannot "
                       f"start; reinstall livepatch in that environment")
