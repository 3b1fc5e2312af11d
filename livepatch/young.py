"""The young generation kept small while the heap is walked.

A transition keeps the collector off, so that every object made after
locating stays in generation 0, where `locate.young_snapshot` finds it. A
walk of a big heap takes seconds, and whatever the service's threads make
and keep meanwhile piles up there: the snapshot reads the young generation
in one C-level call, and the first collection after the collector is back
on traverses all of it, each as long as the pile (3 to 4 ms at 5x10^6
objects with one busy thread, more in a service that allocates).

So between the walk's steps, every STEPS_BETWEEN steps, once the young
generation is past YOUNG_BOUND objects or once the walk's own waiting lists
made since the last collection took WALK_REFERENCES, `YoungKeeper.step`
keeps its functions and generator-likes and collects generations 0 and 1,
in one C-level call: nothing else runs between the reading and the
collection (the service's `gc.callbacks` are set aside for it: they are
Python code, run before the collection moves anything), and what is made
afterwards, finalizers of this collection included, is young again. A
collection anyone else makes meanwhile (`gc.collect()` or `gc.freeze()` by
hand) moves objects unseen: `clean` turns false and the caller locates
again, as it does when that happens without a walk."""

from __future__ import annotations

import gc
import operator
from functools import partial
from itertools import chain, compress, repeat, starmap

# Objects in generation 0 above which a step collects: reading and
# collecting this many takes well under a millisecond.
YOUNG_BOUND = 2000
# Steps after which one collects anyway: the count above goes down when any
# object is freed, old ones too, and so says less than what is young (10^4
# young objects, 5 ms of collection, at 5x10^6 objects with it alone).
STEPS_BETWEEN = 32
# References in the walk's waiting lists made since the last collection
# above which a step collects: the collection visits each referent, cold on
# a big heap (at 5x10^6 objects, 32 steps' lists, up to 16k references, took
# 1 ms to collect).
WALK_REFERENCES = 4096

# The service's gc.callbacks while a step collects without them: a child
# forked meanwhile gets them back (forksafe).
_set_aside = None

_young_objects = partial(gc.get_objects, 0)
_types_of = partial(map, type)


def counts() -> tuple:
    """Collections per generation and the freeze count (see locate.gc_counts)."""
    return tuple(g["collections"] for g in gc.get_stats()) + (gc.get_freeze_count(),)


class YoungKeeper:
    """Keeps the objects of `wanted` types that leave generation 0 while the
    heap is walked (`kept`), by collecting it itself in bounded steps."""

    def __init__(self, wanted: frozenset):
        self.wanted = wanted
        # with the collector on (a walk outside a transition), objects leave
        # generation 0 anyway and nothing here relies on them staying
        self.active = not gc.isenabled()
        self.kept: list = []
        self.collections = 0
        self.clean = True
        self.started = self.counts = counts()
        self.steps = 0
        self.made_then = 0

    def step(self, made: int = 0) -> None:
        """Between two of the walk's steps; `made`: references its waiting
        lists have taken so far (see heapwalk.walk)."""
        self.steps += 1
        if not self.active or not self.clean:
            return
        if (self.steps < STEPS_BETWEEN and made - self.made_then <= WALK_REFERENCES
                and gc.get_count()[0] <= YOUNG_BOUND):
            return
        self.steps = 0
        self.made_then = made
        if counts() != self.counts:  # someone else collected or froze since the last step
            self.clean = False
            return
        global _set_aside
        hooks = _set_aside = gc.callbacks[:]
        del gc.callbacks[:]
        try:
            self._keep_and_collect()
        finally:
            gc.callbacks[:0] = hooks  # before any the collection's finalizers added
            _set_aside = None
        self.collections += 1
        expected = list(self.counts)
        expected[1] += 1
        self.counts = counts()
        if self.counts != tuple(expected):
            self.clean = False

    def _keep_and_collect(self) -> None:
        # One C-level call: the young generation read, its wanted objects
        # kept, the list of it let go (no object dies of that: each is held
        # elsewhere, nothing ran since it was read) and generations 0 and 1
        # collected, whose finalizers run only once survivors have moved.
        box: list = []
        is_wanted = partial(map, self.wanted.__contains__)
        list(chain(
            map(box.append, map(operator.call, repeat(_young_objects, 1))),
            map(self.kept.extend, map(compress, box, map(is_wanted, map(_types_of, box)))),
            starmap(operator.call, ((box.clear,), (gc.collect, 1)))))

    def finish(self) -> None:
        """After the walk: whether anyone else collected since the last step."""
        if self.active and self.clean and counts() != self.counts:
            self.clean = False


def restore_in_child() -> None:
    """In a child forked while a step had set the callbacks aside."""
    global _set_aside
    if _set_aside is not None:
        gc.callbacks[:0] = [h for h in _set_aside if h not in gc.callbacks]
        _set_aside = None
