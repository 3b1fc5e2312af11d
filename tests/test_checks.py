"""Checks before anything is touched: every problem is listed, nothing changes."""
import sysconfig

import pytest

import livepatch
from livepatch import Change, Patch, fingerprint
from conftest import assert_unchanged, snapshot

SRC = '''
def outer():
    a, b = 1, 2
    def inner():
        return a - b
    return inner

def gen():
    yield 1

class Cart:
    def total(self):
        return 1
'''


def _code(src, name):
    ns = {}
    exec(compile(src, "<new>", "exec"), ns)
    obj = ns
    for part in name.split("."):
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    return obj.__code__


def test_same_count_free_variable_rename_is_refused(make_module, engine):
    m, _ = make_module(SRC)
    closure = m.outer()
    renamed = _code("def mk():\n    x, y = 1, 2\n    def inner():\n        return x - y\n    return inner\n", "mk").co_consts
    new_inner = next(c for c in renamed if hasattr(c, "co_freevars"))
    assert len(new_inner.co_freevars) == len(closure.__code__.co_freevars)
    before = snapshot(m)
    with pytest.raises(livepatch.IncompatibleChange) as info:
        engine.apply(Patch("HP-1", [Change(f"{m.__name__}:outer.<locals>.inner", new_inner, fingerprint(closure))]))
    assert "free variables differ" in str(info.value) and "['a', 'b']" in str(info.value)
    assert closure() == -1
    assert_unchanged(m, before)


def test_every_problem_is_listed_at_once(make_module, engine):
    m, _ = make_module(SRC)
    plain = _code("def gen():\n    return 1\n", "gen")
    outside = _code("def total(self):\n    return super().total()\n", "total")
    before = snapshot(m)
    changes = [
        Change(f"{m.__name__}:gen", plain, fingerprint(m.gen)),
        Change(f"{m.__name__}:Cart.total", outside, fingerprint(m.Cart.total)),
        Change(f"{m.__name__}:outer", m.outer.__code__, fingerprint(m.outer), python="cpython-39"),
        Change(f"{m.__name__}:outer.<locals>.inner", outside, "0" * 32),
    ]
    with pytest.raises(livepatch.BaselineMismatch) as info:
        engine.apply(Patch("HP-1", changes))
    categories = {p.category for p in info.value.problems}
    assert {"incompatible:kind", "incompatible:super", "incompatible:python-version", "baseline-mismatch"} <= categories
    text = str(info.value)
    assert "a generator cannot become a function" in text
    assert "zero-argument super()" in text and "cpython-39" in text
    assert f"expected baseline {'0' * 32}" in text
    assert_unchanged(m, before)
    assert engine.status()["applied"] == []


def test_defaults_that_do_not_fit_are_refused(make_module, engine):
    m, _ = make_module("def f(a, *, k=1):\n    return a\n")
    before = snapshot(m)
    with pytest.raises(livepatch.IncompatibleChange, match="unknown keyword-only parameters"):
        engine.apply(Patch("HP-1", [Change(f"{m.__name__}:f", m.f.__code__, fingerprint(m.f), kwdefaults={"zz": 1})]))
    with pytest.raises(livepatch.IncompatibleChange, match="2 defaults for 1 positional"):
        engine.apply(Patch("HP-1", [Change(f"{m.__name__}:f", m.f.__code__, fingerprint(m.f), defaults=(1, 2))]))
    assert_unchanged(m, before)


def test_free_threaded_build_is_refused(monkeypatch, make_module, engine):
    # Mock: no free-threaded interpreter is installed here, so the build
    # flag that identifies one is simulated.
    m, _ = make_module("def f():\n    return 1\n")
    real = sysconfig.get_config_var
    monkeypatch.setattr(sysconfig, "get_config_var", lambda name: 1 if name == "Py_GIL_DISABLED" else real(name))
    with pytest.raises(livepatch.UnsupportedRuntime, match="free-threaded"):
        engine.apply(Patch("HP-1", [Change(f"{m.__name__}:f", m.f.__code__, fingerprint(m.f))]))


def test_invalid_patch_shape(make_module, engine):
    m, _ = make_module("def f():\n    return 1\n")
    c = Change(f"{m.__name__}:f", m.f.__code__, fingerprint(m.f))
    with pytest.raises(livepatch.PatchError, match="target appears twice"):
        engine.apply(Patch("HP-1", [c, c]))
    with pytest.raises(livepatch.PatchError, match="non-empty string"):
        engine.apply(Patch("", [c]))
