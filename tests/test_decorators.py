"""Changed decorators re-applied where they are pure: wrappers (with or
without functools.wraps), wrapper factories and markers defined in any
module of the distribution, found through the module's imports; anything
else refused with what it does at decoration time. The round trip runs the
CLI against a real process: the new wrapper replaces the old function in
the module, in another module's import of it and in module-level tables,
and rollback puts the very old object back everywhere."""

import ast
import json
import os
import sys

import pytest

import livepatch
from conftest import assert_unchanged, snapshot
from live import cli, end_process, observed_program
from livepatch import bundle as fmt
from livepatch.build import patch_from_source
from livepatch.builder import BuildRefused, build
from livepatch.decorators import verdicts
from livepatch.errors import PatchError
from test_values import imported, manifest_of, trees

UTILS = '''\
import functools

REGISTRY = []


def recurse(*cls):
    """A factory: the classes the wrapper does not descend into."""
    def wrap(f):
        def wrapped_f(tlist):
            return ("recursed", cls, f(tlist))

        return wrapped_f

    return wrap


def logged(fn):
    @functools.wraps(fn)
    def inner(*a):
        return ("logged", fn(*a))
    return inner


def plain(fn):
    def inner(*a):
        return ("plain", fn(*a))
    return inner


def pass_environment(fn):
    fn.pass_environment = True
    return fn


def register(fn):
    REGISTRY.append(fn)
    return fn


def announce(fn):
    print("decorating", fn)
    return fn


def counted(label):
    COUNTS[label] = 0

    def wrap(fn):
        return fn
    return wrap
'''

CORE = '''\
from . import utils
from .utils import recurse, pass_environment, register, announce, counted


def group_order(tlist):
    return tlist


def handler(x):
    return x


def render(env):
    return env


TABLE = {"h": handler, "r": render}
DESCRIBED = repr(handler)
'''


def _entry(pkg, name, line, source):
    return {"kind": "definition", "name": f"{pkg}.core:{name}", "line": line, "replaces": True, "source": source}


def _built(tmp_path, new_core, extra_utils=""):
    base, new, pkg = trees(str(tmp_path), CORE, new_core, extra=[("utils.py", UTILS + extra_utils)])
    return manifest_of(build(base, new, patch_id="HP-DECO")[0]), pkg


def test_factory_imported_from_another_module_is_reapplied(tmp_path):
    new = CORE.replace("def group_order", "@recurse(int, utils.REGISTRY, 'x', -1)\ndef group_order")
    m, pkg = _built(tmp_path, new)
    assert m["targets"] == []
    assert m["globals"] == [_entry(pkg, "group_order", 5, "@recurse(int, utils.REGISTRY, 'x', -1)\n"
                                                          "def group_order(tlist):\n    return tlist\n")]


def test_wraps_and_plain_closures_through_a_module_import_are_reapplied(tmp_path):
    new = CORE.replace("def handler", "@utils.logged\n@utils.plain\ndef handler")
    m, pkg = _built(tmp_path, new)
    # the table is rebound to a copy at apply time; what was computed from the old function is named
    assert m["globals"] == [{**_entry(pkg, "handler", 9, "@utils.logged\n@utils.plain\ndef handler(x):\n    return x\n"),
                             "stale": ["DESCRIBED is computed from handler at import and keeps the value made from "
                                       "the old one"]}]


def test_a_removed_wrapper_and_an_added_marker_are_reapplied(tmp_path):
    base_core = CORE.replace("def handler", "@utils.plain\ndef handler")
    base, new, pkg = trees(str(tmp_path), base_core, CORE.replace("def render", "@pass_environment\ndef render"),
                           extra=[("utils.py", UTILS)])
    m = manifest_of(build(base, new, patch_id="HP-DECO")[0])
    assert sorted(m["globals"], key=lambda g: g["name"]) == [
        {**_entry(pkg, "handler", 9, "def handler(x):\n    return x\n"),
         "stale": ["DESCRIBED is computed from handler at import and keeps the value made from the old one"]},
        _entry(pkg, "render", 13, "@pass_environment\ndef render(env):\n    return env\n")]


@pytest.mark.parametrize("decorator,why", [
    ("register", "@register is not known to be pure: it registers in REGISTRY at decoration time "
                 "({pkg}.utils.register, line 35)"),
    ("announce", "@announce is not known to be pure: it calls print at decoration time ({pkg}.utils.announce, line 40)"),
    ("counted('a')", "@counted('a') is not known to be pure: it registers in COUNTS at the time it "
                     "is called ({pkg}.utils.counted, line 45)"),
    ("recurse(list(utils.REGISTRY))", "@recurse(list(utils.REGISTRY)) is not known to be pure: it is called with "
                                      "list(utils.REGISTRY), which is more than a literal or a name"),
])
def test_an_impure_decorator_is_refused_with_what_it_does(tmp_path, decorator, why):
    base, new, pkg = trees(str(tmp_path), CORE, CORE.replace("def handler", f"@{decorator}\ndef handler"),
                           extra=[("utils.py", UTILS)])
    with pytest.raises(BuildRefused) as info:
        build(base, new, patch_id="HP-DECO")
    (problem,) = info.value.problems
    assert problem.category == "refused:decorator" and problem.target == f"{pkg}.core:handler"
    assert why.format(pkg=pkg) in problem.message, problem.message


def test_verdicts_follow_relative_and_dotted_imports_into_subpackages():
    sources = {"pkg.utils": UTILS, "pkg.engine": "", "pkg.engine.grouping": ""}
    grouping = ast.parse("import pkg.utils\nfrom ..utils import recurse, register as reg\nfrom .. import utils\n\n"
                         "@recurse(int)\n@pkg.utils.logged\n@utils.pass_environment\n@reg\n@elsewhere\n"
                         "def group(t):\n    return t\n")
    assert verdicts("pkg.engine.grouping", grouping, sources.get, {"pkg", "pkg.engine"}) == {
        "recurse()": None, "pkg.utils.logged": None, "utils.pass_environment": None,
        "reg": "registers in REGISTRY at decoration time (pkg.utils.register, line 35)"}  # elsewhere: unknown


def test_a_patch_made_in_process_finds_the_factory_in_a_loaded_module(tmp_path, monkeypatch):
    base, _, pkg = trees(str(tmp_path), CORE, CORE, extra=[("utils.py", UTILS)])
    (core,) = imported(base, pkg, monkeypatch, "core")
    try:
        old = core.handler
        patch = patch_from_source("HP-DECO", core.__name__, CORE.replace("def handler", "@recurse(str)\ndef handler"))
        engine = livepatch.Engine()
        engine.apply(patch)
        assert core.handler(1) == ("recursed", (str,), 1) and core.TABLE["h"] is core.handler
        engine.rollback()
        assert core.handler is old and core.TABLE["h"] is old
    finally:
        for name in [n for n in sys.modules if n == pkg or n.startswith(pkg + ".")]:
            del sys.modules[name]


def test_a_factory_argument_that_fails_at_apply_time_changes_nothing(tmp_path, monkeypatch):
    new = CORE.replace("def handler", "@recurse(utils.NOT_THERE)\ndef handler").replace("def render",
                                                                                    "@recurse(int)\ndef render")
    base, patched, pkg = trees(str(tmp_path), CORE, new, extra=[("utils.py", UTILS)])
    data, _ = build(base, patched, patch_id="HP-DECO")
    (core,) = imported(base, pkg, monkeypatch, "core")
    try:
        before, table = snapshot(core), core.TABLE
        with pytest.raises(PatchError, match="NOT_THERE"):
            livepatch.Engine().apply(fmt.load_bundle(data, allow_unsigned=True))
        assert_unchanged(core, before)  # neither definition is stored, render's included
        assert core.TABLE is table and core.TABLE["h"] is core.handler and core.handler(1) == 1
    finally:
        for name in [n for n in sys.modules if n == pkg or n.startswith(pkg + ".")]:
            del sys.modules[name]


# ---------------------------------------------------------------- round trip

RT_UTILS = '''\
def tagged(label):
    def wrap(fn):
        def wrapper(*a):
            return (label, fn(*a))
        return wrapper
    return wrap
'''

RT_CORE = '''\
from {pkg}.utils import tagged


def handle(x):
    return x


HANDLERS = [handle]
TABLE = {{"h": handle}}


class Plugin:
    hook = handle


def run(x):
    return [f(x) for f in (handle,)]  # read at call time, as sqlparse's group() does
'''

RT_PROGRAM = '''\
import json, sys
sys.path.insert(0, sys.argv[1])
import {pkg}.core as core, {pkg}.user as user
original = {{"core": core.handle, "user": user.handle, "HANDLERS": core.HANDLERS, "TABLE": core.TABLE,
            "list": core.HANDLERS[0], "table": core.TABLE["h"], "hook": vars(core.Plugin)["hook"], "alias": user.H}}

def observe():
    now = {{"core": core.handle, "user": user.handle, "HANDLERS": core.HANDLERS, "TABLE": core.TABLE,
           "list": core.HANDLERS[0], "table": core.TABLE["h"], "hook": vars(core.Plugin)["hook"], "alias": user.H}}
    return {{"calls": [core.handle(1), user.handle(1), core.HANDLERS[0](1), core.TABLE["h"](1),
                      core.Plugin.hook(1), user.H[0](1), core.run(1)[0]],
            "same": {{k: v is original[k] for k, v in now.items()}}}}

print("ready", flush=True)
for line in sys.stdin:
    print(json.dumps(observe()), flush=True)
'''


def test_round_trip_a_decorator_added_to_an_existing_function(tmp_path, keys):
    pkg = f"lpdeco_rt_{os.getpid()}"
    core = RT_CORE.format(pkg=pkg)
    user = f"from {pkg}.core import handle, HANDLERS as H\n"
    base, new, _ = trees(str(tmp_path), core, core.replace("def handle", "@tagged('new')\ndef handle"),
                         extra=[("utils.py", RT_UTILS), ("user.py", user)], pkg=pkg)
    bundle = str(tmp_path / "hp.lpb")
    r = cli("build", base, new, "-o", bundle, "--id", "HP-DECO", "--key", keys["key"], "--name", pkg,
            "--version", "1.0", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["made_at_apply"] == [f"{pkg}.core:handle"]
    (tmp_path / "program.py").write_text(RT_PROGRAM.format(pkg=pkg))
    env = dict(os.environ, LIVEPATCH_TRUST=keys["trust"])
    proc, observe = observed_program(str(tmp_path / "program.py"), os.path.dirname(base), env=env, cwd=str(tmp_path))
    try:
        same = dict.fromkeys(("core", "user", "HANDLERS", "TABLE", "list", "table", "hook", "alias"), True)
        baseline = {"calls": [1] * 7, "same": same}
        assert observe() == baseline
        r = cli("apply", str(proc.pid), bundle, env=env)
        assert r.returncode == 0, r.stderr
        # the wrapper everywhere the old function was: the module, an import of it and of its list,
        # a list, a table, a class
        assert observe() == {"calls": [["new", 1]] * 7, "same": dict.fromkeys(same, False)}
        r = cli("rollback", str(proc.pid), env=env)
        assert r.returncode == 0, r.stderr
        assert observe() == baseline  # the very objects of before, everywhere
    finally:
        end_process(proc)
