"""Patches for modules imported later: the part for a module that is not
imported stays pending and is committed by the import hook right after the
module's code ran, before the import returns; all of it or none of it."""
import importlib
import itertools
import sys
import textwrap
import threading
import time
import types

import pytest

import livepatch
from livepatch import AtImport, Change, Patch, commit, imports, patchstack
from conftest import assert_unchanged, patch_of

_counter = itertools.count()

# Every lazily imported test module ends with this line: it snapshots the
# module as its own code left it, just before the import hook runs, so a
# test can tell "exactly as imported" from "patched at import".
TAIL = '\n__import__("lp_snapstore").take(__name__)\n'
STORE = '''
import sys
from conftest import snapshot
SNAPS = {}
def take(name):
    state = snapshot(sys.modules[name])
    # while its code runs, the module sees the hook's stand-in loader; the
    # real one is put back right after
    loader = state["globals"]["__loader__"]
    state["globals"]["__loader__"] = vars(loader).get("_livepatch_loader", loader)
    SNAPS[name] = state
'''

SRC = '''
import os
LIMIT = 1
def f(a, b=1):
    return a + b
def g():
    return "g"
class C:
    def m(self):
        return "m"
if os.environ.get("LP_TEST_FAIL_IMPORT") == __name__:
    raise RuntimeError("import failed on purpose")
'''
NEW = '''
import os
import json
LIMIT = 2
def helper():
    return LIMIT * 20
def f(a, b=10):
    return a + b + helper()
def g():
    return "G"
class C:
    def m(self):
        return "M"
if os.environ.get("LP_TEST_FAIL_IMPORT") == __name__:
    raise RuntimeError("import failed on purpose")
'''
BASELINE = (2, "g", "m", 1, False)
PATCHED = (51, "G", "M", 2, True)


def behaviour(m):
    return m.f(1), m.g(), m.C().m(), m.LIMIT, hasattr(m, "helper")


def _rebound(fn, module):
    """`fn` as a function of `module` (what a bundle builds at import)."""
    new = types.FunctionType(fn.__code__, vars(module), fn.__name__, fn.__defaults__, fn.__closure__)
    new.__kwdefaults__, new.__qualname__ = fn.__kwdefaults__, fn.__qualname__
    return new


def at_import(patch):
    """The patch with every new function built for the module when its part
    commits, as a bundle for a module not imported yet carries it."""
    patch.new_globals = {k: (AtImport(lambda module, v=v: _rebound(v, module)) if isinstance(v, types.FunctionType)
                             else v) for k, v in (patch.new_globals or {}).items()}
    return patch


@pytest.fixture
def lazy(tmp_path, monkeypatch):
    """make(source, new_source) -> (module name, patch): the module file is
    written and the patch built from it, and the module is not imported."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # rewritten files are always read again
    (tmp_path / "lp_snapstore.py").write_text(STORE)
    created = []

    def make(source=SRC, new_source=NEW, patch_id="HP-1", **kw):
        name = f"lp_lazy_{next(_counter)}"
        source, new_source = textwrap.dedent(source) + TAIL, textwrap.dedent(new_source) + TAIL
        (tmp_path / f"{name}.py").write_text(source)
        importlib.invalidate_caches()
        module = importlib.import_module(name)
        patch = at_import(patch_of(module, source, new_source, patch_id, **kw))
        del sys.modules[name]
        created.append(name)
        return name, patch

    make.path = lambda name: tmp_path / f"{name}.py"
    yield make
    for name in created:
        sys.modules.pop(name, None)


def as_imported(name):
    return __import__("lp_snapstore").SNAPS[name]


def test_pending_part_commits_before_the_import_returns(lazy, engine):
    name, patch = lazy()
    result = engine.apply(patch)
    assert result.functions == 0 and result.pending == {name: patch_targets(patch)}
    assert name not in sys.modules
    module = importlib.import_module(name)
    assert behaviour(module) == PATCHED  # the very first call runs the new code
    status = engine.status()
    assert status["applied"][0]["pending"] == {} and status["pending"] == []
    assert sorted(status["applied"][0]["targets"]) == patch_targets(patch)
    entry = status["history"][-1]
    assert entry["action"] == "import" and entry["outcome"] == "ok" and entry["module"] == name
    assert entry["functions"] == 3
    # the real loader is back in place once the module's code has run
    assert type(module.__loader__).__name__ == "SourceFileLoader"
    assert module.__spec__.loader is module.__loader__


def patch_targets(patch):
    return sorted({c.target for c in patch.changes} | set(patch.new_globals or {}))


def test_import_from_another_thread_runs_new_code_from_its_first_call(lazy, engine):
    name, patch = lazy()
    engine.apply(patch)
    seen = []
    t = threading.Thread(target=lambda: seen.append(behaviour(importlib.import_module(name))))
    t.start()
    t.join(10)
    assert seen == [PATCHED]


SLOW_SRC = SRC + '\nimport time\ntime.sleep(0.3)\n'
SLOW_NEW = NEW + '\nimport time\ntime.sleep(0.3)\n'


def test_two_threads_importing_at_once_both_get_the_patched_module(lazy, engine):
    name, patch = lazy(SLOW_SRC, SLOW_NEW)
    engine.apply(patch)
    seen = []
    threads = [threading.Thread(target=lambda: seen.append(behaviour(importlib.import_module(name))))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen == [PATCHED, PATCHED]
    assert [e["action"] for e in engine.status()["history"]] == ["apply", "import"]


def test_apply_while_the_module_is_being_imported_commits_when_the_import_ends(lazy, engine):
    name, patch = lazy(SLOW_SRC, SLOW_NEW)
    done = []
    t = threading.Thread(target=lambda: done.append(importlib.import_module(name)))
    t.start()
    while name not in sys.modules:  # its code is running (sleeping) now
        time.sleep(0.005)
    result = engine.apply(patch)
    assert result.pending == {name: patch_targets(patch)}  # not committed into a half-run module
    t.join(10)
    deadline = time.monotonic() + 5
    while engine.status()["pending"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.status()["pending"] == []
    assert behaviour(done[0]) == PATCHED
    assert engine.status()["history"][-1]["action"] == "import"


def test_baseline_mismatch_at_import_is_refused_and_the_module_is_as_imported(lazy, engine):
    name, patch = lazy()
    # a different release is on disk by the time the module is imported
    lazy.path(name).write_text(textwrap.dedent(SRC).replace("return a + b", "return a - b") + TAIL)
    engine.apply(patch)
    module = importlib.import_module(name)
    assert_unchanged(module, as_imported(name))
    assert module.f(1) == 0 and module.g() == "g" and not hasattr(module, "helper")
    status = engine.status()
    entry = status["history"][-1]
    assert (entry["action"], entry["outcome"], entry["module"], entry["error"]) == \
        ("import", "refused", name, "BaselineMismatch")
    assert f"{name}:f" in [p["target"] for p in entry["problems"]]
    assert status["applied"][0]["pending"] == {} and name in status["applied"][0]["refused_at_import"]
    engine.rollback()  # nothing of it was committed: rolling back is a no-op that works
    assert_unchanged(module, as_imported(name))


class Boom(Exception):
    pass


@pytest.mark.parametrize("one_call", [True, False], ids=["one call", "after a handoff"])
def test_failing_store_in_an_import_time_commit_leaves_the_module_as_imported(lazy, engine, monkeypatch, one_call):
    name, patch = lazy()
    engine.apply(patch)
    real = patchstack.Engine._make_ops

    def make_ops(*args):
        ops, undo, saved, functions = real(*args)
        at = len(ops) // 2  # a store that really fails (a builtin has no __code__), amid the others
        ops.insert(at, (setattr, len, "__code__", (lambda: 0).__code__))
        undo.insert(at, (setattr, len, "__code__", None))
        return ops, undo, saved, functions

    monkeypatch.setattr(commit, "ONE_CALL_ENABLED", one_call)
    monkeypatch.setattr(patchstack.Engine, "_make_ops", staticmethod(make_ops))
    module = importlib.import_module(name)  # the import itself succeeds
    monkeypatch.undo()
    assert_unchanged(module, as_imported(name))
    assert behaviour(module) == BASELINE
    entry = engine.status()["history"][-1]
    assert (entry["action"], entry["outcome"], entry["module"], entry["error"]) == \
        ("import", "failed", name, "CommitFailed")


def test_rollback_before_the_import_removes_the_pending_part(lazy, engine):
    name, patch = lazy()
    engine.apply(patch)
    assert name in imports.watched()
    engine.rollback()
    assert engine.status()["pending"] == [] and engine.status()["applied"] == []
    assert name not in imports.watched()
    module = importlib.import_module(name)
    assert behaviour(module) == BASELINE
    assert_unchanged(module, as_imported(name))
    assert [e["action"] for e in engine.status()["history"]] == ["apply", "rollback"]


def test_rollback_after_the_import_restores_the_module_as_imported(lazy, engine):
    name, patch = lazy()
    engine.apply(patch)
    module = importlib.import_module(name)
    assert behaviour(module) == PATCHED
    result = engine.rollback()
    assert result.functions == 3
    assert behaviour(module) == BASELINE
    assert_unchanged(module, as_imported(name))


def test_status_and_assess_show_pending_targets(lazy, engine):
    name, patch = lazy()
    verdict = engine.assess(patch)
    assert verdict["verdict"] == "applies" and verdict["functions"] == 0
    assert verdict["pending"] == {name: patch_targets(patch)}
    engine.apply(patch)
    status = engine.status()
    assert status["pending"] == [name]
    assert status["applied"][0]["pending"] == {name: patch_targets(patch)}
    assert status["applied"][0]["targets"] == []
    assert status["history"][-1]["pending"] == {name: patch_targets(patch)}


def test_patch_for_a_module_this_process_never_has_stays_pending(engine):
    code = (lambda: 0).__code__
    patch = Patch("HP-nowhere", [Change("lp_no_such_module_anywhere:f", code, "0" * 32)])
    result = engine.apply(patch)
    assert result.pending == {"lp_no_such_module_anywhere": ["lp_no_such_module_anywhere:f"]}
    assert engine.status()["pending"] == ["lp_no_such_module_anywhere"]
    with pytest.raises(ImportError):
        importlib.import_module("lp_no_such_module_anywhere")  # the hook does not invent modules
    assert engine.status()["pending"] == ["lp_no_such_module_anywhere"]
    engine.rollback()
    assert engine.status()["pending"] == []


def test_an_import_that_fails_keeps_the_part_pending(lazy, engine, monkeypatch):
    name, patch = lazy()
    engine.apply(patch)
    monkeypatch.setenv("LP_TEST_FAIL_IMPORT", name)
    with pytest.raises(RuntimeError, match="on purpose"):
        importlib.import_module(name)
    assert name not in sys.modules
    assert engine.status()["pending"] == [name]
    monkeypatch.delenv("LP_TEST_FAIL_IMPORT")
    assert behaviour(importlib.import_module(name)) == PATCHED


def test_two_module_patch_with_one_module_loaded(lazy, make_module, engine):
    name, lazy_patch = lazy()
    m, src = make_module("def h():\n    return 1\n")
    loaded_patch = patch_of(m, src, "def h():\n    return 2\n")
    patch = Patch("HP-two", list(loaded_patch.changes) + list(lazy_patch.changes),
                  new_globals=dict(lazy_patch.new_globals))
    result = engine.apply(patch)
    assert result.functions == 1 and m.h() == 2
    assert result.targets == [f"{m.__name__}:h"] and list(result.pending) == [name]
    module = importlib.import_module(name)
    assert behaviour(module) == PATCHED
    assert engine.status()["applied"][0]["pending"] == {}
    engine.rollback()
    assert m.h() == 1 and behaviour(module) == BASELINE
    assert_unchanged(module, as_imported(name))


def test_new_globals_of_a_pending_module_live_in_its_namespace(lazy, engine):
    name, patch = lazy()
    engine.apply(patch)
    module = importlib.import_module(name)
    assert module.helper.__globals__ is vars(module)
    assert module.helper() == 40 and module.json is sys.modules["json"]
    module.LIMIT = 3  # the helper reads the module's own global
    assert module.f(1) == 71
    module.LIMIT = 2
    engine.rollback()
    assert not hasattr(module, "helper") and not hasattr(module, "json") and module.LIMIT == 1


def test_reload_of_a_patched_module_commits_the_patch_again(lazy, engine):
    name, patch = lazy()
    engine.apply(patch)
    module = importlib.import_module(name)
    old_f = module.f
    importlib.reload(module)
    assert module.f is not old_f
    assert behaviour(module) == PATCHED and old_f(1) == 51
    assert [(e["action"], e["outcome"]) for e in engine.status()["history"]] == \
        [("apply", "ok"), ("import", "ok"), ("import", "ok")]
    assert type(module.__loader__).__name__ == "SourceFileLoader"
    engine.rollback()
    assert behaviour(module) == BASELINE and old_f(1) == 2


def test_reload_of_a_module_patched_while_loaded(make_module, engine):
    m, src = make_module("def f():\n    return 1\n")
    engine.apply(patch_of(m, src, "def f():\n    return 2\n"))
    importlib.reload(m)
    assert m.f() == 2
    engine.rollback()
    assert m.f() == 1


def test_cumulative_patch_replaces_pending_parts(lazy, engine):
    name, first = lazy()
    engine.apply(first)
    base = textwrap.dedent(SRC) + TAIL
    cumulative_src = base.replace('return "g"', 'return "CUMULATIVE"')
    module = importlib.import_module(name)  # built from the loaded module, then dropped again
    engine.rollback()
    cumulative = patch_of(module, base, cumulative_src, "HP-C", cumulative=True)
    del sys.modules[name]
    engine.apply(first)
    engine.apply(cumulative)
    status = engine.status()
    assert [p["id"] for p in status["applied"]] == ["HP-C"] and status["pending"] == [name]
    module = importlib.import_module(name)
    assert module.g() == "CUMULATIVE" and module.f(1) == 2 and not hasattr(module, "helper")
    engine.rollback()  # back to HP-1, whose part is committed now that the module is there
    assert [p["id"] for p in engine.status()["applied"]] == ["HP-1"]
    deadline = time.monotonic() + 5
    while engine.status()["pending"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert behaviour(module) == PATCHED


def test_a_part_requiring_one_refused_at_import_is_refused(lazy, engine):
    name, first = lazy()
    engine.apply(first)
    base = textwrap.dedent(NEW) + TAIL
    module = importlib.import_module(name)
    second = patch_of(module, base, base.replace('return "G"', 'return "G2"'), "HP-2", requires=["HP-1"])
    engine.rollback()
    del sys.modules[name]
    lazy.path(name).write_text(textwrap.dedent(SRC).replace("return a + b", "return a - b") + TAIL)
    engine.apply(first)
    engine.apply(second)
    module = importlib.import_module(name)
    assert_unchanged(module, as_imported(name))
    last = engine.status()["history"][-2:]
    assert [(e["patch"], e["outcome"], e["error"]) for e in last] == \
        [("HP-1", "refused", "BaselineMismatch"), ("HP-2", "refused", "PatchError")]


def test_listeners_get_every_entry_outside_the_engine_lock(lazy, engine):
    name, patch = lazy()
    seen = []

    def listener(entry):
        engine.status()  # would never return if called with the engine lock held
        seen.append((entry["action"], entry["outcome"], entry.get("module")))
        threads.add(threading.current_thread())

    def broken(entry):
        raise ValueError("listener bug")

    threads = set()
    engine.add_listener(listener)
    engine.add_listener(broken)
    t = threading.Thread(target=lambda: (engine.apply(patch), importlib.import_module(name), engine.rollback()))
    t.start()
    t.join(20)
    assert not t.is_alive()
    assert seen == [("apply", "ok", None), ("import", "ok", name), ("rollback", "ok", None)]
    assert threads == {t}  # on the thread whose apply, import or rollback made the entry
    assert any("listener bug" in w for w in engine.status()["warnings"])
    engine.remove_listener(listener)
    with pytest.raises(livepatch.RollbackRefused):
        engine.rollback()
    assert len(seen) == 3


def test_unwatched_imports_are_declined_by_the_hook(lazy, engine):
    name, patch = lazy()
    engine.apply(patch)
    assert sys.meta_path[0] is imports._finder
    assert imports._finder.find_spec("json") is None
    assert imports._finder.find_spec(name) is not None
    engine.rollback()



def _import_while_applying(engine, handler, patch):
    """Run `handler(go)` (which imports a module once `go` is set) in one
    thread and `engine.apply(patch)` in another, releasing the import once
    the engine holds its lock: the import lands while the engine is busy.
    Returns (what the handler returned, the apply's result), as lists."""
    go, served, outcome = threading.Event(), [], []
    t = threading.Thread(target=lambda: served.append(handler(go)))
    t.start()
    applier = threading.Thread(target=lambda: outcome.append(engine.apply(patch, timeout=10)))
    applier.start()
    while not engine._lock.locked():
        time.sleep(0.001)
    go.set()
    t.join(10)
    applier.join(10)
    return served, outcome

def test_import_inside_a_target_while_another_apply_waits_for_it(lazy, make_module, engine):
    """An apply waits for `handler` to leave the stack; `handler` imports a
    module another patch waits for. The import does not wait for the
    engine forever: it returns, the apply commits once `handler` returns,
    and the module's part right after."""
    name, lazy_patch = lazy()
    m, src = make_module(f'''
import importlib
def handler(go):
    go.wait(10)
    return importlib.import_module("{name}").g()
''')
    engine.apply(lazy_patch)
    patch = patch_of(m, src, src.replace("return importlib", "x = 1\n    return importlib"), "HP-handler")
    engine.import_timeout = 0.3
    served, outcome = _import_while_applying(engine, m.handler, patch)
    assert served == ["g"]  # imported while the engine was busy: not yet patched
    assert outcome and outcome[0].functions == 1
    deadline = time.monotonic() + 5
    while engine.status()["pending"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert behaviour(sys.modules[name]) == PATCHED
    status = engine.status()
    imports_done = [e for e in status["history"] if e["action"] == "import"]
    assert [(e["outcome"], e["module"], e.get("late")) for e in imports_done] == [("ok", name, True)]
    assert any("while the engine was busy" in w for w in status["warnings"])


def test_an_import_during_an_apply_of_its_own_patch_is_caught_up(lazy, make_module, engine):
    """The module is imported while the apply that makes it pending still
    waits for its loaded part: the part commits right after that apply."""
    name, lazy_patch = lazy()
    m, src = make_module(f'''
import importlib
def handler(go):
    go.wait(10)
    return importlib.import_module("{name}").g()
''')
    new = src.replace("return importlib", "x = 1\n    return importlib")
    patch = Patch("HP-both", list(patch_of(m, src, new).changes) + list(lazy_patch.changes),
                  new_globals=dict(lazy_patch.new_globals))
    served, outcome = _import_while_applying(engine, m.handler, patch)
    assert served == ["g"]
    assert outcome and outcome[0].pending == {name: patch_targets(lazy_patch)}
    assert engine.status()["pending"] == []  # caught up before apply() returned
    assert behaviour(sys.modules[name]) == PATCHED


def test_value_for_builds_now_or_at_import(make_module):
    from livepatch.pending import value_for
    m, _ = make_module("X = 1\n")
    assert value_for(m.__name__, lambda module: module.X + 1) == 2
    later = value_for("lp_not_imported_anywhere", lambda module: module)
    assert isinstance(later, AtImport) and later.make(m) is m


def test_pending_submodule_of_an_imported_package(tmp_path, monkeypatch, engine):
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    pkg = f"lp_pkg_{next(_counter)}"
    (tmp_path / pkg).mkdir()
    (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / pkg / "views.py").write_text("def view():\n    return 'old'\n")
    importlib.invalidate_caches()
    try:
        views = importlib.import_module(f"{pkg}.views")
        patch = patch_of(views, "def view():\n    return 'old'\n", "def view():\n    return 'new'\n", "HP-views")
        del sys.modules[f"{pkg}.views"]
        delattr(sys.modules[pkg], "views")
        assert engine.apply(patch).pending == {f"{pkg}.views": [f"{pkg}.views:view"]}
        from_package = __import__(f"{pkg}.views", fromlist=["view"])
        assert from_package.view() == "new"
        engine.rollback()
        assert from_package.view() == "old"
    finally:
        for name in (f"{pkg}.views", pkg):
            sys.modules.pop(name, None)


def test_status_answers_while_an_apply_waits_for_a_safe_point(make_module, engine):
    m, src = make_module('''
def spin(stop, running):
    running.set()
    while not stop.is_set():
        pass
''')
    patch = patch_of(m, src, src.replace("pass", "x = 1"), "HP-wait")
    stop, running, outcome = threading.Event(), threading.Event(), []
    spinner = threading.Thread(target=m.spin, args=(stop, running))
    spinner.start()
    running.wait(5)
    applier = threading.Thread(target=lambda: outcome.append(engine.apply(patch, timeout=10)))
    applier.start()
    try:
        while engine.status()["in_progress"] is None and applier.is_alive():
            time.sleep(0.001)
        status = engine.status()  # the apply holds the engine; status does not wait for it
        assert status["in_progress"]["action"] == "apply" and status["in_progress"]["patch"] == "HP-wait"
        assert status["applied"] == [] and applier.is_alive()
    finally:
        stop.set()
        spinner.join(5)
        applier.join(10)
    assert outcome[0].patch_id == "HP-wait"
    assert engine.status()["in_progress"] is None and engine.applied_ids() == ["HP-wait"]
