"""Safe points: busy targets are waited for, then reported with their stacks."""
import asyncio
import re
import threading
import time

import pytest

import livepatch
from livepatch import transition
from conftest import patch_of

SRC = '''
import threading
gate = threading.Event()
entered = threading.Event()

def work():
    entered.set()
    gate.wait()
    return "old"

def serve_forever(stop, seen):
    while not stop.is_set():
        seen.append(handle())
        stop.wait(0.001)

def handle():
    return "old"

def gen():
    yield "old"
    yield "old"

async def coro(ev):
    await ev.wait()
    return "old"
'''
NEW = SRC.replace('return "old"', 'return "new"').replace('yield "old"', 'yield "new"')


def _thread(target, *args, name):
    t = threading.Thread(target=target, args=args, name=name, daemon=True)
    t.start()
    return t


def test_busy_thread_is_reported_with_name_and_stack(make_module, engine):
    m, src = make_module(SRC)
    t = _thread(m.work, name="busy-worker")
    m.entered.wait(5)
    try:
        with pytest.raises(livepatch.TargetBusy) as info:
            engine.apply(patch_of(m, src, NEW), timeout=0.3)
        text = str(info.value)
        assert "busy-worker" in text and str(t.ident) in text
        assert "in work" in text and m.__file__ in text
        # what stopped every attempt is counted in the first line
        first = re.search(r"after (\d+) attempts \((\d+) (.*)\)$", text.splitlines()[0])
        assert first and first[1] == first[2] and first[3] == transition.RUNNING, text.splitlines()[0]
        blocker = info.value.blockers[0]
        assert blocker["thread_name"] == "busy-worker" and any("gate.wait()" in s for s in blocker["stack"])
        assert m.handle() == "old"
        assert engine.status()["history"][-1]["problems"][0]["category"] == "busy"
    finally:
        m.gate.set()
        t.join()


def test_waits_until_the_target_leaves_the_stack(make_module, engine, monkeypatch):
    m, src = make_module(SRC)
    t = _thread(m.work, name="leaving")
    m.entered.wait(5)
    real_scan = transition.scan_stacks

    def scan_then_release(frames, code_ids):
        found = real_scan(frames, code_ids)
        if found[0] is not None:
            m.gate.set()  # the thread leaves once an attempt has seen it inside
        return found
    monkeypatch.setattr(transition, "scan_stacks", scan_then_release)
    result = engine.apply(patch_of(m, src, NEW), timeout=5)
    t.join()
    assert result.attempts > 1
    assert m.work() == "new"


def test_suspended_generator_blocks(make_module, engine):
    m, src = make_module(SRC)
    g = m.gen()
    assert next(g) == "old"
    with pytest.raises(livepatch.TargetBusy, match="suspended generator"):
        engine.apply(patch_of(m, src, NEW), timeout=0.2)
    assert next(g) == "old"
    g.close()
    engine.apply(patch_of(m, src, NEW), timeout=1)
    assert list(m.gen()) == ["new", "new"]


def test_suspended_coroutine_blocks(make_module, engine):
    m, src = make_module(SRC)

    async def main():
        ev = asyncio.Event()
        task = asyncio.ensure_future(m.coro(ev))
        await asyncio.sleep(0.01)
        with pytest.raises(livepatch.TargetBusy, match="suspended coroutine"):
            await asyncio.to_thread(engine.apply, patch_of(m, src, NEW), timeout=0.2)
        ev.set()
        assert await task == "old"
        await asyncio.to_thread(engine.apply, patch_of(m, src, NEW), timeout=1)
        return await m.coro(ev)

    assert asyncio.run(main()) == "new"


def test_allow_active_lets_a_loop_keep_running_old_frame(make_module, engine):
    m, src = make_module(SRC)
    stop, seen = threading.Event(), []
    t = _thread(m.serve_forever, stop, seen, name="server")
    while not seen:
        time.sleep(0.001)
    new = NEW.replace("seen.append(handle())", "seen.append(handle() + '!')")
    with pytest.raises(livepatch.TargetBusy, match="server"):
        engine.apply(patch_of(m, src, new), timeout=0.1)
    engine.apply(patch_of(m, src, new, allow_active={"serve_forever"}), timeout=2)
    n = len(seen)
    while len(seen) < n + 3:
        time.sleep(0.001)
    # the running loop is still the old frame, but its callees are new
    assert seen[-1] == "new"
    assert engine.status()["applied"][0]["frames_on_old_code"] == 1
    stop.set()
    t.join()
    assert engine.status()["applied"][0]["frames_on_old_code"] == 0


def test_force_applies_despite_busy_and_marks_status(make_module, engine):
    m, src = make_module(SRC)
    t = _thread(m.work, name="busy-worker")
    m.entered.wait(5)
    result = engine.apply(patch_of(m, src, NEW), timeout=0.1, force=True)
    assert result.forced and engine.status()["forced"] is True
    m.gate.set()
    t.join()
    assert m.work() == "new"


def _wait_until(predicate, timeout=5.0):
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.001)


def test_check_inside_the_commit_trusts_only_frames_that_cannot_have_changed():
    """The section walks a stack only down to a frame the scan before it
    proved clean. A generator frame is never trusted: resumed from a target,
    the same frame object sits above that target, which must still be found."""
    import sys
    from livepatch.safepoint import first_busy, scan_stacks

    step, resumed, done = threading.Event(), threading.Event(), threading.Event()

    def parked():  # suspends the running thread inside the generator
        while True:
            step.wait()
            step.clear()
            resumed.set()
            yield
    gen = parked()

    def plain_caller():
        next(gen)  # the generator frame is on top, plain_caller below it

    def target():
        next(gen)  # later the same generator frame runs above the target
        done.set()

    target_ids = {id(target.__code__)}
    t1 = _thread(plain_caller, name="plain-caller")
    _wait_until(lambda: gen.gi_running)
    found, proven = scan_stacks(sys._current_frames(), target_ids)
    assert found is None
    assert gen.gi_frame not in proven  # resumable: never trusted
    assert sys._current_frames()[t1.ident].f_back in proven  # plain_caller: trusted
    step.set()
    t1.join(5)
    t2 = _thread(target, name="target-caller")
    _wait_until(lambda: gen.gi_running)
    busy = first_busy(sys._current_frames(), target_ids, proven)
    assert busy is not None and busy.f_code is target.__code__
    step.set()
    assert done.wait(5)
    t2.join(5)
    # a thread still in the frames the scan proved clean needs no walk at all
    found, proven = scan_stacks(sys._current_frames(), target_ids)
    assert found is None and first_busy(sys._current_frames(), target_ids, proven) is None
