"""Fingerprints: a stable digest of what a code object does.

The digest covers instructions (with jumps as label numbers, so it does not
depend on byte offsets), constants (nested code recursively), names, local,
cell and free variables, flags and argument counts. It leaves out line
numbers, file names, the function's name and object addresses, and it is
salted with the interpreter's cache tag: bytecode means nothing across minor
versions, so a 3.11 fingerprint never equals a 3.12 one."""

from __future__ import annotations

import dis
import hashlib
import opcode
import sys
import types

_TAG = sys.implementation.cache_tag or sys.implementation.name


def fingerprint(obj) -> str:
    """Hex digest of a code object's behaviour (accepts functions and code)."""
    code = code_of(obj)
    return hashlib.blake2b(_encode_code(code), digest_size=16).hexdigest()


# ---------------------------------------------------------------- fast path
# Decodes co_code directly (a few microseconds per function, against about a
# millisecond through the `bytecode` package). Jumps and exception-table
# entries become instruction indices with NOP and RESUME left out, so the
# encoding does not move when line numbers do. If the decoded jump targets
# ever disagree with dis.findlabels (an interpreter this was not written
# for), the slower `bytecode`-based encoding is used for that code object.

_SKIPPED = {dis.opmap["NOP"], dis.opmap["RESUME"]}
_CONST_OPS = {dis.opmap[n] for n in ("LOAD_CONST", "RETURN_CONST", "KW_NAMES") if n in dis.opmap}
_JUMPS = set(dis.hasjrel) | set(dis.hasjabs)
_FOUR_TUPLES = sys.version_info >= (3, 13)  # _unpack_opargs yields (offset, start, op, arg)

if hasattr(dis, "_get_jump_target"):
    _jump_target = dis._get_jump_target
else:
    _caches = opcode._inline_cache_entries
    _after_caches = sys.version_info >= (3, 12)

    def _jump_target(op, arg, offset):
        if op in dis.hasjrel:
            target = offset + 2 + (-arg if dis._is_backward_jump(op) else arg) * 2
            return target + 2 * _caches[op] if _after_caches else target
        return arg * 2


def _decode(code: types.CodeType):
    """[(op, arg, jump target offset or None)], offset -> kept index; or
    None when the jump decoding cannot be trusted."""
    raw = code.co_code
    items = []
    index_at = {}
    for entry in dis._unpack_opargs(raw):
        offset, op, arg = (entry[0], entry[2], entry[3]) if _FOUR_TUPLES else entry
        index_at[offset] = len(items)
        if op in _SKIPPED:
            continue
        target = _jump_target(op, arg, offset) if op in _JUMPS and arg is not None else None
        items.append((op, arg, target))
    targets = {t for _, _, t in items if t is not None}
    if targets != set(dis.findlabels(raw)):
        return None
    return items, index_at


def _encode_fast(code: types.CodeType, parts: list, nested: list) -> bool:
    decoded = _decode(code)
    if decoded is None:
        return False
    items, index_at = decoded
    end = len(items)
    for op, arg, target in items:
        if target is not None:
            parts.append(f"{op} L{index_at.get(target, end)}")
        elif op in _CONST_OPS:
            parts.append(f"{op} {_encode_const(code.co_consts[arg], nested)}")
        else:
            parts.append(f"{op} {'' if arg is None else arg}")
    for start, stop, handler, depth, lasti in dis._parse_exception_table(code):
        parts.append(f"try {index_at.get(start, end)}-{index_at.get(stop, end)} "
                     f"L{index_at.get(handler, end)} {depth} {int(lasti)}")
    return True


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
    nested: list[bytes] = []
    if not _encode_fast(code, parts, nested):
        del parts[7:]
        nested = []
        _encode_slow(code, parts, nested)
    data = "\n".join(parts).encode("utf-8", "surrogatepass")
    return data + b"".join(nested)


def _encode_slow(code: types.CodeType, parts: list, nested: list) -> None:
    import bytecode
    from bytecode import Instr, Label, TryBegin, TryEnd

    parts.append("slow")
    labels: dict[int, int] = {}

    def label_no(label) -> str:
        return "L%d" % labels.setdefault(id(label), len(labels))

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
