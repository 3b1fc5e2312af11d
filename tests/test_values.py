"""Values computed at import: a changed module or class assignment whose
value is an expression is evaluated at apply time in its module (or class),
stored in the same commit as everything that captured the old object
(defaults, aliases, other modules' imports of it) and restored by rollback;
a failure while evaluating changes nothing; patched code never ends in
NameError."""

import importlib
import itertools
import os
import sys
import textwrap

import pytest

import livepatch
from conftest import assert_unchanged, snapshot
from livepatch import bundle as fmt
from livepatch.builder import BuildRefused, build
from livepatch.errors import PatchError

_names = itertools.count()

BASE = '''\
import functools
import re

PATTERN = re.compile(r"<script")
STRIP = re.compile(r"\\s+").sub
CHUNK = 64 * 1024
OTHER = 65536
ALIAS = PATTERN
A, B = "a", "b"
TABLE = {"a": A}
PAIR = (A,)
TO_INT = functools.partial(int, base=10)
DERIVED = CHUNK * 2


def clean(s, pattern=PATTERN):
    return pattern.sub("", s)


def read(n=CHUNK, *, limit=CHUNK):
    return n, limit


class Policy:
    ALLOWED = frozenset({"get"})
    SAME = ALLOWED

    def allows(self, verb, allowed=ALLOWED):
        return verb in allowed
'''

NEW = (BASE.replace('re.compile(r"<script")', 're.compile(r"<\\s*script", re.I)')
       .replace('re.compile(r"\\s+").sub', 're.compile(r"[\\s\\x00]+").sub')
       .replace("CHUNK = 64 * 1024", "CHUNK = 128 * 1024")
       .replace('TABLE = {"a": A}', 'TABLE = {"a": A, "b": B}')
       .replace("PAIR = (A,)", "PAIR = (A, B)")
       .replace("functools.partial(int, base=10)", "functools.partial(int, base=16)")
       .replace('frozenset({"get"})', 'frozenset({"get", "head"})'))

# exactly what the builder writes for NEW (the manifest's "globals")
EXPECTED = [
    {"kind": "constant", "name": "{m}:CHUNK", "value": "131072",
     "refs": ["defaults:read:0", "kwdefaults:read:limit"],
     "stale": ["DERIVED is computed from CHUNK at import and keeps the value made from the old one"]},
    {"kind": "value", "name": "{m}:PAIR", "expression": "(A, B)", "line": 11},
    {"kind": "value", "name": "{m}:PATTERN", "expression": 're.compile(r"<\\s*script", re.I)', "line": 4,
     "refs": ["alias:ALIAS", "defaults:clean:0"]},
    {"kind": "value", "name": "{m}:Policy.ALLOWED", "expression": 'frozenset({"get", "head"})', "line": 25,
     "refs": ["alias:Policy.SAME", "defaults:Policy.allows:0"]},
    {"kind": "value", "name": "{m}:STRIP", "expression": 're.compile(r"[\\s\\x00]+").sub', "line": 5},
    {"kind": "value", "name": "{m}:TABLE", "expression": '{"a": A, "b": B}', "line": 10},
    {"kind": "value", "name": "{m}:TO_INT", "expression": "functools.partial(int, base=16)", "line": 12},
]


def trees(root, base, new, extra=(), pkg=None):
    """root/base/<pkg> and root/new/<pkg> (a package of its own per test, so
    tests can import it side by side); returns (base dir, new dir, pkg)."""
    pkg = pkg or f"lpvalues{next(_names)}_{os.getpid()}"
    out = []
    for side, core in (("base", base), ("new", new)):
        d = os.path.join(root, side, pkg)
        os.makedirs(d)
        open(os.path.join(d, "__init__.py"), "w").close()
        with open(os.path.join(d, "core.py"), "w") as fh:
            fh.write(textwrap.dedent(core))
        for name, text in extra:
            with open(os.path.join(d, name), "w") as fh:
                fh.write(text)
        out.append(d)
    return out[0], out[1], pkg


def manifest_of(data):
    return fmt.read(data, allow_unsigned=True).manifest


def imported(base_dir, pkg, monkeypatch, *names):
    monkeypatch.syspath_prepend(os.path.dirname(base_dir))
    importlib.invalidate_caches()
    return [importlib.import_module(f"{pkg}.{n}") for n in names]


@pytest.fixture
def cleanup():
    pkgs = []
    yield pkgs.append
    for pkg in pkgs:
        for name in [n for n in sys.modules if n == pkg or n.startswith(pkg + ".")]:
            del sys.modules[name]


def test_builder_writes_values_with_their_expressions_and_references(tmp_path):
    base, new, pkg = trees(str(tmp_path), BASE, NEW)
    data, summary = build(base, new, patch_id="HP-V")
    m = manifest_of(data)
    assert m["targets"] == []
    expected = [{k: (v.replace("{m}", f"{pkg}.core") if k == "name" else v) for k, v in e.items()} for e in EXPECTED]
    assert sorted(m["globals"], key=lambda g: g["name"]) == expected
    assert sorted(summary["made_at_apply"]) == [e["name"] for e in expected if e["kind"] == "value"]
    assert summary["not_updated"] == [f"{pkg}.core:CHUNK: DERIVED is computed from CHUNK at import and keeps "
                                      "the value made from the old one"]


def test_apply_evaluates_rebinds_captured_references_and_rollback_restores_every_object(
        tmp_path, monkeypatch, cleanup):
    user = "from .core import PATTERN as P, TABLE\n"
    base, new, pkg = trees(str(tmp_path), BASE, NEW, extra=[("user.py", user)])
    cleanup(pkg)
    data, _ = build(base, new, patch_id="HP-V")
    core, other = imported(base, pkg, monkeypatch, "core", "user")
    before = snapshot(core)
    other_before = dict(vars(other))
    old_pattern, old_allowed = core.PATTERN, core.Policy.ALLOWED
    engine = livepatch.Engine()
    result = engine.apply(fmt.load_bundle(data, allow_unsigned=True))

    assert core.clean("<  SCRIPT>x") == ">x" and core.STRIP("", "a \x00b") == "ab"
    assert core.read() == (131072, 131072) and core.TO_INT("ff") == 255
    assert core.TABLE == {"a": "a", "b": "b"} and core.PAIR == ("a", "b")
    # what captured the old objects at import holds the new ones
    assert core.ALIAS is core.PATTERN and core.clean.__defaults__ == (core.PATTERN,)
    assert other.P is core.PATTERN and other.TABLE is core.TABLE
    assert core.Policy.SAME is core.Policy.ALLOWED and core.Policy().allows("head")
    # a small int is shared by unrelated names: only the source's references follow it
    assert core.OTHER == 65536 and core.DERIVED == 131072
    assert {f"{pkg}.core:ALIAS", f"{pkg}.core:clean.__defaults__", f"{pkg}.core:read.__kwdefaults__",
            f"{pkg}.user:P", f"{pkg}.core:Policy.allows.__defaults__"} <= set(result.targets)

    engine.rollback()
    assert_unchanged(core, before)
    assert vars(other) == other_before and other.P is old_pattern
    assert core.Policy.ALLOWED is old_allowed and core.clean.__defaults__[0] is old_pattern
    assert core.read.__kwdefaults__ == {"limit": 65536} and core.read() == (65536, 65536)


def test_a_value_that_fails_to_evaluate_refuses_the_apply_and_changes_nothing(tmp_path, monkeypatch, cleanup):
    # compiles, and the builder runs nothing: only evaluating it finds the bad pattern
    broken = NEW.replace('re.compile(r"[\\s\\x00]+").sub', 're.compile(r"[\\s").sub')
    broken = broken.replace("def clean(s, pattern=PATTERN):\n    return pattern.sub(\"\", s)",
                            "def clean(s, pattern=PATTERN):\n    return pattern.sub(\"\", s).strip()")
    base, new, pkg = trees(str(tmp_path), BASE, broken, extra=[("user.py", "from .core import PATTERN\n")])
    cleanup(pkg)
    data, _ = build(base, new, patch_id="HP-BAD")
    core, other = imported(base, pkg, monkeypatch, "core", "user")
    before, other_before = snapshot(core), dict(vars(other))
    engine = livepatch.Engine()
    with pytest.raises(PatchError) as info:
        engine.apply(fmt.load_bundle(data, allow_unsigned=True))
    message = str(info.value)
    assert f"{pkg}.core:STRIP" in message and "nothing was changed" in message and "unterminated character set" in message
    assert_unchanged(core, before)
    assert vars(other) == other_before
    assert core.clean(" <script>x ") == " >x "  # the old function body, the old pattern


def test_patched_code_never_uses_a_name_the_patch_leaves_unbound(tmp_path):
    uses = BASE + "\n\ndef fast_clean(s):\n    return _fast(s)\n"
    new = uses.replace("\n\ndef fast_clean(s):",
                       "\ntry:\n    from _speedups import fast as _fast\n    _fast.prepare()\nexcept ImportError:\n"
                       "    _fast = None\n\n\ndef fast_clean(s):")
    new = new.replace("return _fast(s)", "return _fast(s) if _fast else s")
    base, patched, pkg = trees(str(tmp_path), uses, new)
    for allow in ((), ("statement",)):
        # the try calls something at import: refused, or with --allow statement skipped; _fast would not exist
        with pytest.raises(BuildRefused) as info:
            build(base, patched, patch_id="HP-N", allow=allow)
        cats = {p.category: p for p in info.value.problems}
        assert "refused:undefined-name" in cats, info.value
        assert "'_fast'" in cats["refused:undefined-name"].message and "NameError" in cats["refused:undefined-name"].message
    # the same function with the name bound by an assignment builds
    fixed = uses.replace("\n\ndef fast_clean(s):", "\n_fast = None\n\n\ndef fast_clean(s):")
    fixed = fixed.replace("return _fast(s)", "return _fast(s) if _fast else s")
    _, patched2, _ = trees(str(tmp_path / "b"), uses, fixed, pkg=pkg)
    data, _ = build(base, patched2, patch_id="HP-N")
    names = sorted(g["name"].partition(":")[2] for g in manifest_of(data)["globals"])
    assert names == ["_fast"]


def test_non_literal_defaults_the_compiler_folds_are_literals(tmp_path):
    base_src = BASE + "\n\ndef page(size=64 * 1024):\n    return size\n"
    new_src = base_src.replace("def page(size=64 * 1024):", "def page(size=32 * 1024, *, step=-1):")
    base, new, pkg = trees(str(tmp_path), base_src, new_src)
    data, _ = build(base, new, patch_id="HP-D")
    (target,) = manifest_of(data)["targets"]
    assert (target["target"], target["defaults"], target["kwdefaults"]) == (f"{pkg}.core:page", "(32768,)", "{'step': -1}")


def test_an_annotated_module_value_is_a_value_too(tmp_path, monkeypatch, cleanup):
    base_src = BASE + '\nTAG: "re.Pattern[str]" = re.compile(r"<b>")\n\n\ndef bold(s):\n    return TAG.sub("", s)\n'
    new_src = base_src.replace('re.compile(r"<b>")', 're.compile(r"<b>|</b>")')
    base, new, pkg = trees(str(tmp_path), base_src, new_src)
    cleanup(pkg)
    data, _ = build(base, new, patch_id="HP-A")
    assert manifest_of(data)["globals"] == [{"kind": "value", "name": f"{pkg}.core:TAG",
                                             "expression": 're.compile(r"<b>|</b>")', "line": 31}]
    (core,) = imported(base, pkg, monkeypatch, "core")
    engine = livepatch.Engine()
    engine.apply(fmt.load_bundle(data, allow_unsigned=True))
    assert core.bold("<b>x</b>") == "x"
    engine.rollback()
    assert core.bold("<b>x</b>") == "x</b>"


def test_a_tuple_constant_rebinds_only_what_the_source_binds_to_it(tmp_path, monkeypatch, cleanup):
    # equal tuple constants of one module are one object: unrelated names share it
    base_src = ('EMPTY = ()\nMODES = ("r",)\n\n\ndef open_(mode=MODES, extra=(), also=MODES):\n    return mode, extra, also\n'
                '\n\nALSO = ("r",)\n')
    new_src = base_src.replace('MODES = ("r",)', 'MODES = ("r", "b")').replace("EMPTY = ()", "EMPTY = ('x',)")
    base, new, pkg = trees(str(tmp_path), base_src, new_src)
    cleanup(pkg)
    data, _ = build(base, new, patch_id="HP-T")
    (core,) = imported(base, pkg, monkeypatch, "core")
    assert core.ALSO is core.MODES and core.open_.__defaults__[1] is core.EMPTY  # shared, as compiled
    engine = livepatch.Engine()
    engine.apply(fmt.load_bundle(data, allow_unsigned=True))
    assert core.open_() == (("r", "b"), (), ("r", "b")) and core.ALSO == ("r",) and core.EMPTY == ("x",)
    engine.rollback()
    assert core.open_() == (("r",), (), ("r",)) and core.MODES is core.ALSO


def test_values_benchmark_runs():
    """benchmarks/values_apply.py runs (tiny parameters; its figures come from make bench)."""
    import json
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "values_apply.py"), "--quick",
                          "--modules", "5", "--rounds", "2"], capture_output=True, text=True, timeout=300, cwd=root)
    assert out.returncode == 0, out.stderr
    with open(out.stdout.strip().splitlines()[-1].split("results: ", 1)[1]) as fh:
        data = json.load(fh)
    assert set(data["variants"]) == {"literal", "literal-again", "value"} and data["rounds"] == 2


def test_a_class_defined_in_a_patched_function_uses_its_own_names(tmp_path):
    src = BASE + "\n\ndef make():\n    class Local:\n        size = 1\n        double = size * 2\n    return Local\n"
    base, new, pkg = trees(str(tmp_path), src, src.replace("size * 2", "size * 3"))
    data, _ = build(base, new, patch_id="HP-L")
    assert [t["target"] for t in manifest_of(data)["targets"]] == [f"{pkg}.core:make"]


def test_changed_defaults_that_are_not_literals_are_evaluated_with_the_new_code(tmp_path, monkeypatch, cleanup):
    base_src = BASE + '\n\ndef clean_ip(ip, unpack=False):\n    return ip, unpack\n\n\nclass Box:\n    SIZE = 4\n\n' \
                      '    def fit(self, n=SIZE):\n        return n\n'
    new_src = base_src.replace("def clean_ip(ip, unpack=False):\n    return ip, unpack",
                               "MAX_LEN = 39\n\n\ndef clean_ip(ip, unpack=False, *, message=str(MAX_LEN), limit=MAX_LEN):\n"
                               "    return ip, unpack, message, limit")
    new_src = new_src.replace("def fit(self, n=SIZE):\n        return n", "def fit(self, n=SIZE * 2):\n        return n")
    base, new, pkg = trees(str(tmp_path), base_src, new_src)
    cleanup(pkg)
    data, _ = build(base, new, patch_id="HP-K")
    m = manifest_of(data)
    assert sorted(t["target"] for t in m["targets"]) == [f"{pkg}.core:Box.fit", f"{pkg}.core:clean_ip"]
    assert all(t["defaults"] is None and t["kwdefaults"] is None for t in m["targets"])
    values = {g["name"].partition(":")[2]: g.get("expression") or g.get("value") for g in m["globals"]}
    assert values == {"MAX_LEN": "39", "clean_ip.__defaults__": "(False,)",
                      "clean_ip.__kwdefaults__": "{'message': str(MAX_LEN), 'limit': MAX_LEN}",
                      "Box.fit.__defaults__": "(SIZE * 2,)", "Box.fit.__kwdefaults__": "None"}
    (core,) = imported(base, pkg, monkeypatch, "core")
    old_defaults = core.clean_ip.__defaults__
    engine = livepatch.Engine()
    engine.apply(fmt.load_bundle(data, allow_unsigned=True))
    assert core.clean_ip("::1") == ("::1", False, "39", 39) and core.Box().fit() == 8
    engine.rollback()
    assert core.clean_ip("::1") == ("::1", False) and core.Box().fit() == 4
    assert core.clean_ip.__defaults__ is old_defaults and core.clean_ip.__kwdefaults__ is None
