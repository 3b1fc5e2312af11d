"""Fixture projects for the bundle builder: a baseline and a patched version
of a small package `app`, one pair per change kind, with the exact targets,
globals or refusal category expected. `write_case` lays a pair out as two
real source trees."""

import os
import textwrap

BASE = '''\
import json

RATE = 0.2
_registry = {}


def register(fn):
    _registry[fn.__name__] = fn
    return fn


class Cart:
    LIMIT = 10
    __slots__ = ("items",)

    def __init__(self):
        self.items = []

    def total(self):
        return sum(self.items) * (1 + RATE)


def price(x, digits=2):
    return round(x, digits)


def outer(n):
    def inner(x):
        return x + n
    return inner


def render(obj):
    return json.dumps(obj)


@register
def handler(x):
    return x


def counter():
    return 1


def numbers():
    yield 1


def helper():
    return "h"


def uses_helper():
    return helper()
'''


def _edit(*pairs):
    src = BASE
    for old, new in pairs:
        assert old in src, old
        src = src.replace(old, new, 1)
    return src


# name -> (patched source of app/core.py, expected targets, expected globals, expected refusal category)
SUPPORTED = {
    "function-body": (_edit(("return round(x, digits)", "return round(x + 0.0, digits)")),
                      ["app.core:price"], [], None),
    "method": (_edit(("return sum(self.items) * (1 + RATE)", "return round(sum(self.items) * (1 + RATE), 2)")),
               ["app.core:Cart.total"], [], None),
    "nested-function": (_edit(("return x + n", "return x + n + 0")),
                        ["app.core:outer", "app.core:outer.<locals>.inner"], [], None),
    "added-function": (_edit(("return json.dumps(obj)", "return _safe(json.dumps(obj))"),
                             ("@register", "def _safe(s):\n    return s.replace('<', '&lt;')\n\n\n@register")),
                       ["app.core:render"], ["app.core:_safe"], None),
    "added-import": (_edit(("import json\n", "import json\nimport html\n"),
                           ("return json.dumps(obj)", "return html.escape(json.dumps(obj))")),
                     ["app.core:render"], ["app.core:html"], None),
    "changed-default": (_edit(("def price(x, digits=2):", "def price(x, digits=3):")),
                        ["app.core:price"], [], None),
    "module-constant": (_edit(("RATE = 0.2", "RATE = 0.25")), [], ["app.core:RATE"], None),
    "class-constant": (_edit(("LIMIT = 10", "LIMIT = 20")), [], ["app.core:Cart.LIMIT"], None),
    "generator-body": (_edit(("    yield 1", "    yield 2")), ["app.core:numbers"], [], None),
}

REFUSED = {
    "class-bases": (_edit(("class Cart:", "class Cart(dict):")), "refused:class-layout"),
    "slots": (_edit(('__slots__ = ("items",)', '__slots__ = ("items", "owner")')), "refused:class-layout"),
    "dataclass-field": (_edit(("    LIMIT = 10\n", "    LIMIT = 10\n    owner: str = ''\n")), "refused:class-layout"),
    "free-vars": (_edit(("def inner(x):\n        return x + n", "def inner(x):\n        return x")), "refused:free-vars"),
    "became-generator": (_edit(("def counter():\n    return 1", "def counter():\n    yield 1")), "refused:kind"),
    "side-effect-statement": (_edit(("_registry = {}\n", "_registry = {}\nprint('loaded')\n")), "refused:statement"),
    "value-of-an-unbound-name": (_edit(("RATE = 0.2", "RATE = compute_rate()")), "refused:undefined-name"),
    "removed-but-referenced": (_edit(('def helper():\n    return "h"\n', "")), "refused:removed-referenced"),
    "decorator-changed": (_edit(("@register\ndef handler(x):\n    return x", "def handler(x):\n    return x + 1")),
                          "refused:decorator"),
}


def write_case(root, patched_core: str, extra_new_files=()):
    """root/base/app and root/new/app; returns (base dir, new dir)."""
    dirs = []
    for side, core in (("base", BASE), ("new", patched_core)):
        pkg = os.path.join(root, side, "app")
        os.makedirs(pkg, exist_ok=True)
        with open(os.path.join(pkg, "__init__.py"), "w") as fh:
            fh.write("")
        with open(os.path.join(pkg, "core.py"), "w") as fh:
            fh.write(textwrap.dedent(core))
        dirs.append(pkg)
    for name, text in extra_new_files:
        with open(os.path.join(dirs[1], name), "w") as fh:
            fh.write(text)
    return dirs[0], dirs[1]
