"""Fault injection at every step of apply and rollback: a failure anywhere
leaves every function, default and global exactly as it was."""
import pytest

import livepatch
from livepatch import commit, patchstack, transition
from conftest import assert_unchanged, patch_of, snapshot

SRC = '''
LIMIT = 1
def f(a, b=1):
    return a + b
def g(*, k=2):
    return k
class C:
    def m(self):
        return "m"
'''
NEW = '''
import json
LIMIT = 2
def helper():
    return 40
def f(a, b=10):
    return a + b + helper()
def g(*, k=20):
    return -k
class C:
    def m(self):
        return "M"
'''


class Boom(Exception):
    pass


def _fail(*args, **kwargs):
    raise Boom("injected")


def _fail_on_call(n, real):
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise Boom(f"injected at call {n}")
        return real(*args, **kwargs)
    return wrapper


STEPS = {
    "heap scan": lambda mp: mp.setattr(patchstack.HeapIndex, "scan", classmethod(lambda cls, modules: _fail())),
    "locate second target": lambda mp: mp.setattr(patchstack, "resolve", _fail_on_call(2, patchstack.resolve)),
    "fingerprint": lambda mp: mp.setattr(patchstack, "fingerprint", _fail_on_call(3, patchstack.fingerprint)),
    "compatibility check": lambda mp: mp.setattr(patchstack, "check_change", _fail_on_call(2, patchstack.check_change)),
    "global stores": lambda mp: mp.setattr(patchstack, "_resolve_owner", _fail),
    "building ops": lambda mp: mp.setattr(patchstack.Engine, "_make_ops", staticmethod(_fail)),
    "suspended generator scan": lambda mp: mp.setattr(patchstack.HeapIndex, "find_suspendables", _fail),
    "final check in one call": lambda mp: (mp.setattr(commit, "_CLEAN", _FailingLookup()),
                                           mp.setattr(commit, "_ALL_PROVEN", _fail)),
    "final check after a handoff": lambda mp: (mp.setattr(commit, "ONE_CALL_ENABLED", False),
                                               mp.setattr(transition, "first_busy", _fail_on_call(1, transition.first_busy))),
}
# the two ways of making the critical section (see livepatch/commit.py)
WAYS = {"one call": True, "after a handoff": False}


class _FailingLookup(dict):
    """Stands in for the check's verdict table inside the one-call commit."""
    def __getitem__(self, key):
        raise Boom("injected")


def _store_failure_at(position):
    """Insert a store that really fails (a builtin has no __code__) into the
    op list, at the start, middle or end."""
    real = patchstack.Engine._make_ops

    def make_ops(*args):
        ops, undo, saved, functions = real(*args)
        at = {"first": 0, "middle": len(ops) // 2, "last": len(ops)}[position]
        ops.insert(at, (setattr, len, "__code__", (lambda: 0).__code__))
        undo.insert(at, (setattr, len, "__code__", None))
        return ops, undo, saved, functions
    return staticmethod(make_ops)


def _behaviour(m):
    return (m.f(1), m.g(), m.C().m(), m.LIMIT, hasattr(m, "helper"), hasattr(m, "json"))


@pytest.mark.parametrize("step", sorted(STEPS))
def test_apply_fault_changes_nothing(step, make_module, engine, monkeypatch):
    m, src = make_module(SRC)
    patch = patch_of(m, src, NEW)
    before, behaviour = snapshot(m), _behaviour(m)
    STEPS[step](monkeypatch)
    with pytest.raises(Exception) as info:
        engine.apply(patch, timeout=0.2)
    assert "injected" in str(info.value) or isinstance(info.value, livepatch.PatchError)
    monkeypatch.undo()
    assert_unchanged(m, before)
    assert _behaviour(m) == behaviour
    assert engine.status()["applied"] == []
    assert engine.status()["history"][-1]["outcome"] in ("failed", "refused")
    engine.apply(patch)  # and the engine is still usable afterwards
    assert _behaviour(m) == (51, -20, "M", 2, True, True)


@pytest.mark.parametrize("way", sorted(WAYS))
@pytest.mark.parametrize("position", ["first", "middle", "last"])
def test_store_failing_inside_the_commit_is_undone(position, way, make_module, engine, monkeypatch):
    m, src = make_module(SRC)
    patch = patch_of(m, src, NEW)
    before, behaviour = snapshot(m), _behaviour(m)
    monkeypatch.setattr(commit, "ONE_CALL_ENABLED", WAYS[way])
    monkeypatch.setattr(patchstack.Engine, "_make_ops", _store_failure_at(position))
    with pytest.raises(livepatch.CommitFailed, match="all earlier stores were undone"):
        engine.apply(patch)
    assert_unchanged(m, before)
    assert _behaviour(m) == behaviour
    assert engine.status()["history"][-1]["outcome"] == "failed"


@pytest.mark.parametrize("step", ["heap scan", "building ops", "final check in one call", "final check after a handoff"])
def test_rollback_fault_keeps_the_patch_applied(step, make_module, engine, monkeypatch):
    m, src = make_module(SRC)
    engine.apply(patch_of(m, src, NEW))
    before, behaviour = snapshot(m), _behaviour(m)
    STEPS[step](monkeypatch)
    with pytest.raises(Exception):
        engine.rollback()
    monkeypatch.undo()
    assert_unchanged(m, before)
    assert _behaviour(m) == behaviour
    assert [p["id"] for p in engine.status()["applied"]] == ["HP-1"]
    engine.rollback()
    assert _behaviour(m) == (2, 2, "m", 1, False, False)


@pytest.mark.parametrize("way", sorted(WAYS))
def test_switch_interval_and_gc_are_restored_after_a_failed_commit(way, make_module, engine, monkeypatch):
    import gc
    import sys
    m, src = make_module(SRC)
    interval = sys.getswitchinterval()
    monkeypatch.setattr(commit, "ONE_CALL_ENABLED", WAYS[way])
    monkeypatch.setattr(patchstack.Engine, "_make_ops", _store_failure_at("middle"))
    with pytest.raises(livepatch.CommitFailed):
        engine.apply(patch_of(m, src, NEW))
    assert sys.getswitchinterval() == interval and gc.isenabled()
    assert commit.HOLD_INTERVAL > interval
