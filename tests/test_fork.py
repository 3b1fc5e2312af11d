"""Fork safety with real forks: whatever a thread of the parent was doing in
the engine, the child's engine answers, has the garbage collector enabled,
runs no half-done transition and can apply and roll back by itself."""
import gc
import json
import os
import select
import subprocess
import sys
import threading
import time
import warnings

import pytest

import livepatch
from livepatch import commit, patchstack, transition
from conftest import patch_of

SRC = '''
def spin(stop, running):
    running.set()
    while not stop.is_set():
        pass
    return "old"

def f():
    return 1
'''
NEW = SRC.replace('return "old"', 'return "new"').replace("return 1", "return 2")


def in_child(work, timeout=10.0):
    """Fork; run `work()` in the child and return what it returned (JSON),
    or fail if the child does not answer within `timeout`."""
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads: what is tested here
        pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(read_end)
            try:
                out = {"ok": True, "value": work()}
            except BaseException as exc:
                out = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            os.write(write_end, json.dumps(out).encode())
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    try:
        ready, _, _ = select.select([read_end], [], [], timeout)
        if not ready:
            os.kill(pid, 9)
            pytest.fail(f"the forked child did not answer within {timeout}s (deadlocked?)")
        data = b""
        while chunk := os.read(read_end, 65536):
            data += chunk
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    out = json.loads(data)
    assert out["ok"], out.get("error")
    return out["value"]


def child_checks(module, patch):
    """What every child must be able to do with the process-wide engine."""
    started = time.monotonic()
    holder = []
    t = threading.Thread(target=lambda: holder.append(livepatch.status()), daemon=True)
    t.start()
    t.join(5.0)
    answered = time.monotonic() - started
    if not holder:
        return {"status_answered": False}
    status = holder[0]
    before = module.f()
    result = livepatch.apply(patch, timeout=2.0)
    applied = module.f()
    livepatch.rollback(patch.id)
    return {"status_answered": True, "seconds": answered, "gc": gc.isenabled(),
            "applied_in_child": [p["id"] for p in status["applied"]],
            "f": [before, applied, module.f()], "commit": result.method,
            "switch_interval": livepatch.commit.sys.getswitchinterval()}


@pytest.fixture
def spinner(make_module):
    """A module and a thread running its `spin` (a target that never leaves
    the stack until stopped)."""
    m, src = make_module(SRC)
    stop, running = threading.Event(), threading.Event()
    t = threading.Thread(target=m.spin, args=(stop, running), daemon=True)
    t.start()
    running.wait(5)
    yield m, src, stop
    stop.set()
    t.join(5)
    while livepatch.engine.applied_ids():
        livepatch.rollback()


@pytest.mark.parametrize("one_call", [True, False], ids=["one call", "after a handoff"])
def test_fork_while_another_thread_waits_in_apply(spinner, monkeypatch, one_call):
    m, src, stop = spinner
    patch = patch_of(m, src, NEW, "HP-fork")
    monkeypatch.setattr(commit, "ONE_CALL_ENABLED", one_call)
    # one long burst: the GC stays disabled while the apply waits for a safe point
    monkeypatch.setattr(transition, "BURST_SECONDS", 30.0)
    outcome = []

    def apply_in_thread():
        try:
            outcome.append(livepatch.apply(patch, timeout=4.0))
        except Exception as exc:
            outcome.append(exc)

    interval = commit.sys.getswitchinterval()
    applier = threading.Thread(target=apply_in_thread)
    applier.start()
    deadline = time.monotonic() + 3
    while gc.isenabled() and time.monotonic() < deadline:
        time.sleep(0.001)
    assert not gc.isenabled() and livepatch.engine._lock.locked()  # the fork happens mid-apply
    child = in_child(lambda: child_checks(m, patch))
    assert child["status_answered"], "status() hung in the child"
    assert child["gc"] is True
    assert child["applied_in_child"] == []
    assert child["f"] == [1, 2, 1]
    assert child["switch_interval"] == interval
    # the parent's apply goes on: it commits once the target leaves the stack
    stop.set()
    applier.join(10)
    assert isinstance(outcome[0], livepatch.Result), outcome
    assert m.f() == 2 and gc.isenabled()
    assert livepatch.engine.applied_ids() == ["HP-fork"]


def test_fork_while_apply_times_out_in_the_parent(spinner, monkeypatch):
    m, src, stop = spinner
    patch = patch_of(m, src, NEW, "HP-fork-busy")
    monkeypatch.setattr(transition, "BURST_SECONDS", 30.0)
    outcome = []
    applier = threading.Thread(target=lambda: outcome.append(_catch(lambda: livepatch.apply(patch, timeout=1.0))))
    applier.start()
    while gc.isenabled() and applier.is_alive():
        time.sleep(0.001)
    child = in_child(lambda: child_checks(m, patch))
    assert child["status_answered"] and child["gc"] is True and child["f"] == [1, 2, 1]
    applier.join(10)
    assert isinstance(outcome[0], livepatch.TargetBusy)
    assert m.f() == 1 and gc.isenabled() and livepatch.engine.applied_ids() == []


def _catch(fn):
    try:
        return fn()
    except Exception as exc:
        return exc


def test_fork_after_the_stores_but_before_the_bookkeeping_undoes_them_in_the_child(make_module, monkeypatch):
    m, src = make_module(SRC)
    patch = patch_of(m, src, NEW, "HP-window")
    in_window, go_on = threading.Event(), threading.Event()
    real = patchstack.targets_by_module

    def held_in_the_window(*args):
        # apply() calls this right after the commit, before the patch is on the stack
        in_window.set()
        go_on.wait(10)
        return real(*args)

    monkeypatch.setattr(patchstack, "targets_by_module", held_in_the_window)
    outcome = []
    applier = threading.Thread(target=lambda: outcome.append(_catch(lambda: livepatch.apply(patch))))
    applier.start()
    try:
        assert in_window.wait(10)
        assert m.f() == 2  # committed in the parent, not yet recorded

        def in_the_child():
            monkeypatch.undo()
            return {"f": m.f(), "applied": livepatch.engine.applied_ids(), "gc": gc.isenabled(),
                    "again": child_checks(m, patch)["f"]}

        child = in_child(in_the_child)
        assert child == {"f": 1, "applied": [], "gc": True, "again": [1, 2, 1]}
    finally:
        go_on.set()
        applier.join(10)
    assert isinstance(outcome[0], livepatch.Result)
    assert livepatch.engine.applied_ids() == ["HP-window"] and m.f() == 2
    livepatch.rollback()
    assert m.f() == 1


def test_fork_of_an_idle_process_with_a_patch_keeps_it_in_the_child(make_module):
    m, src = make_module(SRC)
    livepatch.apply(patch_of(m, src, NEW, "HP-kept"))
    try:
        child = in_child(lambda: {"f": m.f(), "applied": livepatch.engine.applied_ids(),
                                  "rolled_back": livepatch.rollback().patch_id, "after": m.f()})
        assert child == {"f": 2, "applied": ["HP-kept"], "rolled_back": "HP-kept", "after": 1}
        assert m.f() == 2  # the child's rollback is its own
    finally:
        livepatch.rollback()


def test_a_forked_child_commits_an_inherited_pending_part_when_it_imports(tmp_path, monkeypatch):
    """A pre-fork master with a patch waiting for a module it never imports:
    each worker commits it when the worker imports the module."""
    import importlib
    import sys
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    name = "lp_fork_lazy_app"
    (tmp_path / f"{name}.py").write_text(SRC)
    importlib.invalidate_caches()
    patch = patch_of(importlib.import_module(name), SRC, NEW, "HP-worker")
    del sys.modules[name]
    livepatch.apply(patch)
    try:
        assert livepatch.status()["pending"] == [name]
        child = in_child(lambda: {"f": importlib.import_module(name).f(),
                                  "pending": livepatch.status()["pending"],
                                  "last": livepatch.status()["history"][-1]["action"]})
        assert child == {"f": 2, "pending": [], "last": "import"}
        assert livepatch.status()["pending"] == [name] and name not in sys.modules
    finally:
        livepatch.rollback("HP-worker")
        sys.modules.pop(name, None)


def test_fork_while_a_commit_after_a_handoff_holds_the_long_switch_interval():
    """The committing thread raised the switch interval and disabled the GC
    for its section; a child forked then (the check let go of the GIL) gets
    both back, and its own handoff helper thread."""
    import sys
    interval = sys.getswitchinterval()
    gc.collect()
    inside, leave = threading.Event(), threading.Event()

    def check(frames):
        inside.set()
        leave.wait(10)  # lets go of the GIL inside the section
        return "not now"

    outcome = []
    committer = threading.Thread(target=lambda: outcome.append(commit.run([], [], check)))
    committer.start()
    try:
        assert inside.wait(10)
        assert sys.getswitchinterval() == pytest.approx(commit.HOLD_INTERVAL) and not gc.isenabled()

        def in_the_child():
            then = {"interval": sys.getswitchinterval(), "gc": gc.isenabled()}
            done = commit.run([], [], lambda frames: None)  # a new helper thread in the child
            return {**then, "committed": done.committed}

        child = in_child(in_the_child)
        assert child == {"interval": interval, "gc": True, "committed": True}
    finally:
        leave.set()
        committer.join(10)
    assert outcome[0].blocker == "not now"
    assert sys.getswitchinterval() == interval and gc.isenabled()


SLOW_MODULE = '''
import threading, time
for _ in range(500):  # the body runs until the test has forked
    if getattr(threading, "lp_fork_done", False):
        break
    time.sleep(0.01)
value = 42
'''


@pytest.mark.parametrize("thread_name", ["livepatch-agent-request", "program-thread"])
def test_a_fork_during_an_import_on_a_livepatch_thread_leaves_the_child_able_to_import_it(
        tmp_path, monkeypatch, thread_name):
    """The agent imports lazily on its own threads; a fork then copies a held
    module lock and a half-run module. The child imports it afresh; what a
    program thread was importing is left as it is (its own business)."""
    name = f"lp_slow_import_{thread_name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(SLOW_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    started = threading.Event()

    def importer():
        started.set()
        __import__(name)

    t = threading.Thread(target=importer, name=thread_name, daemon=True)
    t.start()
    started.wait(5)
    deadline = time.monotonic() + 5
    while name not in sys.modules and time.monotonic() < deadline:
        time.sleep(0.005)
    assert name in sys.modules  # its body is running
    try:
        def work():
            import importlib
            module = sys.modules.get(name)
            if thread_name.startswith("livepatch"):
                threading.lp_fork_done = True  # a fresh body must not wait for the dead thread's test flag
                return importlib.import_module(name).value
            return module is not None and not hasattr(module, "value")  # half-run, left alone
        assert in_child(work) in (42, True)
    finally:
        threading.lp_fork_done = True
        t.join(10)
        del threading.lp_fork_done
        sys.modules.pop(name, None)


def test_a_fork_while_the_agent_reads_what_the_process_runs_leaves_the_child_able_to_answer():
    """A gunicorn master forks while its agent's thread, answering a status,
    holds the lock of what the process runs: the worker's first status must
    not wait forever for a thread that does not exist in it."""
    from livepatch.agent import baseline
    held, release = threading.Event(), threading.Event()

    def answering_a_status():
        with baseline._lock:
            held.set()
            release.wait(10)
    t = threading.Thread(target=answering_a_status)
    t.start()
    try:
        held.wait(10)
        got = in_child(lambda: baseline._lock.acquire(timeout=3))
    finally:
        release.set()
        t.join(10)
    assert got is True


FORKING_SERVICE = '''
import os, sys, threading, json
sys.path.insert(0, sys.argv[1])
import forkapp
import livepatch, livepatch.agent
livepatch.agent.start(name="forkapp", trust=sys.argv[2], state_dir=sys.argv[3])
print(os.getpid(), flush=True)
sys.stdin.readline()  # the test has applied the fix through the agent: it is recorded
engine = livepatch.engine
livepatch.rollback()  # the engine alone: the service's record stays, as mid-transition in a parent
held, release = threading.Event(), threading.Event()
def inside_the_engine():  # the parent's agent thread in the middle of a transition
    with engine._lock:
        held.set()
        release.wait()
threading.Thread(target=inside_the_engine, daemon=True).start()
held.wait()
read_end, write_end = os.pipe()
pid = os.fork()
if pid == 0:
    # reached only once every at-fork hook has returned, the agent's start among them
    os.write(write_end, json.dumps({"answer": forkapp.answer(),
                                    "agent": livepatch.agent.socket_path() is not None}).encode())
    os._exit(0)
os.close(write_end)
import select
import subprocess
ready, _, _ = select.select([read_end], [], [], 20)
print(os.read(read_end, 4096).decode() if ready else "the child hung in its at-fork hooks", flush=True)
release.set()
os.kill(pid, 9) if not ready else os.waitpid(pid, 0)
'''


def test_a_child_forked_while_the_engine_lock_is_held_starts_its_agent_and_reapplies(tmp_path, keys):
    """A child's agent starts inside the fork and re-applies the service's
    record at once: every reset (the engine's lock and half-done transition
    among them) must have run before, although the engine's modules were
    imported after the agent registered its start."""
    from live import cli
    for tree, answer in (("base", "old"), ("fix", "new")):
        (tmp_path / tree).mkdir()
        (tmp_path / tree / "forkapp.py").write_text(f"def answer():\n    return {answer!r}\n")
    bundle = str(tmp_path / "fix.lpb")
    assert cli("build", str(tmp_path / "base"), str(tmp_path / "fix"), "-o", bundle, "--id", "HP-FORKAPP",
               "--key", keys["key"], "--name", "forkapp", "--version", "1.0").returncode == 0
    (tmp_path / "service.py").write_text(FORKING_SERVICE)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "service.py"), str(tmp_path / "base"), keys["trust"],
                             str(tmp_path / "state")], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        pid = int(proc.stdout.readline())
        r = cli("apply", str(pid), bundle)
        assert r.returncode == 0, r.stdout + r.stderr
        proc.stdin.write("go\n"); proc.stdin.flush()
        line = proc.stdout.readline().strip()
        assert line.startswith("{"), line + proc.stderr.read()
        assert json.loads(line) == {"answer": "new", "agent": True}
    finally:
        proc.kill()
        proc.wait(10)
