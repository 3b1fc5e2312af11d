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
import weakref

_TAG = sys.implementation.cache_tag or sys.implementation.name


def fingerprint(obj) -> str:
    """Hex digest of a code object's behaviour (accepts functions and code)."""
    code = code_of(obj)
    key = id(code)
    known = _known.get(key)
    if known is not None and known[0]() is code:
        return known[1]
    digest = hashlib.blake2b(_encode_code(code), digest_size=16).hexdigest()
    if len(_known) >= _sweep_at[0]:
        _sweep()
    _known[key] = (weakref.ref(code), digest)
    return digest


# A code object never changes what it does (its adaptive copy deoptimises to
# the same instructions), so each live one is encoded once: an apply checks
# its targets' baselines without re-reading their bytecode (hundreds of
# microseconds per function, all of it holding the GIL). The weak references
# have no callback: one would run Python code of ours wherever any code
# object dies, in the service's threads and at exit after this module's
# globals are gone. Dead entries are swept instead, when the table has
# doubled since the last sweep.
_known: dict[int, tuple] = {}
_sweep_at = [1024]


def _sweep() -> None:
    for key, (ref, _) in list(_known.items()):
        if ref() is None:
            _known.pop(key, None)
    _sweep_at[0] = max(1024, 2 * len(_known))


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


# Reading `code.co_code` makes CPython build and cache a bytes copy on the
# code object for the rest of its life (about 0.5 KB for a typical function),
# and the baseline code objects the engine checks are then kept for rollback.
# The same bytes are rebuilt here from the live (adaptive) copy, exactly as
# CPython's deopt_code does: specialised opcodes back to their base opcode,
# inline caches zeroed. Instrumented opcodes (sys.monitoring) and executors
# hide the original instruction, so code holding them falls back to co_code.

def _deopt_tables():
    caches = opcode._inline_cache_entries
    base_of = [None] * 256
    cache_count = [0] * 256
    for name, number in dis._all_opmap.items():
        if number > 255 or name.startswith("INSTRUMENTED_") or name == "ENTER_EXECUTOR":
            continue  # pseudo-instructions never appear in code
        base = dis.deoptmap.get(name, name)
        base_of[number] = dis._all_opmap[base]
    for number in range(256):
        base = base_of[number]
        if base is not None:
            cache_count[number] = (caches.get(dis._all_opname[base], 0) if isinstance(caches, dict)
                                   else caches[base])
    return base_of, cache_count


def _rebuilt_co_code(code: types.CodeType):
    """`code.co_code` without caching it, or None if it cannot be rebuilt."""
    base_of, cache_count = _TABLES
    out = bytearray(code._co_code_adaptive)
    i, end = 0, len(out)
    while i < end:
        base = base_of[out[i]]
        if base is None:
            return None
        out[i] = base
        skip = 2 * cache_count[base]
        if skip:
            out[i + 2:i + 2 + skip] = bytes(skip)
        i += 2 + skip
    return bytes(out)


def _probe_rebuild() -> bool:
    """Check the tables against CPython itself once, on warmed-up code."""
    namespace = {}
    exec(compile(_PROBE_SOURCE, "<livepatch-probe>", "exec"), namespace)
    probe = namespace["probe"]
    for i in range(200):  # enough calls for the adaptive interpreter to specialise
        probe([i, i + 1.5, "x"], {"k": i})
    return _rebuilt_co_code(probe.__code__) == probe.__code__.co_code


_PROBE_SOURCE = """
import math
class Box:
    def __init__(self, v): self.v = v
def probe(items, table):
    total = 0
    for item in items:
        if isinstance(item, (int, float)):
            total += item * 2 + Box(item).v
        elif item in table or len(item) > 3:
            total -= 1
    return math.floor(total) + table.get("k", 0) + sum(x for x in items[:2])
"""

try:
    _TABLES = _deopt_tables()
except (AttributeError, KeyError, IndexError, TypeError):  # an interpreter this was not written for
    _TABLES = None
_rebuild_trusted = None


def _co_code(code: types.CodeType) -> bytes:
    global _rebuild_trusted
    if _rebuild_trusted is None:
        _rebuild_trusted = _TABLES is not None and _probe_rebuild()
    raw = _rebuilt_co_code(code) if _rebuild_trusted else None
    return code.co_code if raw is None else raw


def _decode(code: types.CodeType):
    """[(op, arg, jump target offset or None)], offset -> kept index; or
    None when the jump decoding cannot be trusted."""
    raw = _co_code(code)
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
