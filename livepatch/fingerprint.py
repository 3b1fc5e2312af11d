"""Fingerprints: a stable digest of what a code object does.

The digest covers instructions (with jumps as label numbers, so it does not
depend on byte offsets), constants (nested code recursively), names, local,
cell and free variables, flags and argument counts. It leaves out line
numbers, file names, the function's name and object addresses, and it is
salted with the interpreter's cache tag: bytecode means nothing across minor
versions, so a 3.11 fingerprint never equals a 3.12 one."""

from __future__ import annotations

import hashlib
import sys
import types

import bytecode
from bytecode import Label, TryBegin, TryEnd, Instr

_TAG = sys.implementation.cache_tag or sys.implementation.name


def fingerprint(obj) -> str:
    """Hex digest of a code object's behaviour (accepts functions and code)."""
    code = code_of(obj)
    return hashlib.blake2b(_encode_code(code), digest_size=16).hexdigest()


def code_of(obj) -> types.CodeType:
    if isinstance(obj, types.CodeType):
        return obj
    # bound methods, staticmethod/classmethod
    while not isinstance(obj, types.FunctionType) and hasattr(obj, "__func__"):
        obj = obj.__func__
    code = getattr(obj, "__code__", None)
    if not isinstance(code, types.CodeType):
        raise TypeError(f"{obj!r} has no Python code object (builtin or C function?)")
    return code


def _encode_code(code: types.CodeType) -> bytes:
    parts: list[str] = [
        _TAG,
        f"args={code.co_argcount},{code.co_posonlyargcount},{code.co_kwonlyargcount}",
        f"flags={code.co_flags}",
        "vars=" + ",".join(code.co_varnames),
        "cells=" + ",".join(code.co_cellvars),
        "free=" + ",".join(code.co_freevars),
        "names=" + ",".join(code.co_names),
    ]
    labels: dict[int, int] = {}

    def label_no(label) -> str:
        return "L%d" % labels.setdefault(id(label), len(labels))

    nested: list[bytes] = []
    for item in bytecode.Bytecode.from_code(code):
        if isinstance(item, Label):
            parts.append(label_no(item) + ":")
        elif isinstance(item, TryBegin):
            parts.append(f"try {label_no(item.target)} {int(item.push_lasti)} {item.stack_depth}")
        elif isinstance(item, TryEnd):
            parts.append("tryend")
        elif isinstance(item, Instr):
            if item.name in ("NOP", "RESUME", "CACHE"):
                # NOPs only hold line numbers; RESUME's argument is positional.
                continue
            arg = item.arg
            if isinstance(arg, Label):
                text = label_no(arg)
            elif item.name in ("LOAD_CONST", "RETURN_CONST", "KW_NAMES"):
                text = _encode_const(arg, nested)
            elif arg is bytecode.UNSET:
                text = ""
            elif hasattr(arg, "name") and not isinstance(arg, (int, str)):
                text = type(arg).__name__ + ":" + str(arg.name)  # CellVar/FreeVar/enums
            else:
                text = repr(arg)
            parts.append(f"{item.name} {text}")
        # SetLineno and other pseudo items carry no behaviour.
    data = "\n".join(parts).encode("utf-8", "surrogatepass")
    return data + b"".join(nested)


def _encode_const(value, nested: list[bytes]) -> str:
    if isinstance(value, types.CodeType):
        nested.append(_encode_code(value))
        return "code#%d" % (len(nested) - 1)
    if isinstance(value, tuple):
        return "(" + ",".join(_encode_const(v, nested) for v in value) + ")"
    if isinstance(value, frozenset):
        # set order depends on hash randomisation; sort the encodings instead
        return "{" + ",".join(sorted(_encode_const(v, nested) for v in value)) + "}"
    if isinstance(value, float):
        return "float:" + value.hex()
    if isinstance(value, complex):
        return f"complex:{value.real.hex()},{value.imag.hex()}"
    # str, bytes, int, bool, None, Ellipsis: repr is exact and address-free
    return type(value).__name__ + ":" + repr(value)
