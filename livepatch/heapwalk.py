"""The heap, walked in bounded steps: every function and generator-like
reachable from the modules and the thread stacks, found without any single
C-level call that grows with the heap.

`gc.get_referrers` and `gc.get_objects` each hold the GIL for one pass over
every tracked object (about 18 ns per object: 2 ms at 10^5 objects, 90 ms at
5x10^6), and no other thread runs meanwhile. Here each C-level call handles
a step of at most `STEP` objects, whose referents it gathers for at most
`BATCH_BYTES` of containers at a time (a huge list or dict is read in
slices), and Python code runs between steps, where the interpreter
switches threads as it does for any busy thread. It costs more CPU than one
pass (it is Python between the calls), so small heaps keep the one pass
(`locate.HeapIndex`).

Only objects the collector tracks are followed: an untracked object (a
string, a number, a tuple or dict of such) refers to no function. Modules
are followed through their `__dict__` only (see `_reachable_from_roots` in
locate). What changes while the walk runs is the caller's business: objects
made meanwhile are young (the caller keeps the collector off, so they stay
in generation 0, see `locate.young_snapshot`, and `between_steps` keeps
that generation small, see `young`)."""

from __future__ import annotations

import _thread
import gc
import sys
import types
from array import array
from bisect import bisect_right
from itertools import accumulate, chain, compress, islice, repeat
from operator import and_, countOf, getitem, not_, or_, rshift, setitem

# Bytes of containers (sys.getsizeof) whose referents one call gathers: about
# 2k references. Each is a cache miss on a big heap: the call increfs it, and
# a young collection visits it again while the list of them waits to be
# checked. At 5x10^6 objects, 16k of them took 1.5 ms in the call, and lists
# holding 4k to 5k of them up to 0.8 ms in the call and 1.3 ms in a young
# collection.
BATCH_BYTES = 1 << 14
# A container larger than BATCH_BYTES is read in slices of SLICE references
# (a dict's keys and values count both; each is a cold incref: at 5x10^6
# objects, a dict's 2048 took 0.5 ms).
SLICE = 1024
# Objects one step looks at (each C-level call of a step handles at most
# this many).
STEP = 512

# The objects visited are marked in bitmaps, one per address region of
# 2**REGION_SHIFT bytes, a bit per 16 bytes (two tracked objects never start
# within 16 bytes of each other: each has a 16-byte collector header before
# it). A set of the visited ids would be rehashed whole, in one C-level call,
# each time it grows (70 ms at 10^6 objects), and sets per region hold a
# Python int and a 16-byte slot per object: tens of MiB at 10^6 objects,
# which the allocator returns to the system in one call, as long as the heap
# is big, when the walk lets go of it. A 32 KiB region's bitmap is 256 bytes
# (the small-object allocator's, released a 1 MiB arena at a time).
REGION_SHIFT = 15
_SLOT_SHIFT = 4
# the bit of an address's slot in its byte, by the address's low 7 bits
_BIT_OF_LOW_BITS = tuple(1 << ((low >> _SLOT_SHIFT) & 7) for low in range(128))

CO_OPTIMIZED = 0x1  # inspect.CO_OPTIMIZED, without importing inspect
_ModuleType = types.ModuleType
_GeneratorType = types.GeneratorType
_getsizeof = sys.getsizeof
_is_tracked = gc.is_tracked


def _roots() -> list:
    """Modules, and every frame on a thread's stack with its locals (running
    frames do not report their locals to the collector). On this thread,
    from the caller of `walk` down: reading a frame's locals keeps a dict of
    them on the frame (3.11, 3.12), and this frame's would hold the roots,
    itself among them: a cycle the collector, off meanwhile, would not free."""
    roots = list(sys.modules.values())
    frames = sys._current_frames()
    frames[_thread.get_ident()] = sys._getframe(2)
    for frame in frames.values():
        while frame is not None:
            roots.append(frame)
            local = frame.f_locals
            if not frame.f_code.co_flags & CO_OPTIMIZED:
                roots.append(local)  # module-level code or a class body: its namespace itself
            else:
                roots.extend(local.values())
                if type(local) is dict:
                    # 3.11, 3.12: the copy of its locals just read, which the
                    # frame keeps: walked too, so that what it holds is
                    # counted (walk's `counted`)
                    roots.append(local)
            frame = frame.f_back
    return roots


def _slices(obj):
    """The items (values and keys) of a big container, a slice per step.
    A dict or set that changes size meanwhile is read again from the start
    (what was seen is skipped by the caller)."""
    if isinstance(obj, (list, tuple)):
        for i in range(0, len(obj), SLICE):
            yield obj[i:i + SLICE]
        return
    if isinstance(obj, (dict, set, frozenset)):
        for _ in range(3):
            try:
                if isinstance(obj, dict):
                    # keys and values flat: a list of the item tuples would
                    # be as many young objects, kept while the slice waits
                    it = chain.from_iterable(obj.items())
                    step = SLICE
                else:
                    it, step = iter(obj), SLICE
                while True:
                    part = list(islice(it, step))
                    if not part:
                        return
                    yield part
            except RuntimeError:  # changed size during iteration: read it again
                continue
    # anything else (and a dict that keeps changing) in one call
    yield gc.get_referents(obj)


def _size(obj) -> int:
    """`sys.getsizeof`, called from Python code: the interpreter may switch
    threads between two objects. Touching cold objects, one C-level call
    over a step's objects took up to 1.6 ms at 5x10^6 objects."""
    try:
        return _getsizeof(obj)
    except Exception:  # a __sizeof__ written in Python that fails
        return 0


def _cumulative_sizes(batch: list) -> array:
    """Kept while the containers wait: 8 bytes each, not an int object each."""
    return array("q", accumulate(map(_size, batch)))


def _unseen(seen: dict, ids: list, region_shift: int) -> list:
    """The ids among `ids` (distinct) not marked in `seen` (a bitmap per
    address region); they are marked. Every step over the ids is one C-level
    call (map and compress over operator functions): no Python per id."""
    regions = list(map(rshift, ids, repeat(region_shift)))
    # a byte marks 8 slots: 128 bytes of addresses
    bitmap_size = 1 << max(0, region_shift - _SLOT_SHIFT - 3)
    for region in set(regions).difference(seen):
        seen[region] = bytearray(bitmap_size)
    bitmaps = list(map(seen.__getitem__, regions))
    at = list(map(and_, map(rshift, ids, repeat(_SLOT_SHIFT + 3)), repeat(bitmap_size - 1)))
    bits = list(map(_BIT_OF_LOW_BITS.__getitem__, map(and_, ids, repeat(127))))
    fresh = list(map(not_, map(and_, map(getitem, bitmaps, at), bits)))
    bitmaps = list(compress(bitmaps, fresh))
    at = list(compress(at, fresh))
    # read-modify-write in order: each byte is read after the previous id's
    # bit went in (two fresh ids can share a byte); setitem returns None
    any(map(setitem, bitmaps, at, map(or_, map(getitem, bitmaps, at), compress(bits, fresh))))
    return list(compress(ids, fresh))


def walk(wanted: tuple, between_steps=None, counted: dict | None = None) -> tuple[list, int]:
    """(every reachable object whose type is in `wanted`, how many tracked
    objects were visited). `between_steps(made)`, if given, is called before
    each step with how many references the walk has gathered into waiting
    lists so far (see young.YoungKeeper: a young collection visits each;
    a waiting list split into steps is not counted again). `counted`, if
    given, maps ids to 0: each is increased by the references to that
    object the walk read (from the roots, a module to its namespace, and
    each visited container), as many as the object's refcount has from
    what was reachable, unless something changed meanwhile (see
    walkproof).

    Two stacks: lists of objects to check against what was seen, and lists
    of visited containers whose referents are still to gather. What waits
    is kept as containers, not as their referents (a step's referents were
    up to a million references, in lists the collector traverses and, once
    they outlive a collection, counts as long-lived: enough, at 5x10^6
    objects, to set off a full collection as the transition ended); the
    referents one call gathers are checked at the next step."""
    wanted = frozenset(wanted)
    is_wanted = wanted.__contains__
    found: list = []
    seen: dict = {}
    to_check: list = [_roots()]
    to_expand: list = []  # [containers, their cumulative sizes, how many are done]
    visited = 0
    made = 0
    while to_check or to_expand:
        if between_steps is not None:
            between_steps(made)
        if not to_check:
            made += _expand_some(to_expand, to_check)
            continue
        batch = to_check.pop()
        if type(batch) is _GeneratorType:  # a big container, read a slice at a time
            part = next(batch, None)
            if part is None:
                continue
            to_check.append(batch)
            batch = part
            made += len(part)
        if len(batch) > STEP:
            to_check += [batch[i:i + STEP] for i in range(STEP, len(batch), STEP)]
            batch = batch[:STEP]
        if counted:
            batch_ids = list(map(id, batch))
            for key in counted:
                counted[key] += countOf(batch_ids, key)
            del batch_ids
        batch = list(filter(_is_tracked, batch)) if batch else batch
        ids = dict(zip(map(id, batch), batch))
        fresh = _unseen(seen, list(ids), REGION_SHIFT)
        if not fresh:
            continue
        batch = list(map(ids.__getitem__, fresh))
        del ids, fresh
        visited += len(batch)
        types_ = list(map(type, batch))
        kinds = set(types_)
        if not kinds.isdisjoint(wanted):
            found += compress(batch, map(is_wanted, types_))
        module_kinds = {k for k in kinds if issubclass(k, _ModuleType)}
        if module_kinds:
            is_module = list(map(module_kinds.__contains__, types_))
            to_check.append(list(map(vars, compress(batch, is_module))))
            batch = list(compress(batch, map(not_, is_module)))
        del types_
        if batch:
            to_expand.append([batch, _cumulative_sizes(batch), 0])
            made += len(batch)
    # let go of what was seen a region at a time: freeing it all at once on
    # return would be one C-level call as long as the heap is big
    while seen:
        seen.popitem()
    return found, visited


def _expand_some(to_expand: list, to_check: list) -> int:
    """The referents of the next run of waiting containers that fits in one
    call (BATCH_BYTES), or the slices of one bigger than that, to check; how
    many references that took (the slices count as they are read)."""
    pending = to_expand[-1]
    batch, sizes, start = pending
    base = sizes[start - 1] if start else 0
    if sizes[start] - base > BATCH_BYTES:
        to_check.append(_slices(batch[start]))
        end = start + 1
        made = 0
    else:
        end = max(start + 1, bisect_right(sizes, base + BATCH_BYTES, start))
        referents = gc.get_referents(*batch[start:end])
        to_check.append(referents)
        made = len(referents)
    if end >= len(batch):
        to_expand.pop()
    else:
        pending[2] = end
    return made
