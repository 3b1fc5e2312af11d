"""New definitions and changed decorators: new classes, decorated functions
and static/class methods, properties and cached properties of existing
classes are defined at apply time and removed by rollback; a decorator
known to be pure is re-applied, any other refused with the reason; the
refusals of unsafe changes say that a migration hook can do them. The round
trip runs the CLI against a real process."""

import functools
import json
import os
import sys

import pytest

import livepatch
from conftest import assert_unchanged, snapshot
from live import cli, end_process, observed_program
from livepatch import bundle as fmt
from livepatch.builder import BuildRefused, build
from test_values import imported, manifest_of, trees

BASE = '''\
import functools

_registry = {}


def register(fn):
    _registry[fn.__name__] = fn
    return fn


class Base:
    def hello(self):
        return "base"


class Cart(Base):
    RATE = 2

    def __init__(self, items=()):
        self.items = list(items)

    @property
    def total(self):
        return sum(self.items)

    def hello(self):
        return "cart"


@functools.lru_cache(maxsize=None)
def square(x):
    return x * x


@register
def handler(x):
    return x
'''

NEW = BASE.replace('''    def hello(self):
        return "cart"
''', '''    def hello(self):
        return "cart"

    @staticmethod
    def empty():
        return Cart()

    @classmethod
    def of(cls, *items):
        return cls(items)

    @property
    def count(self):
        return len(self.items)

    @functools.cached_property
    def doubled(self):
        return [i * self.RATE for i in self.items]

    def greet(self):
        return super().hello() + "+" + self.hello()

    @property
    def label(self):
        return self._label

    @label.setter
    def label(self, value):
        self._label = value.strip()
''').replace('''@functools.lru_cache(maxsize=None)
def square(x):
    return x * x
''', '''@functools.lru_cache(maxsize=None)
def square(x):
    return x * x


class Receipt:
    def __init__(self, cart):
        self.lines = [f"{i}" for i in cart.items]

    def text(self):
        return ",".join(self.lines)


@register
def audited(x):
    return ("audited", x)
''')

# a changed decorator known to be pure: re-applied, the new object replaces the old
REDECORATED = BASE.replace('''    @property
    def total(self):''', '''    @functools.cached_property
    def total(self):''').replace("@functools.lru_cache(maxsize=None)\ndef square", "@functools.lru_cache(maxsize=8)\ndef square")


def _named(entries, pkg):
    return [{k: (v.replace("{m}", f"{pkg}.core") if k == "name" else v) for k, v in e.items()} for e in entries]


EXPECTED_NEW = [
    {"kind": "definition", "name": "{m}:Cart.count", "line": 37, "replaces": False,
     "source": "@property\ndef count(self):\n    return len(self.items)\n"},
    {"kind": "definition", "name": "{m}:Cart.doubled", "line": 41, "replaces": False,
     "source": "@functools.cached_property\ndef doubled(self):\n    return [i * self.RATE for i in self.items]\n"},
    {"kind": "definition", "name": "{m}:Cart.empty", "line": 29, "replaces": False,
     "source": "@staticmethod\ndef empty():\n    return Cart()\n"},
    {"kind": "definition", "name": "{m}:Cart.of", "line": 33, "replaces": False,
     "source": "@classmethod\ndef of(cls, *items):\n    return cls(items)\n"},
    {"kind": "definition", "name": "{m}:Cart.greet", "line": 45, "replaces": False,
     "source": 'def greet(self):\n    return super().hello() + "+" + self.hello()\n'},
    {"kind": "definition", "name": "{m}:Cart.label", "line": 48, "replaces": False,
     "source": "@property\ndef label(self):\n    return self._label\n\n@label.setter\ndef label(self, value):\n"
               "    self._label = value.strip()\n"},
    {"kind": "definition", "name": "{m}:Receipt", "line": 62, "replaces": False,
     "source": 'class Receipt:\n    def __init__(self, cart):\n        self.lines = [f"{i}" for i in cart.items]\n\n'
               '    def text(self):\n        return ",".join(self.lines)\n'},
    {"kind": "definition", "name": "{m}:audited", "line": 70, "replaces": False,
     "source": '@register\ndef audited(x):\n    return ("audited", x)\n'},
]


def test_builder_writes_new_definitions_with_their_source(tmp_path):
    base, new, pkg = trees(str(tmp_path), BASE, NEW)
    data, summary = build(base, new, patch_id="HP-D")
    m = manifest_of(data)
    definitions = sorted((g for g in m["globals"] if g["kind"] == "definition"), key=lambda g: g["name"])
    assert definitions == sorted(_named(EXPECTED_NEW, pkg), key=lambda g: g["name"])
    # greet, undecorated, is defined too: its zero-argument super() needs the class cell
    assert len(definitions) == len(m["globals"])
    assert m["targets"] == []
    assert sorted(summary["made_at_apply"]) == sorted(e["name"] for e in _named(EXPECTED_NEW, pkg))


def test_builder_reapplies_pure_decorators_and_refuses_others_with_the_reason(tmp_path):
    base, new, pkg = trees(str(tmp_path), BASE, REDECORATED)
    m = manifest_of(build(base, new, patch_id="HP-R")[0])
    assert sorted(m["globals"], key=lambda g: g["name"]) == _named([
        {"kind": "definition", "name": "{m}:Cart.total", "line": 22, "replaces": True,
         "source": "@functools.cached_property\ndef total(self):\n    return sum(self.items)\n"},
        {"kind": "definition", "name": "{m}:square", "line": 30, "replaces": True,
         "source": "@functools.lru_cache(maxsize=8)\ndef square(x):\n    return x * x\n"},
    ], pkg)
    # a decorator of the module that only wraps (functools.wraps) is re-applied too
    wrapping = BASE.replace("@register\ndef handler", "def logged(fn):\n    @functools.wraps(fn)\n"
                            "    def inner(*a):\n        return fn(*a)\n    return inner\n\n\n@register\ndef handler")
    _, new3, _ = trees(str(tmp_path / "3"), wrapping, wrapping.replace("@register\ndef handler", "@register\n@logged\ndef handler"), pkg=pkg)
    _, base3, _ = trees(str(tmp_path / "4"), wrapping, wrapping, pkg=pkg)
    with pytest.raises(BuildRefused, match="@register is not known to be pure"):
        build(base3, new3, patch_id="HP-R")  # register is applied again with it: not pure
    _, new4, _ = trees(str(tmp_path / "5"), wrapping, wrapping.replace("def square", "@logged\ndef square"), pkg=pkg)
    (entry,) = manifest_of(build(base3, new4, patch_id="HP-R")[0])["globals"]
    assert (entry["name"], entry["replaces"]) == (f"{pkg}.core:square", True)
    assert entry["source"].startswith("@functools.lru_cache(maxsize=None)\n@logged\ndef square")
    dropped = BASE.replace("@register\ndef handler", "def handler")
    _, new2, _ = trees(str(tmp_path / "2"), BASE, dropped, pkg=pkg)
    with pytest.raises(BuildRefused) as info:
        build(base, new2, patch_id="HP-R")
    (problem,) = info.value.problems
    assert problem.category == "refused:decorator" and "@register is not known to be pure" in problem.message


@pytest.mark.parametrize("old,new,category", [
    ("class Cart(Base):", "class Cart(Base, dict):", "refused:class-layout"),
    ("    RATE = 2\n", "    RATE = 2\n    __slots__ = ('items',)\n", "refused:class-layout"),
    ("def handler(x):\n    return x", "async def handler(x):\n    return x", "refused:kind"),
])
def test_unsafe_changes_are_refused_and_say_a_migration_hook_can_do_them(tmp_path, old, new, category):
    base, patched, pkg = trees(str(tmp_path), BASE, BASE.replace(old, new))
    with pytest.raises(BuildRefused) as info:
        build(base, patched, patch_id="HP-U")
    problem = next(p for p in info.value.problems if p.category == category)
    assert "migration hook" in problem.message and "pre_apply" in problem.message, problem


def test_apply_defines_and_rollback_removes_every_new_definition(tmp_path, monkeypatch):
    base, new, pkg = trees(str(tmp_path), BASE, NEW)
    data, _ = build(base, new, patch_id="HP-D")
    (core,) = imported(base, pkg, monkeypatch, "core")
    try:
        before = snapshot(core)
        registry = dict(core._registry)
        engine = livepatch.Engine()
        engine.apply(fmt.load_bundle(data, allow_unsigned=True))
        cart = core.Cart.of(1, 2)
        assert type(cart) is core.Cart and cart.count == 2 and cart.doubled == [2, 4]
        assert cart.doubled is cart.doubled  # cached on the instance, under its name
        assert core.Cart.empty().items == [] and cart.greet() == "base+cart"  # zero-argument super()
        assert core.Receipt(cart).text() == "1,2" and core.audited(3) == ("audited", 3)
        assert core.Receipt.__module__ == core.__name__ and core.Cart.of.__func__.__globals__ is vars(core)
        assert core._registry["audited"] is core.audited  # the new definition's decorator ran once
        cart.label = "  tag "
        assert cart.label == "tag"  # a new property with its setter
        engine.rollback()
        assert_unchanged(core, before)
        assert not hasattr(core, "Receipt") and not hasattr(core.Cart, "count") and not hasattr(core.Cart, "of")
        core._registry.pop("audited")  # what a decorator registered elsewhere is its own business
        assert core._registry == registry
    finally:
        for name in [n for n in sys.modules if n.startswith(pkg)]:
            del sys.modules[name]


def test_reapplied_decorators_replace_the_object_everywhere_and_rollback_restores_it(tmp_path, monkeypatch):
    base, new, pkg = trees(str(tmp_path), BASE, REDECORATED, extra=[("user.py", "from .core import square\n")])
    data, _ = build(base, new, patch_id="HP-R")
    core, user = imported(base, pkg, monkeypatch, "core", "user")
    try:
        old_total, old_square = vars(core.Cart)["total"], core.square
        assert core.square(3) == 9 and core.square.cache_info().currsize == 1
        engine = livepatch.Engine()
        engine.apply(fmt.load_bundle(data, allow_unsigned=True))
        assert isinstance(vars(core.Cart)["total"], functools.cached_property)
        assert core.Cart([1, 2]).total == 3
        assert user.square is core.square and core.square.cache_info().currsize == 0  # a fresh cache
        assert core.square.cache_info().maxsize == 8
        engine.rollback()
        assert vars(core.Cart)["total"] is old_total and core.square is old_square and user.square is old_square
    finally:
        for name in [n for n in sys.modules if n.startswith(pkg)]:
            del sys.modules[name]


# ---------------------------------------------------------------- round trip

PROGRAM = '''\
import json, sys
sys.path.insert(0, sys.argv[1])
import {pkg}.core as core, {pkg}.user as user
original = {{"PATTERN": core.PATTERN, "default": core.clean.__defaults__, "P": user.P, "total": vars(core.Cart)["total"]}}

def observe():
    cart = core.Cart([1, 2])
    out = {{"clean": core.clean("< script>x"), "read": core.read(), "receipt": hasattr(core, "Receipt"),
           "of": hasattr(core.Cart, "of"), "total": cart.total,
           "same": {{k: v is original[k] for k, v in (("PATTERN", core.PATTERN), ("default", core.clean.__defaults__),
                                                  ("P", user.P), ("total", vars(core.Cart)["total"]))}},
           "P_is_PATTERN": user.P is core.PATTERN}}
    if out["receipt"]:
        out["text"] = core.Receipt(core.Cart.of(3, 4)).text()
    return out

print("ready", flush=True)
for line in sys.stdin:
    print(json.dumps(observe()), flush=True)
'''

RT_BASE = '''\
import re

PATTERN = re.compile(r"<script")
CHUNK = 64 * 1024


def clean(s, pattern=PATTERN):
    return pattern.sub("", s)


def read(n=CHUNK):
    return n


class Cart:
    def __init__(self, items=()):
        self.items = list(items)

    @property
    def total(self):
        return sum(self.items)
'''

RT_NEW = (RT_BASE.replace('re.compile(r"<script")', 're.compile(r"<\\s*script", re.I)')
          .replace("CHUNK = 64 * 1024", "CHUNK = 16 * 1024")
          .replace("    @property\n    def total(self):\n        return sum(self.items)\n",
                   "    @functools.cached_property\n    def total(self):\n        return sum(self.items)\n\n"
                   "    @classmethod\n    def of(cls, *items):\n        return cls(items)\n")
          .replace("import re\n", "import functools\nimport re\n")
          + '\n\nclass Receipt:\n    def __init__(self, cart):\n        self.cart = cart\n\n'
            '    def text(self):\n        return "+".join(map(str, self.cart.items))\n')


def test_round_trip_with_the_cli_into_a_running_process(tmp_path, keys):
    base, new, pkg = trees(str(tmp_path), RT_BASE, RT_NEW, extra=[("user.py", "from .core import PATTERN as P\n")])
    bundle = str(tmp_path / "hp.lpb")
    r = cli("build", base, new, "-o", bundle, "--id", "HP-RT", "--key", keys["key"], "--name", pkg,
            "--version", "1.0", "--json")
    assert r.returncode == 0, r.stderr
    made = json.loads(r.stdout)["made_at_apply"]
    assert sorted(made) == sorted(f"{pkg}.core:{n}" for n in ("PATTERN", "Cart.total", "Cart.of", "Receipt"))
    (tmp_path / "program.py").write_text(PROGRAM.format(pkg=pkg))
    env = dict(os.environ, LIVEPATCH_TRUST=keys["trust"])
    proc, observe = observed_program(str(tmp_path / "program.py"), os.path.dirname(base), env=env, cwd=str(tmp_path))
    try:
        same = {"PATTERN": True, "default": True, "P": True, "total": True}
        baseline = {"clean": "< script>x", "read": 65536, "receipt": False, "of": False, "total": 3,
                    "same": same, "P_is_PATTERN": True}
        assert observe() == baseline
        r = cli("apply", str(proc.pid), bundle, env=env)
        assert r.returncode == 0, r.stderr
        assert observe() == {"clean": ">x", "read": 16384, "receipt": True, "of": True, "total": 3, "text": "3+4",
                             "same": dict.fromkeys(same, False), "P_is_PATTERN": True}
        r = cli("rollback", str(proc.pid), env=env)
        assert r.returncode == 0, r.stderr
        assert observe() == baseline  # every value and captured reference is the original object again
    finally:
        end_process(proc)


def test_a_new_class_with_an_inner_class_body_builds_and_applies(tmp_path, monkeypatch):
    new = BASE + '''

class Report(Cart):
    class Meta:
        ordering = ["name"]
        first = ordering[0]

    def first(self):
        return self.Meta.first + str(self.total)
'''
    base, patched, pkg = trees(str(tmp_path), BASE, new)
    data, _ = build(base, patched, patch_id="HP-I")
    (core,) = imported(base, pkg, monkeypatch, "core")
    try:
        engine = livepatch.Engine()
        engine.apply(fmt.load_bundle(data, allow_unsigned=True))
        assert core.Report([1, 2]).first() == "name3" and issubclass(core.Report, core.Cart)
        engine.rollback()
        assert not hasattr(core, "Report")
    finally:
        for name in [n for n in sys.modules if n.startswith(pkg)]:
            del sys.modules[name]


def test_a_method_that_starts_using_super_is_defined_again_in_its_class(tmp_path, monkeypatch):
    new = BASE.replace('''    def hello(self):
        return "cart"
''', '''    def hello(self):
        return "cart of " + super().hello()
''')
    base, patched, pkg = trees(str(tmp_path), BASE, new, extra=[("user.py", "from .core import Cart\nHELLO = Cart.hello\n")])
    data, _ = build(base, patched, patch_id="HP-S")
    (entry,) = manifest_of(data)["globals"]
    assert (entry["name"], entry["kind"], entry["replaces"]) == (f"{pkg}.core:Cart.hello", "definition", True)
    core, user = imported(base, pkg, monkeypatch, "core", "user")
    try:
        old = vars(core.Cart)["hello"]
        engine = livepatch.Engine()
        engine.apply(fmt.load_bundle(data, allow_unsigned=True))
        assert core.Cart().hello() == "cart of base" and user.HELLO is vars(core.Cart)["hello"]
        engine.rollback()
        assert vars(core.Cart)["hello"] is old and user.HELLO is old and core.Cart().hello() == "cart"
    finally:
        for name in [n for n in sys.modules if n.startswith(pkg)]:
            del sys.modules[name]
