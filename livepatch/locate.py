"""Locating targets: from a `module:qualname` name to every live function
object that runs the target's code, and every generator or coroutine that is
suspended inside it.

Identity is what counts: a target resolves to code objects (found by walking
the module's attributes, by the qualname recorded in code objects, and through
enclosing functions' constants for nested code), and then to *every* function
whose `__code__` is one of those objects, however it is referenced (aliases,
decorator chains, registries, bound methods, closures). One pass over the heap
serves a whole batch of targets."""

from __future__ import annotations

import functools
import gc
import operator
import os
import sys
import threading
import types
import weakref
from collections import defaultdict
from itertools import chain, compress, repeat, starmap
from dataclasses import dataclass, field

from . import heapwalk, walkproof
from .young import YoungKeeper, counts as gc_counts
from .errors import Problem

FunctionType = types.FunctionType
_SUSPENDABLE = (types.GeneratorType, types.CoroutineType, types.AsyncGeneratorType)
_BUILTIN_TYPES = (
    types.BuiltinFunctionType,
    types.MethodDescriptorType,
    types.WrapperDescriptorType,
    types.MethodWrapperType,
    types.ClassMethodDescriptorType,
)



def loaded_module(name: str):
    """The loaded module called `name`. A program started as `python -m
    pkg.mod` or `python pkg/mod.py` runs that module as `__main__`, so a
    patch built from the source tree (which calls it `pkg.mod`) finds it
    there when no module of that name was imported separately."""
    module = sys.modules.get(name)
    if module is not None:
        return module
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name == name:
        return main
    if spec is None and getattr(main, "__file__", None):
        stem = os.path.splitext(os.path.basename(main.__file__))[0]
        if stem == name.rpartition(".")[2]:
            return main
    return None

def split_target(target: str) -> tuple[str, str]:
    module, sep, qualname = target.partition(":")
    if not sep or not module or not qualname or ":" in qualname:
        raise ValueError(f"target {target!r} is not of the form 'module:qualname'")
    return module, qualname


def frame_code(obj):
    """The code a generator/coroutine/async generator is suspended in."""
    return getattr(obj, "gi_code", None) or getattr(obj, "cr_code", None) or getattr(obj, "ag_code", None)


def suspended_frame(obj):
    """The live frame of a generator-like object, None once it has finished."""
    if isinstance(obj, types.GeneratorType):
        return obj.gi_frame
    if isinstance(obj, types.CoroutineType):
        return obj.cr_frame
    return obj.ag_frame


# Below this many tracked objects one `gc.get_referrers` pass takes well under
# a millisecond (about 18 ns per object); above it the heap is walked in
# bounded steps (heapwalk). Allocated blocks are about three per tracked object.
SMALL_HEAP = 20_000
# Walks whose result the namespaces' refcounts could not prove complete
# before one gc.get_referrers pass is made instead (see walkproof).
WALKS = 2
# Tracked objects the last walk visited: None until the first one. Asking the
# allocator how big the heap is costs ~1 ms at 5x10^6 objects, so it is only
# asked when the last walk found a small heap.
_heap_hint = None


def _small_heap() -> bool:
    return _heap_hint is not None and _heap_hint < SMALL_HEAP and sys.getallocatedblocks() < 3 * SMALL_HEAP


@dataclass
class HeapIndex:
    """The functions of the target modules and the generator-likes running
    target code. On a small heap gathered with `gc.get_referrers` (one
    C-level pass, well under a millisecond there); on a bigger one by
    `heapwalk.walk`, whose every C-level call is bounded, so other threads
    run while it goes on. Objects made later are added from the young
    generation (`add_young`, see `young_snapshot`).

    Deliberately not `gc.get_objects()`: holding a list of every object hands
    out references to objects other threads are still building (a tuple
    being filled from an iterator has its refcount checked by
    `_PyTuple_Resize`, and fails with SystemError if we hold it). Referrers of
    a module's globals dict are functions, the module and frames, never
    half-built containers; the walk only follows references from modules and
    stacks, and the young snapshot keeps functions and generator-likes only."""

    functions: list = field(default_factory=list)
    suspendables: list = field(default_factory=list)
    frozen_objects: int = 0
    by_code: dict = field(default_factory=dict)
    by_name: dict = field(default_factory=dict)
    complete: bool = False  # every function of the modules was found in their namespaces
    walked: bool = False  # found by the walk: `reachable` holds every generator-like
    reachable: list = field(default_factory=list)
    anchors: list = field(default_factory=list)
    # (counts before, counts after) of each walk that collected the young
    # generation itself (see `young`); after is None if anyone else collected meanwhile
    own_collections: list = field(default_factory=list)
    walks: int = 0
    located: str = ""  # how the functions were found (the namespace, one pass, walks)

    @classmethod
    def scan(cls, modules=()) -> "HeapIndex":
        """Index the functions whose globals are one of `modules` (names)."""
        index = cls()
        mods = [mod for mod in map(loaded_module, modules) if mod is not None]
        if not mods:
            return index
        namespaces = [_module_functions(mod) for mod in mods]  # before anything else holds their dicts
        anchors = index.anchors = [vars(mod) for mod in mods]
        if all(found is not None for found in namespaces):
            index.functions = [f for found in namespaces for f in found]
            index.complete = True
            index.located = "namespace"
        elif _small_heap():
            index._one_pass(anchors)
        else:
            index._walk_for(anchors)
        index._reindex()
        return index

    def _one_pass(self, anchors: list) -> None:
        self.functions = [o for o in gc.get_referrers(*anchors) if type(o) is FunctionType]
        self.frozen_objects = gc.get_freeze_count()
        if self.frozen_objects:
            # gc.freeze() moves objects where get_referrers does not look;
            # those are found by one walk from the roots, cached per freeze.
            known = {id(f) for f in self.functions}
            self.functions += [f for f in _frozen_cache.functions()
                               if id(f) not in known and any(f.__globals__ is a for a in anchors)]
        self.located = f"one pass after {self.walks} walks" if self.walks else "one pass"

    def _walk_for(self, anchors: list) -> None:
        """The functions of `anchors` (and every generator-like) by walking
        the heap; again when the namespaces' refcounts say the walk may have
        missed one (see walkproof), and by one pass after WALKS such walks.
        The walk follows references, so frozen objects are found like any other."""
        global _heap_hint
        ids = {id(a) for a in anchors}
        kept: list = []  # what earlier walks' collections moved out of the young generation
        while self.walks < WALKS:
            self.walks += 1
            counted = dict.fromkeys(ids, 0)
            keeper = YoungKeeper(_WANTED_YOUNG)
            found, _heap_hint = heapwalk.walk((FunctionType,) + _SUSPENDABLE, keeper.step, counted)
            visited = [f for f in found if type(f) is FunctionType]
            self.functions = [f for f in visited if id(f.__globals__) in ids]
            self.reachable = [o for o in found if type(o) is not FunctionType]
            self.walked = True
            self.add_young(kept)
            self._take_young(keeper)
            kept += keeper.kept
            if not keeper.active:  # the collector is on: objects leave the young generation unseen
                self.located = "walk (not proven: the collector is on)"
                return
            if walkproof.running_module_code(anchors):
                self.located = "walk (not proven: module-level code of a target module is running)"
                return
            young, refcounts, _ = young_snapshot(anchors)  # the list the walk counted: no new holder
            if not any(walkproof.unaccounted(anchors, refcounts, young, counted, visited, kept)):
                self.located = "walk" if self.walks == 1 else f"walk {self.walks}"
                return
            del found, visited, young
        self._one_pass(anchors)

    def _reindex(self) -> None:
        by_code = defaultdict(list)
        by_name = defaultdict(list)
        for f in self.functions:
            code = f.__code__
            by_code[id(code)].append(f)
            by_name[(f.__module__, code.co_qualname)].append(f)
        self.by_code = by_code
        self.by_name = by_name

    def add_young(self, young: list) -> int:
        """Add the functions of the target modules and the generator-likes
        among `young` (see `young_snapshot`) not indexed yet; how many
        functions (new generator-likes only matter to find_suspendables)."""
        ids = {id(a) for a in self.anchors}
        known = {id(o) for o in self.functions}
        functions = [f for f in young if type(f) is FunctionType and id(f.__globals__) in ids and id(f) not in known]
        known = {id(o) for o in self.reachable}
        others = [o for o in young if type(o) is not FunctionType and id(o) not in known]
        self.functions += functions
        self.reachable += others
        if functions:
            self._reindex()
        return len(functions)

    def _take_young(self, keeper: YoungKeeper) -> int:
        """After the walk: add what its own collections moved out of the
        young generation (see `young`), and keep the counts they left; how
        many functions were added."""
        keeper.finish()
        if keeper.collections or not keeper.clean:
            self.own_collections.append((keeper.started, keeper.counts if keeper.clean else None))
        return self.add_young(keeper.kept)

    def take_counts(self, counts: tuple) -> tuple | None:
        """`counts` (`gc_counts()` read before the index was made, or last
        returned) moved on by the walks' own collections since; None if
        objects left the young generation unseen (a collection or freeze by
        hand meanwhile): the caller locates again."""
        walks, self.own_collections = self.own_collections, []
        for before, after in walks:
            if before != counts or after is None:
                return None
            counts = after
        return counts

    def find_suspendables(self, codes) -> int:
        """Collect the generator-likes whose code is one of `codes`; how many
        functions of the modules a walk for them came upon as young (the
        caller plans again when any did)."""
        codes = list(codes)
        ids = {id(c) for c in codes}
        added = 0
        if self.complete and codes and not self.walked and not _small_heap():
            # the namespaces say nothing of generators: walk the heap for them,
            # once (every generator-like is kept, for later calls)
            keeper = YoungKeeper(_WANTED_YOUNG)
            everywhere = heapwalk.walk(_SUSPENDABLE, keeper.step)[0]
            known = {id(o) for o in self.reachable}
            self.reachable += [o for o in everywhere if id(o) not in known]
            self.walked = True
            added = self._take_young(keeper)
        found = [o for o in self.reachable if id(frame_code(o)) in ids]  # walked, or young
        if not self.walked:
            for i in range(0, len(codes), 64):  # get_referrers compares linearly with its arguments
                found += [o for o in gc.get_referrers(*codes[i:i + 64]) if type(o) in _SUSPENDABLE]
            if self.frozen_objects and codes:
                found += [o for o in _frozen_cache.suspendables() if id(frame_code(o)) in ids]
        self.suspendables = list({id(o): o for o in found}.values())
        return added

    def functions_using(self, code) -> list:
        return [f for f in self.by_code.get(id(code), ()) if f.__code__ is code]

    def suspended_in(self, code_ids: set[int]) -> list:
        out = []
        for g in self.suspendables:
            if id(frame_code(g)) in code_ids and suspended_frame(g) is not None:
                out.append(g)
        return out


# Containers in a namespace looked into for functions, up to this many items.
_NAMESPACE_ITEMS = 10_000
_CONTAINERS = (dict, list, tuple, set, frozenset)


def _module_functions(module) -> list | None:
    """Every function whose globals are the module's namespace, found from it (its
    values, classes, decorator chains, closures, registries), or None when
    some are elsewhere. Each such function holds a reference to the
    namespace, so when the ones found account for every reference to it
    (besides the module's and ours), there is no other: then locating costs
    what the module holds, not what the heap holds, and no heap pass is
    needed."""
    namespace = vars(module)
    found: dict = {}
    seen: set = set()
    # not what __builtins__ holds: builtins are C functions, and a function
    # of this module stored there only makes the count below fall short
    todo = [v for k, v in namespace.items() if k != "__builtins__"]
    while todo:
        obj = todo.pop()
        if id(obj) in seen or obj is None:
            continue
        seen.add(id(obj))
        kind = type(obj)
        if kind is FunctionType:
            if obj.__globals__ is namespace:
                found[id(obj)] = obj
            todo += [c.cell_contents for c in obj.__closure__ or () if _cell_set(c)]
            todo += [v for v in (obj.__dict__.get("__wrapped__"),) if v is not None]
            continue
        # type(obj), never isinstance(): a class's __class__ or __getattr__
        # is its own code, which this walk must neither run nor be fooled by
        if issubclass(kind, type):
            if type.__dict__["__module__"].__get__(obj) == namespace.get("__name__"):
                todo += type.__dict__["__dict__"].__get__(obj).values()
            continue
        if kind in _CONTAINERS:
            if len(obj) <= _NAMESPACE_ITEMS:
                todo += obj.values() if kind is dict else obj
            continue
        if issubclass(kind, types.ModuleType):
            continue
        if issubclass(kind, property):
            todo += (obj.fget, obj.fset, obj.fdel)
            continue
        if issubclass(kind, functools.partial):
            todo.append(obj.func)
            continue
        todo += _held_without_running(obj, kind)
    del todo, seen
    # the namespace's references: the module's, each function's, `namespace`
    # here and the argument of getrefcount
    if sys.getrefcount(namespace) - 3 == len(found):
        return list(found.values())
    return None


_HELD = ("__func__", "__wrapped__", "registry", "func")


def _held_without_running(obj, kind) -> list:
    """What a wrapper holds (static and class methods, bound methods,
    functools.wraps-style and singledispatch wrappers, partialmethod), read
    from C-level members and the object's own instance dict only: an
    attribute read through the type could run the object's code (a
    __getattr__ that makes a new object on every read never lets a walk
    end)."""
    if issubclass(kind, (staticmethod, classmethod, types.MethodType)):
        return [obj.__func__]
    for klass in kind.__mro__:
        slot = type.__dict__["__dict__"].__get__(klass).get("__dict__")
        if slot is not None:
            break
    else:
        return []
    if type(slot) is not types.GetSetDescriptorType:  # a __dict__ of the class's own making
        return []
    try:
        own = slot.__get__(obj, kind)
    except Exception:
        return []
    if type(own) is not dict:
        return []
    return [v for v in (own.get(a) for a in _HELD) if v is not None and v is not obj]


def _cell_set(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # an empty cell
        return False
    return True


_WANTED_YOUNG = frozenset((FunctionType,) + _SUSPENDABLE)
_young_objects = functools.partial(gc.get_objects, 0)
_keep_wanted = functools.partial(map, _WANTED_YOUNG.__contains__)
_types_of = functools.partial(map, type)


def young_snapshot(codes: tuple) -> tuple[list, list, tuple]:
    """(the functions and generator-likes among the objects made since the
    last collection, `sys.getrefcount` of each of `codes`, the collection
    and freeze counts), all read in one C-level call, so no other thread
    runs in between (the counts are read last: a collection just before
    them only makes the caller look again). While the collector stays off (and no one collects or
    freezes by hand: the counts say so), every object made since is young,
    so an index that was complete when the collector went off is complete
    again with these added, and the refcounts say whether anything came to
    hold a target code since (`holders_unchanged`).

    The young generation itself is let go inside the same call: a list of
    it would hold objects other threads are still building (see HeapIndex)."""
    box: list = []
    out = list(chain(
        map(box.append, map(operator.call, repeat(_young_objects, 1))),
        map(list, map(compress, box, map(_keep_wanted, map(_types_of, box)))),
        map(sys.getrefcount, codes),
        starmap(operator.call, ((box.clear,), (gc_counts,)))))  # gc_counts is Python: after the clear
    return out[1], out[2:-2], out[-1]


def holders_unchanged(codes: tuple, expected: list) -> bool:
    """Whether each of `codes` has the refcount `young_snapshot` read (the
    same way: through `map`, so the temporary references are the same)."""
    return list(map(sys.getrefcount, codes)) == expected


class _FrozenCache:
    """Functions and generator-likes reachable from the roots, gathered once
    per `gc.freeze()` (frozen objects never move back on their own). Held
    weakly so the cache keeps nothing alive."""

    def __init__(self):
        self._count = -1
        self._functions = weakref.WeakSet()
        self._suspendables = weakref.WeakSet()

    def _refresh(self):
        count = gc.get_freeze_count()
        if count == self._count:
            return
        functions, suspendables = weakref.WeakSet(), weakref.WeakSet()
        for obj in _reachable_from_roots():
            (functions if type(obj) is FunctionType else suspendables).add(obj)
        self._functions, self._suspendables, self._count = functions, suspendables, count

    def functions(self):
        self._refresh()
        return list(self._functions)

    def suspendables(self):
        self._refresh()
        return list(self._suspendables)


_frozen_cache = _FrozenCache()


def _reachable_from_roots() -> list:
    """Functions and generator-likes reachable from modules and thread stacks
    (slow). Only containers reachable from roots are visited, so no half-built
    object is ever referenced. Running frames do not report their locals to
    the collector, so those are added explicitly."""
    roots = list(sys.modules.values())
    frames = sys._current_frames()
    frames[threading.get_ident()] = sys._getframe(1)  # not this frame: see heapwalk._roots
    for frame in frames.values():
        while frame is not None:
            roots.append(frame)
            roots.extend(frame.f_locals.values())
            frame = frame.f_back
    seen = {id(r) for r in roots}
    out = []
    stack = roots
    wanted = (FunctionType,) + _SUSPENDABLE
    while stack:
        obj = stack.pop()
        if type(obj) in wanted:
            out.append(obj)
        # A module is followed through its __dict__ only: an extension
        # module's own traverse may report raw freelist memory (CPython
        # gh-122695: _asyncio on 3.12 before 3.12.6), which get_referents
        # would resurrect and free again, corrupting the freelist.
        refs = (obj.__dict__,) if isinstance(obj, types.ModuleType) else gc.get_referents(obj)
        for ref in refs:
            if id(ref) not in seen:
                seen.add(id(ref))
                stack.append(ref)
    return out


def functions_reachable(obj, _depth: int = 0):
    """Function objects an attribute value stands for: itself, or what it
    wraps (decorator chains, methods, static/class methods, properties,
    partials, cached properties)."""
    if _depth > 32 or obj is None:
        return
    if isinstance(obj, FunctionType):
        yield obj
        yield from functions_reachable(getattr(obj, "__wrapped__", None), _depth + 1)
        return
    if isinstance(obj, property):
        for f in (obj.fget, obj.fset, obj.fdel):
            yield from functions_reachable(f, _depth + 1)
        return
    if isinstance(obj, functools.partial):
        yield from functions_reachable(obj.func, _depth + 1)
        return
    for attr in ("__func__", "func", "__wrapped__"):
        inner = getattr(obj, attr, None) if not isinstance(obj, type) else None
        if inner is not None and inner is not obj:
            yield from functions_reachable(inner, _depth + 1)


def _lookup(owner, name):
    if isinstance(owner, type):
        for klass in owner.__mro__:
            if name in vars(klass):
                return vars(klass)[name]
        raise AttributeError(name)
    if isinstance(owner, types.ModuleType):
        return vars(owner)[name]
    # a function attribute path (e.g. a decorated function's attribute)
    return getattr(owner, name)


def nested_codes(code, qualname: str):
    """Code objects named `qualname` among `code`'s constants, recursively."""
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            if const.co_qualname == qualname:
                yield const
            elif qualname.startswith(const.co_qualname + "."):
                yield from nested_codes(const, qualname)


@dataclass
class Resolution:
    target: str
    codes: list  # candidate code objects, distinct
    builtin: object = None  # the C function, when the target is one


def resolve(target: str, heap: HeapIndex) -> Resolution | Problem:
    """Candidate code objects for a target name (not yet checked against a
    baseline). Returns a Problem when nothing of that name exists."""
    try:
        modname, qualname = split_target(target)
    except ValueError as exc:
        return Problem("not-found", target, str(exc))
    module = loaded_module(modname)
    if module is None:
        return Problem("not-found", target, f"module {modname!r} is not loaded in this process")
    parts = qualname.split(".")
    # the attribute path to the function itself or, for nested code, to the
    # outermost function that encloses it
    outer = parts[: parts.index("<locals>")] if "<locals>" in parts else parts
    outer_qual = ".".join(outer)

    codes: dict[int, types.CodeType] = {}
    obj = module
    try:
        for name in outer:
            obj = _lookup(obj, name)
    except (KeyError, AttributeError):
        obj = None
    if obj is not None and isinstance(obj, _BUILTIN_TYPES):
        return Resolution(target, [], builtin=obj)
    roots = []
    if obj is not None:
        roots = [f for f in functions_reachable(obj) if f.__code__.co_qualname == outer_qual]
    roots += heap.by_name.get((modname, outer_qual), [])
    for f in roots:
        code = f.__code__
        if outer_qual == qualname:
            codes[id(code)] = code
        else:
            for inner in nested_codes(code, qualname):
                codes[id(inner)] = inner
    # closures already created from nested code are indexed by their own name
    for f in heap.by_name.get((modname, qualname), []):
        codes[id(f.__code__)] = f.__code__
    if not codes:
        if obj is not None and not roots and not isinstance(obj, (types.FunctionType, property)):
            found = type(obj).__name__
            return Problem("not-found", target, f"{modname}.{'.'.join(outer)} is a {found}, not a Python function")
        return Problem("not-found", target, f"no function {qualname!r} in module {modname!r}")
    return Resolution(target, list(codes.values()))
