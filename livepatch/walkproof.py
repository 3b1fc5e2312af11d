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
the count inexact (see `running_module_code`).

So are a function of the module in cyclic garbage (unreachable, so never
walked), a holder made or dropped meanwhile, a value on a running frame's
stack (the namespace passed as an argument to a call in progress) and a
holder the collector cannot see: the count then says "not proven", never
"complete" wrongly, unless one holder let go of the namespace exactly as a
function was missed. Only valid while the collector is off (a transition):
otherwise objects leave the young generation unseen."""

from __future__ import annotations

import sys
from collections import Counter
from itertools import chain
from types import FunctionType

from .heapwalk import CO_OPTIMIZED


def running_module_code(namespaces: list) -> bool:
    """Whether a frame on any thread's stack runs module-level code, a class
    body or `exec` in one of `namespaces`. Each runs a function made for
    the call (PyEval_EvalCode), which holds the namespace where no walk
    sees it, and its caller may hold the namespace as an argument on its
    stack (`exec`, `runpy`): while one runs, the count cannot be exact."""
    ids = {id(ns) for ns in namespaces}
    for frame in sys._current_frames().values():
        while frame is not None:
            if not frame.f_code.co_flags & CO_OPTIMIZED and id(frame.f_globals) in ids:
                return True
            frame = frame.f_back
    return False


def unaccounted(namespaces: list, refcounts: list, young: list, counted: dict, visited: list,
                young_kept: list) -> list:
    """Per namespace, its references the walk cannot account for (0: every
    function whose globals it is was found; see the module notes).
    `refcounts` and `young`: `sys.getrefcount` of each namespace and what
    is young, read in one C-level call (`locate.young_snapshot`);
    `counted`: what `heapwalk.walk` counted for them; `visited`: the
    functions it found; `young_kept`: what its own collections kept."""
    walked = {id(f) for f in visited}
    unvisited = {id(f): f for f in chain(young_kept, young) if type(f) is FunctionType and id(f) not in walked}
    by_globals = Counter(id(f.__globals__) for f in unvisited.values())
    # the argument of getrefcount, as `map` passed it
    return [refcount - counted[id(ns)] - by_globals[id(ns)] - 1 for ns, refcount in zip(namespaces, refcounts)]
