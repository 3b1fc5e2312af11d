"""Whether a heap walk found every function of the modules it was for.

The walk (`heapwalk`) is not one atomic pass: a function whose every
reference moves, while it runs, from a container it has not read yet into
one it has already read is never seen. Every function holds a reference to
its module's namespace, so the namespace's refcount tells: read in the same
C-level call as the young generation, it must equal the references to the
namespace the walk read from what it visited (`heapwalk.walk(counted=)`;
the functions it found among them, kept alive by the list of them), plus
one per young function the walk did not visit, plus the call's own
argument. A missed function is one more. A running frame reports neither
its locals nor its own dict of them to the collector: the walk reads both
from the stacks (heapwalk._roots), so a frame holding the namespace in a
local is counted. A frame running module-level code in the namespace makes
the count inexact (see `code_frames`).

So are a function of the module in cyclic garbage (unreachable, so never
walked), a holder made or dropped meanwhile, a value on a running frame's
stack (the namespace passed as an argument to a call in progress) and a
holder the collector cannot see: the count then says "not proven", never
"complete" wrongly, unless one holder let go of the namespace exactly as a
function was missed. Only valid while the collector is off (a transition):
otherwise objects leave the young generation unseen."""

from __future__ import annotations

import gc
import operator
import sys
from functools import partial
from itertools import chain, compress, repeat, starmap
from types import FunctionType

_CO_OPTIMIZED = 0x1
_young_objects = partial(gc.get_objects, 0)
_is_function = partial(map, frozenset((FunctionType,)).__contains__)
_types_of = partial(map, type)


def young_functions_and_refcounts(namespaces: list) -> tuple[list, list]:
    """(the functions in the young generation, `sys.getrefcount` of each of
    `namespaces`), read in one C-level call: no other thread runs between
    the two (see locate.young_snapshot for why the list of the young
    generation is let go inside the call)."""
    box: list = []
    out = list(chain(
        map(box.append, map(operator.call, repeat(_young_objects, 1))),
        map(list, map(compress, box, map(_is_function, map(_types_of, box)))),
        map(sys.getrefcount, namespaces),
        starmap(operator.call, ((box.clear,),))))
    return out[1], out[2:-1]


def code_frames(namespace: dict) -> int:
    """Frames on any thread's stack running module-level code, a class body
    or `exec` in `namespace`. Each runs a function made for the call
    (PyEval_EvalCode), which holds the namespace where no walk sees it, and
    its caller may hold the namespace as an argument on its stack (`exec`,
    `runpy`): while one runs, the count cannot be exact."""
    n = 0
    for frame in sys._current_frames().values():
        while frame is not None:
            n += not frame.f_code.co_flags & _CO_OPTIMIZED and frame.f_globals is namespace
            frame = frame.f_back
    return n


def unaccounted(namespaces: list, counted: dict, visited: list, young_kept: list) -> list:
    """Per namespace, its references the walk cannot account for (0: every
    function whose globals it is was found; see the module notes).
    `counted`: what `heapwalk.walk` counted for them; `visited`: the
    functions it found; `young_kept`: what its own collections kept."""
    young, refcounts = young_functions_and_refcounts(namespaces)
    walked = {id(f) for f in visited}
    unvisited = {id(f): f for f in chain(young_kept, young) if type(f) is FunctionType and id(f) not in walked}
    del young
    by_globals: dict = {}
    for f in unvisited.values():
        by_globals[id(f.__globals__)] = by_globals.get(id(f.__globals__), 0) + 1
    # the argument of getrefcount, as `map` passed it
    return [refcount - counted[id(ns)] - by_globals.get(id(ns), 0) - 1
            for ns, refcount in zip(namespaces, refcounts)]
