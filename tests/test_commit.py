"""The critical section itself (livepatch/commit.py): the one-call commit,
what its check trusts, and when the commit goes after a GIL handoff instead."""
import subprocess
import sys
import threading
import time

import pytest

import livepatch
from livepatch import commit
from livepatch.safepoint import scan_stacks
from conftest import patch_of

SRC = '''
def target():
    return "old"
'''


class Parked:
    """A thread that runs `body(park)`. `park` is a C-level lock acquire, so
    the frame that calls it is the thread's top frame while it waits;
    `advance(code)` lets it go on to the next park() made from `code`."""

    def __init__(self, body, code):
        self._lock = threading.Lock()
        self._lock.acquire()
        self.thread = threading.Thread(target=body, args=(self._lock.acquire,), daemon=True)
        self.thread.start()
        self._wait_for(code)

    def _wait_for(self, code):
        for _ in range(5000):
            top = sys._current_frames().get(self.thread.ident)
            if top is not None and top.f_code is code:
                return
            time.sleep(0.001)
        raise AssertionError(f"the thread never parked in {code.co_name}")

    def advance(self, code):
        self._lock.release()
        self._wait_for(code)

    def finish(self):
        self._lock.release()
        self.thread.join(5)


def _one_store():
    """ops and undo ops of one real store into a scratch namespace."""
    box = type("Box", (), {"value": "before"})
    return box, [(setattr, box, "value", "after")], [(setattr, box, "value", "before")]


def _commit_in_one_call(proven, code_ids, parked):
    """A one-call commit of one store, judged on the parked thread's stack
    against `proven`. Other threads of the test process (pytest-xdist's)
    may run meanwhile: their stacks are rescanned on each try, as the
    engine would, so only the parked thread can make the check fail."""
    for _ in range(20):
        mine = {tid: top for tid, top in sys._current_frames().items() if tid != parked.thread.ident}
        _, also = scan_stacks(mine, code_ids)
        box, ops, undo = _one_store()
        attempt = commit.OneCall(ops, undo).attempt
        outcome = attempt(proven | also, code_ids)
        if outcome.committed:
            break
    return outcome, box.value


def test_one_call_commit_trusts_a_thread_one_plain_call_above_a_proven_frame():
    def body(park):
        park()       # scanned here
        helper(park)  # then one call deeper

    def helper(park):
        park()

    t = Parked(body, body.__code__)
    _, proven = scan_stacks(sys._current_frames(), set())
    t.advance(helper.__code__)
    outcome, value = _commit_in_one_call(proven, set(), t)
    t.finish()
    assert outcome.committed and outcome.method == commit.ONE_CALL and value == "after"


def test_one_call_check_refuses_a_target_entered_since_the_scan():
    def body(park):
        park()
        target_function(park)

    def target_function(park):
        park()

    t = Parked(body, body.__code__)
    _, proven = scan_stacks(sys._current_frames(), {id(target_function.__code__)})
    t.advance(target_function.__code__)  # now inside the target, one call above a proven frame
    outcome, value = _commit_in_one_call(proven, {id(target_function.__code__)}, t)
    t.finish()
    assert not outcome.committed and outcome.blocker is commit.STALE and value == "before"


def _two_calls_deeper():
    """A thread parked two calls deeper than when the stacks were scanned:
    inner -> outer -> body, and outer was never seen, so inner's caller is
    not proven. Returns the thread and what the scan proved."""
    def body(park):
        park()
        outer(park)

    def outer(park):
        inner(park)

    def inner(park):
        park()

    t = Parked(body, body.__code__)
    _, proven = scan_stacks(sys._current_frames(), set())
    t.advance(inner.__code__)
    return t, proven


def test_one_call_check_refuses_a_thread_two_calls_deeper():
    t, proven = _two_calls_deeper()
    outcome, value = _commit_in_one_call(proven, set(), t)
    t.finish()
    assert not outcome.committed and outcome.blocker is commit.STALE and value == "before"


def test_one_call_check_does_not_trust_the_committing_thread_called_from_an_unscanned_frame():
    """The committing thread's own frame is taken as proven only when it was
    called by the frame that scanned; through a frame the scan never saw
    (here a target, entered after the scan) the attempt is refused."""
    def scanned_here():
        _, proven = scan_stacks(sys._current_frames(), {id(target_function.__code__)})
        return target_function(proven)

    def target_function(proven):
        box, ops, undo = _one_store()
        return commit.OneCall(ops, undo).attempt(proven, {id(target_function.__code__)}), box.value

    outcome, value = scanned_here()
    assert not outcome.committed and outcome.blocker is commit.STALE and value == "before"


def test_one_call_commit_can_be_attempted_again_after_a_stale_check_and_a_failed_store():
    t, proven = _two_calls_deeper()
    box, ops, undo = _one_store()
    failing = [*ops, (setattr, len, "__code__", None)]  # a builtin has no __code__
    one_call = commit.OneCall(failing, [*undo, (setattr, box, "value", "unreachable")])
    outcome = one_call.attempt(proven, set())
    assert outcome.blocker is commit.STALE
    _, proven = scan_stacks(sys._current_frames(), set())
    with pytest.raises(livepatch.CommitFailed, match="all earlier stores were undone"):
        one_call.attempt(proven, set())
    t.finish()
    assert box.value == "before"  # the first store took effect and was undone


def test_one_call_check_trusts_a_generator_frame_only_through_its_proven_caller():
    """A generator frame is never proven itself (it can be resumed from
    anywhere); on top of a stack it passes only if its caller right now is a
    proven frame and it is not a target."""
    def gen(park):
        park()
        yield

    def body(park):
        park()
        next(gen(park))

    t = Parked(body, body.__code__)
    _, proven = scan_stacks(sys._current_frames(), set())
    t.advance(gen.__code__)  # the generator frame is on top, body (proven) below it
    outcome, _ = _commit_in_one_call(proven, {id(gen.__code__)}, t)
    assert not outcome.committed and outcome.blocker is commit.STALE
    outcome, value = _commit_in_one_call(proven, set(), t)
    t.finish()
    assert outcome.committed and value == "after"


def test_apply_and_rollback_commit_in_one_call(make_module, engine):
    m, src = make_module(SRC)
    assert not commit.audit_hooks_installed()  # nothing in the test process installs one
    result = engine.apply(patch_of(m, src, SRC.replace("old", "new")))
    assert result.method == commit.ONE_CALL and m.target() == "new"
    assert 0 < result.critical_ns <= result.pause_ns
    assert engine.rollback().method == commit.ONE_CALL and m.target() == "old"
    assert [e["commit"] for e in engine.history()] == [commit.ONE_CALL, commit.ONE_CALL]


TWO = '''
def first():
    return "old"
def second():
    return "old"
'''


@pytest.mark.parametrize("one_call", [True, False], ids=["one-call", "after-handoff"])
def test_a_finalizer_of_code_a_rollback_lets_go_never_sees_half_of_it(one_call, make_module, engine, monkeypatch):
    """Once the patch object is gone, the rollback's stores drop the last
    references to the patched code. A weak reference's callback (Python
    code, a service's own cache for one) would run right there, between two
    stores, if the commit did not keep what it replaces alive until it ends."""
    import gc
    import weakref
    monkeypatch.setattr(commit, "ONE_CALL_ENABLED", one_call)
    m, src = make_module(TWO)
    old = (m.first.__code__, m.second.__code__)
    engine.apply(patch_of(m, src, TWO.replace("old", "new")))
    seen = []

    def finalizer(ref):
        seen.append((m.first.__code__ is old[0], m.second.__code__ is old[1]))

    refs = [weakref.ref(m.first.__code__, finalizer), weakref.ref(m.second.__code__, finalizer)]
    assert engine.rollback().method == (commit.ONE_CALL if one_call else commit.AFTER_HANDOFF)
    gc.collect()
    assert [r() for r in refs] == [None, None]  # the patched code is gone, so the finalizers ran
    assert seen == [(True, True), (True, True)]  # and only once both functions were restored


def test_a_disabled_one_call_commit_goes_after_a_handoff(make_module, engine, monkeypatch):
    m, src = make_module(SRC)
    monkeypatch.setattr(commit, "ONE_CALL_ENABLED", False)
    result = engine.apply(patch_of(m, src, SRC.replace("old", "new")))
    assert result.method == commit.AFTER_HANDOFF and m.target() == "new"


def test_generator_targets_commit_after_a_handoff(make_module, engine):
    """Suspended generators created since the heap scan are looked for inside
    the section, which takes Python code: that runs only after a handoff."""
    src = "def gen():\n    yield 'old'\n"
    m, _ = make_module(src)
    result = engine.apply(patch_of(m, src, src.replace("old", "new")))
    assert result.method == commit.AFTER_HANDOFF and next(m.gen()) == "new"


HOOK_SCRIPT = '''
import sys, tempfile, pathlib
d = tempfile.mkdtemp(); sys.path.insert(0, d)
pathlib.Path(d, "hooked.py").write_text("def f():\\n    return 1\\n")
import hooked, livepatch
from livepatch import commit
from livepatch.build import patch_from_source
before = commit.audit_hooks_installed()
sys.addaudithook(lambda event, args: None)
print(before, commit.audit_hooks_installed())
src = "def f():\\n    return 1\\n"
print(livepatch.apply(patch_from_source("HP-1", "hooked", src.replace("1", "2"), base_source=src)).method, hooked.f())
'''


def test_an_audit_hook_is_detected_and_the_commit_goes_after_a_handoff():
    """An audit hook runs inside every `__code__` store; written in Python it
    could switch threads there, so only the handoff's window is safe."""
    out = subprocess.run([sys.executable, "-c", HOOK_SCRIPT], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["False True", f"{commit.AFTER_HANDOFF} 2"]


@pytest.mark.parametrize("owner", ["module subclass with __setattr__", "class with a metaclass"])
def test_stores_into_owners_that_run_python_commit_after_a_handoff(owner, make_module, engine):
    m, src = make_module(SRC)
    if owner.startswith("module"):
        class Noisy(type(m)):
            def __setattr__(self, name, value):
                super().__setattr__(name, value)
        m.__class__ = Noisy
        new = SRC.replace("old", "new") + "\nADDED = 1\n"
    else:
        src = SRC + "\nclass Meta(type):\n    pass\nclass K(metaclass=Meta):\n    def m(self):\n        return 1\n"
        m, src = make_module(src)
        new = src.replace('"old"', '"new"') + "    def extra(self):\n        return 3\n"  # a method added to K
    result = engine.apply(patch_of(m, src, new))
    assert result.method == commit.AFTER_HANDOFF and m.target() == "new"
    if owner.startswith("class"):
        assert m.K().extra() == 3


def test_stores_that_run_python_past_the_deadline_are_undone(make_module, engine):
    """Python code inside the stores (here a module's own __setattr__) runs
    bytecode, where another thread could be let in once its wait is long
    enough; stores that run past a quarter of that are undone, every one
    that took effect (the function's code, stored first, too), and the apply
    is refused with the reason. (The interval is long here so that the slow
    store never reaches the point where another thread may ask for the GIL;
    past that point the commit is finished and reported instead.)"""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.05)
    try:
        _apply_with_a_slow_store(make_module, engine)
    finally:
        sys.setswitchinterval(interval)


def _apply_with_a_slow_store(make_module, engine):
    m, src = make_module(SRC)

    class Slow(type(m)):
        def __setattr__(self, name, value):
            super().__setattr__(name, value)
            if name == "ADDED":  # past a quarter of 50 ms, well before 50 ms
                end = time.perf_counter() + 0.02
                while time.perf_counter() < end:
                    pass
    m.__class__ = Slow
    new = SRC.replace("old", "new") + "\nADDED = 1\n"
    try:
        engine.apply(patch_of(m, src, new), timeout=0.5)
    except livepatch.TargetBusy as refused:
        assert m.target() == "old" and "ADDED" not in vars(m)
        assert refused.problems[0].message == commit.LATE
        assert engine.status()["applied"] == []
    else:
        # The OS took the committing thread off the CPU inside the slow store
        # (a loaded machine): then other threads may have run there, and the
        # commit is finished rather than undone, and reported.
        assert m.target() == "new" and m.ADDED == 1
        assert "other threads ran during the commit" in engine.status()["warnings"][-1]


def test_one_call_commit_needs_every_store_to_set_a_different_attribute():
    """Its rewind undoes the stores that took effect in no particular order,
    which restores the state only if no attribute is set twice."""
    def f():
        pass
    one, two = (lambda: 1).__code__, (lambda: 2).__code__
    assert commit.OneCall.fits([(setattr, f, "__code__", one), (setattr, f, "__defaults__", (1,))])
    assert not commit.OneCall.fits([(setattr, f, "__code__", one), (setattr, f, "__code__", two)])
