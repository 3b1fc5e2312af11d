"""Locating without a pass over the whole heap, and what may change between
locating and the commit: every function running the old code is still
switched, however and whenever it was made before the commit."""
import functools
import gc
import json
import linecache
import os
import subprocess
import sys
import threading
import types
import warnings
import weakref

import pytest

from livepatch import heapwalk, history, locate, transition
from livepatch.locate import HeapIndex
from conftest import patch_of

SRC = '''
import functools

def deco(f):
    @functools.wraps(f)
    def wrapper(*a):
        return f(*a)
    return wrapper

def price(x):
    return x + 1

@deco
def wrapped(x):
    return x + 1

class Cart:
    def total(self):
        return 1

    @property
    def p(self):
        return 1

def make(n):
    def row(a):
        return a + n
    return row

@functools.singledispatch
def show(x):
    return 1

@show.register(int)
def _(x):
    return 1

registry = []
'''
NEW = SRC.replace("return x + 1", "return x + 2").replace("return 1\n", "return 2\n").replace("a + n", "a + n * 10")


def _walk_the_heap(monkeypatch):
    """Nothing known of the heap and no namespace proof: the apply walks it."""
    monkeypatch.setattr(locate, "_heap_hint", None)
    monkeypatch.setattr(locate, "_module_functions", lambda module: None)


def _names(functions):
    return sorted(f"{f.__qualname__}@{id(f)}" for f in functions)


def test_namespace_pass_is_used_only_when_it_found_every_function(make_module):
    m, _ = make_module(SRC)
    index = HeapIndex.scan([m.__name__])
    assert index.complete  # every function of the module is reachable from its namespace
    assert _names(index.functions) == _names(f for f in gc.get_referrers(vars(m)) if isinstance(f, types.FunctionType))
    kept = m.make(1)  # a closure held outside the module: the namespace cannot account for it
    index = HeapIndex.scan([m.__name__])
    assert not index.complete and any(f is kept for f in index.functions)


def test_heap_walk_finds_what_one_referrers_pass_finds(make_module, monkeypatch):
    m, _ = make_module(SRC)
    held_in_a_local = m.make(3)
    m.registry.append(m.make(4))
    elsewhere = {"deep": [(m.make(5),)]}
    monkeypatch.setattr(locate, "_heap_hint", None)  # nothing known of the heap: walk it
    walked = HeapIndex.scan([m.__name__])
    assert walked.walked and not walked.complete
    expected = [f for f in gc.get_referrers(vars(m)) if isinstance(f, types.FunctionType)]
    assert _names(walked.functions) == _names(expected)
    assert held_in_a_local in walked.functions and elsewhere["deep"][0][0] in walked.functions


def test_heap_walk_in_tiny_steps_finds_the_same(make_module, monkeypatch):
    """Steps, slices of big containers and visited-address regions far
    smaller than the containers: the walk still finds every function."""
    m, _ = make_module(SRC)
    in_a_big_list = [[i] for i in range(50)] + [m.make(1)]
    in_a_big_dict = {i: (i, m.make(2) if i == 33 else None) for i in range(60)}
    in_a_big_set = {functools.partial(m.make(3), 1)} | {(i, str(i)) for i in range(40)}
    monkeypatch.setattr(heapwalk, "STEP", 3)
    monkeypatch.setattr(heapwalk, "SLICE", 4)
    monkeypatch.setattr(heapwalk, "BATCH_BYTES", 256)
    monkeypatch.setattr(heapwalk, "REGION_SHIFT", 6)  # 64-byte regions: most objects alone in one
    _walk_the_heap(monkeypatch)
    walked = HeapIndex.scan([m.__name__])
    assert walked.walked
    expected = [f for f in gc.get_referrers(vars(m)) if isinstance(f, types.FunctionType)]
    assert _names(walked.functions) == _names(expected)
    held = [in_a_big_list[-1], in_a_big_dict[33][1], next(iter(p for p in in_a_big_set if callable(p))).func]
    assert all(any(f is h for f in walked.functions) for h in held)


def test_heap_walk_keeps_a_few_bytes_per_object_it_visits():
    """What the walk allocates is returned to the system when it ends, in one
    call as long as the allocation is big (tens of MiB kept as sets of ids
    at 10^6 objects took 4 to 6 ms in one free). Its bookkeeping stays a few
    bytes per visited object: a bit per 16 bytes of addresses, and the
    slices of the biggest container (8 bytes per item)."""
    import tracemalloc
    flat = [[i] for i in range(100_000)]
    nested = [[[i] for i in range(1000)] for _ in range(100)]
    was_enabled = gc.isenabled()
    gc.disable()
    tracemalloc.start()
    try:
        _, visited = heapwalk.walk((types.FunctionType,))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        if was_enabled:
            gc.enable()
    assert visited > len(flat) + 100 * 1000
    assert peak / visited < 16, f"{peak / visited:.1f} bytes per visited object"
    del flat, nested


def test_objects_made_during_a_walk_are_switched_though_it_collects_the_young_generation(make_module, engine,
                                                                                           monkeypatch):
    """The walk keeps the young generation small by collecting it itself
    (what the service keeps meanwhile would otherwise make the young
    snapshot, and the first collection after the apply, one long hold); a
    function made meanwhile and moved out of it by those collections is
    still switched. This one is held only where the walk does not look (by
    `atexit`, in C state): nothing but the young generation can name it."""
    import atexit
    from livepatch import young
    m, src = make_module(SRC)
    _walk_the_heap(monkeypatch)
    monkeypatch.setattr(heapwalk, "STEP", 64)
    monkeypatch.setattr(young, "YOUNG_BOUND", 200)
    made, kept_alive, keepers = [], [], []
    real_step = young.YoungKeeper.step

    def step_while_the_service_allocates(self, references=0):
        if not made:
            row = m.make(5)
            atexit.register(row)
            made.append(weakref.ref(row))  # the walk finds what the test's frame holds: a weak reference only
            keepers.append(self)
            del row
        kept_alive.append([[] for _ in range(20)])  # what the service keeps meanwhile
        real_step(self, references)
        assert gc.get_count()[0] <= young.YOUNG_BOUND + 21
    monkeypatch.setattr(young.YoungKeeper, "step", step_while_the_service_allocates)
    try:
        engine.apply(patch_of(m, src, NEW))
        assert keepers[0].collections > 0 and keepers[0].clean
        assert not any(o is made[0]() for o in gc.get_objects(0))  # it left the young generation
        assert made[0]()(1) == 51 and m.make(1)(1) == 11
        engine.rollback()
        assert made[0]()(1) == 6
    finally:
        atexit.unregister(made[0]())


class _MovedBetweenWalkSteps:
    """A closure held in one of two small lists, moved into the other just
    before the walk reads the one it is in: it is always where the walk
    has already read (a thread moving it at the worst moments, made
    deterministic). `walks`: on how many walks it moves so."""

    def __init__(self, monkeypatch, closure, walks: int):
        self.lists = ([closure], [])
        self.walks_left = walks
        self.moves = 0
        real_referents, real_slices = gc.get_referents, heapwalk._slices

        def move_out_of(objs):
            if self.walks_left:
                for i, held in enumerate(self.lists):
                    if held and any(o is held for o in objs):
                        self.lists[1 - i].append(held.pop())
                        self.moves += 1

        def get_referents(*objs):
            move_out_of(objs)
            return real_referents(*objs)

        def slices(obj):  # a list grown past BATCH_BYTES is read in slices, when they are taken
            move_out_of((obj,))
            return (part for part in list(real_slices(obj)))
        monkeypatch.setattr(heapwalk, "BATCH_BYTES", 64)  # a call reads one small list at a time
        monkeypatch.setattr(heapwalk.gc, "get_referents", get_referents)
        monkeypatch.setattr(heapwalk, "_slices", slices)
        real_walk = heapwalk.walk

        def walk(*args, **kwargs):
            try:
                found = real_walk(*args, **kwargs)
            finally:
                self.walks_left = max(0, self.walks_left - 1)
            moved = next(held[0] for held in self.lists if held)  # not in a cell: the walk would see it
            self.found_by_each_walk.append(any(f is moved for f in found[0]))
            del moved
            return found
        self.found_by_each_walk = []
        monkeypatch.setattr(heapwalk, "walk", walk)


def _scan_with_the_collector_off(module):
    gc.collect()  # what the test made is old, as a service's functions are (young ones are found as young)
    gc.disable()  # as in a transition: the walk's result is proven only then
    try:
        return HeapIndex.scan([module.__name__])
    finally:
        gc.enable()


@pytest.mark.parametrize("walks_that_miss, located", [(1, "walk 2"), (2, "one pass after 2 walks")])
def test_a_function_moved_while_the_heap_is_walked_is_found_all_the_same(make_module, monkeypatch,
                                                                         walks_that_miss, located):
    """The walk reads the heap in steps while other threads run, so a
    function whose every reference moves from a container not read yet into
    one already read is never seen; the namespace's refcount says one is
    missing, and the engine walks again, then makes one referrers pass."""
    m, _ = make_module(SRC)
    monkeypatch.setattr(locate, "_heap_hint", None)
    mover = _MovedBetweenWalkSteps(monkeypatch, m.make(7), walks_that_miss)
    index = _scan_with_the_collector_off(m)
    # the walks it moved in missed it (it was never where they read), the next one found it
    assert mover.found_by_each_walk[:walks_that_miss] == [False] * walks_that_miss
    assert index.located == located, (index.located, mover.found_by_each_walk)
    moved = next(held[0] for held in mover.lists if held)
    assert any(f is moved for f in index.functions)
    expected = [f for f in gc.get_referrers(vars(m)) if isinstance(f, types.FunctionType)]
    assert _names(index.functions) == _names(expected)


def test_a_function_made_during_a_first_walk_that_missed_one_is_kept_for_the_second(make_module, monkeypatch):
    """What the first walk's own collections moved out of the young
    generation is not young for the second walk: it is carried over, so
    the second walk is proven complete with it (no single pass), and it
    is indexed. This one is held only by `atexit` (C state), where no walk
    looks."""
    import atexit
    from livepatch import young
    m, _ = make_module(SRC)
    monkeypatch.setattr(locate, "_heap_hint", None)
    monkeypatch.setattr(young, "YOUNG_BOUND", 50)
    mover = _MovedBetweenWalkSteps(monkeypatch, m.make(7), walks=1)
    made = []
    real_step = young.YoungKeeper.step

    def step_making_one(self, references=0):
        if not made:
            row = m.make(8)
            atexit.register(row)
            made.append(weakref.ref(row))
            del row
        real_step(self, references)
    monkeypatch.setattr(young.YoungKeeper, "step", step_making_one)
    index = _scan_with_the_collector_off(m)
    try:
        assert mover.found_by_each_walk[0] is False
        assert index.located == "walk 2", index.located
        assert any(f is made[0]() for f in index.functions)
        assert not any(o is made[0]() for o in gc.get_objects(0))  # it had left the young generation
    finally:
        atexit.unregister(made[0]())


def test_a_walk_nothing_moved_in_is_proven_complete_by_the_namespace_refcount(make_module, monkeypatch):
    """The proof costs nothing when nothing moved: one walk, and the
    functions one referrers pass would find."""
    m, _ = make_module(SRC)
    monkeypatch.setattr(locate, "_heap_hint", None)
    held_in_a_local = m.make(3)
    m.registry.append(m.make(4))
    index = _scan_with_the_collector_off(m)
    assert index.located == "walk" and index.walks == 1
    expected = [f for f in gc.get_referrers(vars(m)) if isinstance(f, types.FunctionType)]
    assert _names(index.functions) == _names(expected) and held_in_a_local in index.functions


@pytest.mark.parametrize("how, located", [
    ("a local", "walk"),
    ("module-level code", "walk (not proven: module-level code of a target module is running)")])
def test_a_running_frame_holding_the_namespace_does_not_set_off_the_single_pass(make_module, monkeypatch, how,
                                                                               located):
    """A running frame reports neither its locals nor its copy of them to the
    collector: the walk reads them from the stacks and counts them, so a
    thread holding the namespace in a local (as `runpy` does `__main__`'s)
    leaves the walk proven. One running module-level code in it (a
    `__main__` serve loop, `exec`) holds it where no count can see: the
    walk's result stands, as not proven, and no single pass is made."""
    m, _ = make_module(SRC)
    monkeypatch.setattr(locate, "_heap_hint", None)
    m.registry.append(m.make(4))
    stop, running = threading.Event(), threading.Event()
    m._livepatch_test_events = (stop, running)

    def run_in_the_namespace(namespace):
        if how == "module-level code":
            exec("_livepatch_test_events[1].set()\n_livepatch_test_events[0].wait(30)\n", namespace)
        else:
            running.set()
            stop.wait(30)
    worker = threading.Thread(target=run_in_the_namespace, args=(vars(m),))
    worker.start()
    try:
        running.wait(10)
        index = _scan_with_the_collector_off(m)
    finally:
        stop.set()
        worker.join()
    assert index.located == located, index.located
    expected = [f for f in gc.get_referrers(vars(m)) if isinstance(f, types.FunctionType)
                and f.__code__.co_name != "<module>"]  # the function exec made for its call: nothing else holds it
    assert _names(index.functions) == _names(expected)


def test_a_function_moved_during_every_walk_of_an_apply_is_switched(make_module, engine, monkeypatch):
    m, src = make_module(SRC)
    _walk_the_heap(monkeypatch)
    mover = _MovedBetweenWalkSteps(monkeypatch, m.make(5), walks=10)
    gc.collect()  # old, as a service's functions are: not found as young
    engine.apply(patch_of(m, src, NEW))
    moved = next(held[0] for held in mover.lists if held)
    assert not any(mover.found_by_each_walk) and moved(1) == 51  # no walk saw it, and it is switched: a + n * 10
    engine.rollback()
    assert moved(1) == 6


_YOUNG_LISTS_AT_EACH_COLLECTION = """
import gc, json, sys, types
from livepatch import heapwalk, young
young.YOUNG_BOUND = 10 ** 9
young.WALK_REFERENCES = int(sys.argv[1])
seen = []
real_collect = young.YoungKeeper._keep_and_collect

def measuring(self):
    seen.append(sum(len(o) for o in gc.get_objects(0) if type(o) is list))
    real_collect(self)
young.YoungKeeper._keep_and_collect = measuring
rows = [[[i] for i in range(j, j + 1000)] for j in range(0, 100_000, 1000)]
index = {i: [i] for i in range(10_000)}
gc.disable()
keeper = young.YoungKeeper(frozenset({types.FunctionType}))
heapwalk.walk((types.FunctionType,), keeper.step)
assert keeper.clean and len(seen) > 10
print(json.dumps({"per_collection": seen[1:], "batch": heapwalk.BATCH_BYTES // 8}))
"""


def _young_list_references_per_collection(walk_references: int) -> dict:
    """References held by young lists at each of a walk's own collections
    but the first (which also sees the walk's roots), over a heap of wide
    lists and a big dict, in a fresh interpreter: no other thread there
    makes lists meanwhile."""
    out = subprocess.run([sys.executable, "-c", _YOUNG_LISTS_AT_EACH_COLLECTION, str(walk_references)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_a_walks_own_collections_visit_a_bounded_number_of_its_references():
    """Each young collection visits every referent of the walk's waiting
    lists made since the last one, cold on a big heap: the keeper collects
    once they took WALK_REFERENCES, whatever the number of steps. On top:
    the lists of the last step (up to a batch's referents) and the steps
    an older list was split into (not counted again: up to a batch)."""
    bounded = _young_list_references_per_collection(500)
    bound = 500 + 2 * bounded["batch"] + heapwalk.STEP + 64
    assert max(bounded["per_collection"]) <= bound, bounded
    unbounded = _young_list_references_per_collection(10 ** 9)  # steps alone set it off
    assert max(unbounded["per_collection"]) > bound, unbounded


def test_a_collection_by_hand_during_a_walk_makes_the_engine_locate_again(make_module, engine, monkeypatch):
    """Objects it moved out of the young generation were not seen: the
    index cannot be trusted, whenever it came during the walk."""
    from livepatch import young
    m, src = make_module(SRC)
    _walk_the_heap(monkeypatch)
    monkeypatch.setattr(young, "YOUNG_BOUND", -1)  # every step collects
    scans, own = [], []
    real_scan = HeapIndex.scan.__func__
    real_collect = young.YoungKeeper._keep_and_collect

    def counting_scan(cls, modules):
        scans.append(1)
        return real_scan(cls, modules)

    def then_one_by_hand(self):
        real_collect(self)
        own.append(1)
        if len(scans) == 1 and len(own) == 3:
            gc.collect(0)  # the service, by hand, right after the walk's own third collection
    monkeypatch.setattr(HeapIndex, "scan", classmethod(counting_scan))
    monkeypatch.setattr(young.YoungKeeper, "_keep_and_collect", then_one_by_hand)
    engine.apply(patch_of(m, src, NEW))
    assert len(scans) == 2 and m.price(1) == 3


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_child_forked_while_a_walk_collects_keeps_the_services_gc_callbacks(make_module, engine, monkeypatch):
    from livepatch import young
    m, src = make_module(SRC)
    _walk_the_heap(monkeypatch)
    monkeypatch.setattr(young, "YOUNG_BOUND", -1)
    seen_in_child = []

    def services_callback(phase, info):
        pass
    real_collect = young.YoungKeeper._keep_and_collect

    def fork_inside(self):
        if not seen_in_child:
            assert services_callback not in gc.callbacks  # set aside for the collection
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads: what is tested here
                pid = os.fork()
            if pid == 0:
                os._exit(0 if gc.callbacks.count(services_callback) == 1 else 1)
            seen_in_child.append(os.waitpid(pid, 0)[1])
        real_collect(self)
    gc.callbacks.append(services_callback)
    monkeypatch.setattr(young.YoungKeeper, "_keep_and_collect", fork_inside)
    try:
        engine.apply(patch_of(m, src, NEW))
    finally:
        gc.callbacks.remove(services_callback)
    assert seen_in_child == [0]
    assert services_callback not in gc.callbacks and m.price(1) == 3


@pytest.mark.parametrize("way", ["namespace", "walk"])
def test_a_function_made_from_old_code_after_locating_is_switched_too(way, make_module, engine, monkeypatch):
    m, src = make_module(SRC)
    if way == "walk":
        _walk_the_heap(monkeypatch)
    real_scan = HeapIndex.scan.__func__
    made = []

    def scan_then_make(cls, modules):
        index = real_scan(cls, modules)
        if not made:  # after locating, before the commit: a copy of old code and a new closure
            made.append(types.FunctionType(m.price.__code__, vars(m), "price_copy"))
            made.append(m.make(7))
        return index
    monkeypatch.setattr(HeapIndex, "scan", classmethod(scan_then_make))
    engine.apply(patch_of(m, src, NEW))
    copy, closure = made
    assert copy(1) == m.price(1) == 3
    assert closure(1) == 71 and m.make(1)(1) == 11
    engine.rollback()
    assert copy(1) == m.price(1) == 2 and closure(1) == 8


def test_locating_is_done_once_per_apply(make_module, engine, monkeypatch):
    """A target that stays busy for a while is waited for by attempt after
    attempt, without locating again (the heap pass was per retry burst)."""
    busy_src = SRC + ("\nimport threading\ngate = threading.Event()\nentered = threading.Event()\n"
                      "def work():\n    entered.set()\n    gate.wait()\n    return 1\n")
    m, src = make_module(busy_src)
    import threading
    worker = threading.Thread(target=m.work, daemon=True)
    worker.start()
    m.entered.wait(5)
    scans = []
    real_scan = HeapIndex.scan.__func__
    monkeypatch.setattr(HeapIndex, "scan", classmethod(lambda cls, modules: scans.append(1) or real_scan(cls, modules)))
    monkeypatch.setattr(transition, "BURST_SECONDS", 0.01)  # many bursts
    real_scan_stacks = transition.scan_stacks
    seen_busy = []

    def scan_stacks(frames, ids):
        found = real_scan_stacks(frames, ids)
        if found[0] is not None:
            seen_busy.append(1)
            if len(seen_busy) == 30:
                m.gate.set()
        return found
    monkeypatch.setattr(transition, "scan_stacks", scan_stacks)
    result = engine.apply(patch_of(m, src, busy_src.replace("return 1\n", "return 2\n")), timeout=30)
    worker.join(5)
    assert result.attempts > 30 and len(scans) == 1


def test_history_is_bounded_and_compact(monkeypatch):
    monkeypatch.setattr(history, "MAX_ENTRIES", 50)
    log = history.History()
    targets = [f"mod:f{i}" for i in range(300)]

    class Result:
        pause_ns, attempts, forced, method, functions, interrupted_by = 1, 1, False, "one call", 300, []
    Result.targets = targets
    for i in range(120):
        log.record("apply", f"HP-{i}", "ok", result=Result)
    assert len(log.entries) == 50 and log.entries[-1]["patch"] == "HP-119"
    assert log.entries[-1]["target_count"] == 300 and "targets" not in log.entries[-1]
    # entries older than MAX_AGE go at the next record
    import time
    later = time.time() + history.MAX_AGE + 60
    monkeypatch.setattr(history, "time", types.SimpleNamespace(time=lambda: later))
    log.record("rollback", "HP-119", "ok")
    assert [e["patch"] for e in log.entries] == ["HP-119"]


def test_a_listener_still_gets_every_target(make_module, engine):
    m, src = make_module(SRC)
    got = []
    engine.add_listener(got.append)
    engine.apply(patch_of(m, src, NEW))
    assert len(got[-1]["targets"]) >= 5 and engine.history()[-1]["target_count"] == len(got[-1]["targets"])


def test_rollback_releases_the_patched_source_from_linecache(make_module, engine):
    m, src = make_module(SRC)
    patch = patch_of(m, src, NEW)
    assert patch.sources
    engine.apply(patch)
    names = list(patch.sources)
    assert all(linecache.cache[n][2] == patch.sources[n].splitlines(keepends=True) for n in names)
    engine.rollback()
    assert not any(linecache.cache.get(n, (None, None, None))[2] == patch.sources[n].splitlines(keepends=True)
                   for n in names)
