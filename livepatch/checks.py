"""Compatibility checks that run before anything is touched: can this new
code replace that live code without CPython silently doing the wrong thing?"""

from __future__ import annotations

import dis
import inspect
import sys
import sysconfig
import types

from .errors import Problem, UnsupportedRuntime
from .patch import PYTHON_TAG, UNCHANGED

_KIND_FLAGS = (
    inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR | inspect.CO_ITERABLE_COROUTINE
)


def require_supported_runtime() -> None:
    if sys.implementation.name != "cpython":
        raise UnsupportedRuntime(f"livepatch needs CPython; this is {sys.implementation.name}")
    if sysconfig.get_config_var("Py_GIL_DISABLED"):
        raise UnsupportedRuntime(
            "this is a free-threaded CPython build (no GIL): livepatch cannot make a commit atomic "
            "there yet; use a standard build"
        )
    if sys.version_info < (3, 11):
        raise UnsupportedRuntime(f"livepatch needs CPython 3.11 or newer; this is {sys.version.split()[0]}")


def code_kind(code: types.CodeType) -> str:
    flags = code.co_flags
    if flags & inspect.CO_ASYNC_GENERATOR:
        return "async generator"
    if flags & inspect.CO_COROUTINE:
        return "coroutine"
    if flags & inspect.CO_GENERATOR:
        return "generator"
    return "function"


def uses_zero_arg_super(code: types.CodeType) -> bool:
    """Does the code call `super()` with no arguments (which needs a
    `__class__` cell)? Looks for LOAD_GLOBAL super followed by a 0-arg call."""
    if "super" not in code.co_names:  # the common case, without disassembling
        return False
    instrs = [i for i in dis.get_instructions(code) if i.opname not in ("CACHE", "PUSH_NULL", "PRECALL")]
    for i, ins in enumerate(instrs[:-1]):
        if ins.opname == "LOAD_GLOBAL" and ins.argval == "super":
            nxt = instrs[i + 1]
            if nxt.opname == "CALL" and nxt.arg == 0:
                return True
    return False


def _positional_count(code) -> int:
    return code.co_argcount  # includes positional-only


def _kwonly_names(code) -> set:
    start = code.co_argcount
    return set(code.co_varnames[start : start + code.co_kwonlyargcount])


def check_change(change, live_code: types.CodeType) -> list[Problem]:
    """Every reason this change's new code cannot replace `live_code`."""
    target, new = change.target, change.new_code
    problems = []
    if not isinstance(new, types.CodeType):
        return [Problem("incompatible:type", target, f"new code is a {type(new).__name__}, not a code object")]
    if change.python != PYTHON_TAG:
        problems.append(Problem(
            "incompatible:python-version", target,
            f"code was compiled for {change.python}, this process runs {PYTHON_TAG}",
        ))
    if new.co_freevars != live_code.co_freevars:
        problems.append(Problem(
            "incompatible:free-vars", target,
            f"free variables differ: live code has {list(live_code.co_freevars)}, new code has "
            f"{list(new.co_freevars)} (closure cells are bound by position, so names and order must match)",
        ))
    if (new.co_flags & _KIND_FLAGS) != (live_code.co_flags & _KIND_FLAGS):
        problems.append(Problem(
            "incompatible:kind", target,
            f"a {code_kind(live_code)} cannot become a {code_kind(new)}",
        ))
    if "__class__" not in new.co_freevars and uses_zero_arg_super(new):
        problems.append(Problem(
            "incompatible:super", target,
            "new code calls zero-argument super() but has no __class__ cell: compile the method inside its class body",
        ))
    if change.defaults is not UNCHANGED and change.defaults is not None:
        if not isinstance(change.defaults, tuple):
            problems.append(Problem("incompatible:defaults", target, "defaults must be a tuple or None"))
        elif len(change.defaults) > _positional_count(new):
            problems.append(Problem(
                "incompatible:defaults", target,
                f"{len(change.defaults)} defaults for {_positional_count(new)} positional parameters",
            ))
    if change.kwdefaults is not UNCHANGED and change.kwdefaults is not None:
        if not isinstance(change.kwdefaults, dict):
            problems.append(Problem("incompatible:defaults", target, "keyword defaults must be a dict or None"))
        else:
            unknown = set(change.kwdefaults) - _kwonly_names(new)
            if unknown:
                problems.append(Problem(
                    "incompatible:defaults", target,
                    f"keyword defaults for unknown keyword-only parameters {sorted(unknown)}",
                ))
    return problems
