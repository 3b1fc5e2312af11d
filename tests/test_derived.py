"""Objects an unchanged statement built at import with construction code
the patch changes (`R.DEFAULT = R()`, whose `__init__` copied a changed
class constant) are made anew at apply time and restored by rollback, or
named in a warning where re-running the statement is not safe; base
expressions that name the same class through different imports are no-ops."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

import livepatch
from conftest import assert_unchanged, snapshot
from livepatch import bundle as fmt
from livepatch.build import diff_sources
from livepatch.builder import build
from livepatch.definitions import exact_sources
from livepatch.errors import PatchError
from test_values import cleanup, imported, trees  # noqa: F401 (cleanup is a fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHONS = {v: os.path.join(ROOT, f".venv-{v}", "bin", "python") for v in ("3.11", "3.12", "3.13")}

BASE = textwrap.dedent('''\
    class R:
        CONST = frozenset(["Authorization"])

        def __init__(self, x=CONST):
            self.x = frozenset(h.lower() for h in x)

        def strips(self, header):
            return header.lower() in self.x


    R.DEFAULT = R()
    ''')
NEW = BASE.replace('frozenset(["Authorization"])', 'frozenset(["Cookie", "Authorization"])')
REASON = "built at import by R(), whose changed CONST its __init__ reads"


def diff(base, new, module="m"):
    d = diff_sources(module, base, new, f"{module}.py", f"{module}.py [new]")
    exact_sources(d, new)
    return d


def test_an_object_built_by_a_changed_construction_is_recomputed():
    d = diff(BASE, NEW)
    assert d.refused == [] and d.warnings == []
    assert d.values == {
        "R.CONST": {"expression": 'frozenset(["Cookie", "Authorization"])', "line": 2},
        "R.DEFAULT": {"expression": "R()", "line": 11, "built": {
            "call": "R", "function": "R.__init__", "reads": ["R.CONST"],
            "slots": {"defaults:R.__init__:0": "R.CONST"}, "reason": REASON}},
    }


def test_a_changed_init_travels_with_the_recomputed_entry():
    new = NEW.replace("h.lower() for h in x", "h.strip().lower() for h in x")
    built = diff(BASE, new).values["R.DEFAULT"]["built"]
    assert built["source"].startswith("def __init__(self, x=CONST):") and "strip()" in built["source"]
    assert built["line"] == 4
    assert built["reason"] == "built at import by R(), whose __init__ changed; whose changed CONST its __init__ reads"


@pytest.mark.parametrize("later, why", [
    ("R.DEFAULT.x = frozenset()\n", "line 12 stores into it"),
    ("R.DEFAULT.strips('a')\n", "line 12 calls a method on it"),
    ("print(R.DEFAULT)\n", "line 12 passes it to a call"),
])
def test_an_object_mutated_after_it_was_built_is_named_in_a_warning(later, why):
    d = diff(BASE + later, NEW + later)
    assert "R.DEFAULT" not in d.values
    assert [(w.category, w.target, w.message) for w in d.warnings] == [(
        "warning:built-at-import", "m:R.DEFAULT",
        f"line 11: R.DEFAULT was {REASON}; it keeps the state built by the old code ({why}); "
        "a --hooks post_apply(ctx) can rebuild it (see livepatch/hooks.py)")]


def test_an_init_reading_a_changed_class_value_at_run_time_is_a_warning():
    base = BASE.replace("def __init__(self, x=CONST):\n        self.x = frozenset(h.lower() for h in x)",
                        "def __init__(self):\n        self.x = frozenset(h.lower() for h in self.CONST)")
    new = base.replace('frozenset(["Authorization"])', 'frozenset(["Cookie", "Authorization"])')
    d = diff(base, new)
    assert "R.DEFAULT" not in d.values
    assert "its __init__ reads R.CONST at run time, which holds the old value until the commit" in d.warnings[0].message


def test_nothing_is_recomputed_when_the_construction_is_unchanged():
    new = BASE.replace("return header.lower() in self.x", "return header.strip().lower() in self.x")
    d = diff(BASE, new)
    assert [c[0] for c in d.changes] == ["R.strips"] and d.values == {} and d.warnings == []


def test_a_module_global_built_by_a_changed_function_is_recomputed():
    base = "LIMIT = 10\n\n\ndef make(n=LIMIT):\n    return [n]\n\n\nDEFAULT = make()\nOTHER = make(3)\n"
    new = base.replace("return [n]", "return [n, n]")
    d = diff(base, new)
    assert {k: v["built"]["reason"] for k, v in d.values.items()} == {
        "DEFAULT": "built at import by make(), whose code changed",
        "OTHER": "built at import by make(3), whose code changed"}
    complex_args = base + "THIRD = make(LIMIT + 1)\n"
    d = diff(complex_args, complex_args.replace("return [n]", "return [n, n]"))
    assert "THIRD" not in d.values and "the call's arguments are not literals or names" in d.warnings[0].message


def test_a_changed_init_rebuilds_the_object_with_its_new_code_and_rollback_restores_it(
        tmp_path, monkeypatch, cleanup):
    new = NEW.replace("h.lower() for h in x", "h.strip().lower() for h in x")
    base, new, pkg = trees(str(tmp_path), BASE, new)
    cleanup(pkg)
    data, summary = build(base, new, patch_id="HP-INIT")
    assert summary["warnings"] == [] and len(summary["recomputed"]) == 1
    (core,) = imported(base, pkg, monkeypatch, "core")
    before, old = snapshot(core), {"default": core.R.DEFAULT}
    engine = livepatch.Engine()
    engine.apply(fmt.load_bundle(data, allow_unsigned=True))
    assert core.R.DEFAULT.x == frozenset({"cookie", "authorization"}) and core.R(["  A "]).x == frozenset({"a"})
    engine.rollback()
    assert_unchanged(core, before)
    assert core.R.DEFAULT is old["default"] and core.R.DEFAULT.x == frozenset({"authorization"})


def test_a_construction_that_fails_at_apply_time_refuses_the_apply_and_changes_nothing(
        tmp_path, monkeypatch, cleanup):
    broken = NEW.replace("self.x = frozenset(h.lower() for h in x)",
                         "if len(x) > 1:\n            raise RuntimeError('no rebuild')\n"
                         "        self.x = frozenset(h.lower() for h in x)")
    base, new, pkg = trees(str(tmp_path), BASE, broken)
    cleanup(pkg)
    data, _ = build(base, new, patch_id="HP-FAIL")
    (core,) = imported(base, pkg, monkeypatch, "core")
    before = snapshot(core)
    with pytest.raises(PatchError) as info:
        livepatch.Engine().apply(fmt.load_bundle(data, allow_unsigned=True))
    assert f"{pkg}.core:R.DEFAULT" in str(info.value) and "no rebuild" in str(info.value)
    assert_unchanged(core, before)
    assert core.R.DEFAULT.strips("Authorization") and not core.R.DEFAULT.strips("Cookie")


def test_build_and_inspect_list_recomputed_objects_and_warn_about_the_others(tmp_path):
    later = "REGISTRY = []\nKEPT = R()\nREGISTRY.append(KEPT)\n"
    base, new, pkg = trees(str(tmp_path), BASE + later, NEW + later)
    out = str(tmp_path / "b.lpb")

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "livepatch", *args], capture_output=True, text=True, timeout=120)
    built = cli("build", base, new, "--id", "HP-W", "-o", out)
    assert built.returncode == 0, built.stderr
    recomputed = f"recomputed {pkg}.core:R.DEFAULT: {REASON}"
    warning = (f"WARNING {pkg}.core:KEPT: core.py:13: KEPT was built at import by R(), whose changed CONST its "
               "__init__ reads; it keeps the state built by the old code (line 14 passes it to a call); "
               "a --hooks post_apply(ctx) can rebuild it (see livepatch/hooks.py)")
    assert f"  {recomputed}" in built.stdout.splitlines() and f"  {warning}" in built.stdout.splitlines()
    shown = cli("inspect", out)
    assert shown.returncode == 0 and recomputed in shown.stdout.splitlines() and warning in shown.stdout.splitlines()
    manifest = json.loads(cli("inspect", out, "--json").stdout)["manifest"]
    assert [w["category"] for w in manifest["warnings"]] == ["warning:built-at-import"]
    assert [g["name"] for g in manifest["globals"] if "built" in g] == [f"{pkg}.core:R.DEFAULT"]


# ---------------------------------------------------------------- bases

def test_bases_naming_the_same_class_through_imports_are_ignored():
    base = "import typing\nfrom typing import TypedDict\n\n\nclass Options(TypedDict):\n    a: int\n"
    new = "import typing\n\n\nclass Options(typing.TypedDict):\n    a: int\n"
    d = diff(base, new)
    assert d.refused == []
    assert [(p.category, p.target, p.message) for p in d.ignored] == [(
        "ignored:same-base", "m:Options",
        "line 4: the bases name the same objects through other imports (TypedDict is typing.TypedDict)")]


def test_bases_naming_different_classes_are_still_refused():
    base = "import typing\nfrom typing import TypedDict\n\n\nclass Options(TypedDict):\n    a: int\n"
    new = "import typing\n\n\nclass Options(typing.NamedTuple):\n    a: int\n"
    d = diff(base, new)
    assert [(p.category, p.target) for p in d.refused] == [("refused:class-layout", "m:Options")]
    assert "bases changed" in d.refused[0].message


# ---------------------------------------------------------------- round trip

ROUND_TRIP = textwrap.dedent('''\
    import importlib, json, os, sys
    import livepatch
    from livepatch import bundle as fmt
    from livepatch.builder import build
    root, pkg = sys.argv[1], sys.argv[2]
    data, summary = build(os.path.join(root, "base", pkg), os.path.join(root, "new", pkg), patch_id="HP-D")
    sys.path.insert(0, os.path.join(root, "base"))
    core = importlib.import_module(pkg + ".core")
    user = importlib.import_module(pkg + ".user")
    old = {"default": core.R.DEFAULT, "const": core.R.CONST}  # not module globals, which the apply rebinds too
    seen = {"summary": summary["recomputed"], "before": core.R.DEFAULT.strips("Cookie")}
    engine = livepatch.Engine()
    engine.apply(fmt.load_bundle(data, allow_unsigned=True))
    seen["after"] = core.R.DEFAULT.strips("Cookie")
    seen["new_object"] = core.R.DEFAULT is not old["default"]
    seen["captured"] = user.SHARED is core.R.DEFAULT and user.get() is core.R.DEFAULT
    seen["fresh"] = core.R().strips("Cookie")
    engine.rollback()
    seen["rolled_back"] = core.R.DEFAULT.strips("Cookie")
    seen["restored"] = core.R.DEFAULT is old["default"] and user.SHARED is old["default"] \
        and core.R.CONST is old["const"]
    seen["defaults"] = core.R.__init__.__defaults__[0] is old["const"]
    print(json.dumps(seen))
    ''')


@pytest.mark.parametrize("version", sorted(PYTHONS))
def test_round_trip_in_a_process_recomputes_and_rollback_restores_every_reference(tmp_path, version):
    python = PYTHONS[version]
    if not os.path.exists(python):
        pytest.skip(f"no Python {version} venv")
    pkg = "lpderived"
    for side, core in (("base", BASE), ("new", NEW)):
        d = tmp_path / side / pkg
        d.mkdir(parents=True)
        (d / "__init__.py").write_text("")
        (d / "core.py").write_text(core)
        (d / "user.py").write_text("from .core import R\nSHARED = R.DEFAULT\n\n\ndef get():\n    return SHARED\n")
    out = subprocess.run([python, "-c", ROUND_TRIP, str(tmp_path), pkg], capture_output=True, text=True,
                         timeout=120, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen == {"summary": [f"{pkg}.core:R.DEFAULT: {REASON}"], "before": False, "after": True,
                    "new_object": True, "captured": True, "fresh": True, "rolled_back": False,
                    "restored": True, "defaults": True}
