"""What never runs never blocks a build: tests shipped in the distribution,
docstrings, annotations, `if TYPE_CHECKING:` blocks, @overload stubs,
`(object)` bases, equivalent import guards. The summary lists each as
ignored with its reason; the real fix beside them builds and applies."""

import json
import subprocess
import sys

import pytest

from livepatch.builder import BuildRefused, build

from release_trees import manifest_of, round_trip, write_release

CORE = '''\
"""The core."""
from typing import TYPE_CHECKING, overload

try:
    import simplejson as json
except ImportError:
    import json

if TYPE_CHECKING:
    from decimal import Decimal

LIMIT: int = 3


class Money(object):
    amount: int = 0

    def __init__(self, amount):
        self.amount = amount


class Base:
    def __init__(self):
        self.ready = True


class Shop(Base):
    def __init__(self):
        self.ready = False

    def open(self):
        return self.ready


def describe(x):
    """Describe x."""
    return json.dumps(x)


def scale(x: int, by: int = 2) -> int:
    return x * by


def parse(value):
    return int(value)


def price(x):
    return round(x, 2)
'''

def _edit(source, *pairs):
    for old, new in pairs:
        assert source.count(old) == 1, old
        source = source.replace(old, new)
    return source


CORE_NEW = _edit(
    CORE,
    ('"""The core."""', '"""The core, documented."""'),
    ("except ImportError:", "except ModuleNotFoundError:"),
    ("    from decimal import Decimal\n", "    from decimal import Decimal\n    from fractions import Fraction\n"),
    ("LIMIT: int = 3", 'LIMIT: "int" = 3'),
    ("class Money(object):\n    amount: int = 0", 'class Money:\n    amount: "int | None" = 0'),
    ("class Shop(Base):\n    def __init__(self):\n        self.ready = False\n\n", "class Shop(Base):\n"),
    ('    """Describe x."""', '    """Describe x as JSON text."""'),
    ("def scale(x: int, by: int = 2) -> int:", 'def scale(x: "float", by: "float" = 2) -> "float":'),
    ("def parse(value):\n    return int(value)",
     "@overload\ndef parse(value: str) -> int: ...\n@overload\ndef parse(value: bytes) -> int: ...\n"
     "def parse(value):\n    return int(value, 10) if isinstance(value, str) else int(value.decode(), 10)"),
    ("    return round(x, 2)", "    return round(max(x, 0), 2)"),
)

BASE = {"app/__init__.py": "", "app/core.py": CORE, "app/tests/__init__.py": "",
        "app/tests/test_core.py": "def test_price():\n    assert True\n"}
NEW = {"app/__init__.py": "", "app/core.py": CORE_NEW, "app/tests/__init__.py": "",
       "app/tests/test_core.py": "class Fixture:\n    pass\n\n\ndef test_price():\n    assert Fixture()\n",
       "app/tests/test_new.py": "def test_more():\n    pass\n", "app/conftest.py": "import pytest\n"}

IGNORED = [
    ("ignored:annotation", "app.core:<module>"),
    ("ignored:annotation", "app.core:Money"),
    ("ignored:annotation", "app.core:scale"),
    ("ignored:docstring", "app.core:describe"),
    ("ignored:import-guard", "app.core:<module>"),
    ("ignored:object-base", "app.core:Money"),
    ("ignored:overload", "app.core:parse"),
    ("ignored:test", "app.conftest:<module>"),
    ("ignored:test", "app.tests.test_core:<module>"),
    ("ignored:test", "app.tests.test_new:<module>"),
    ("ignored:type-checking", "app.core:<module>"),
]


def test_no_ops_are_ignored_with_their_reason_and_the_fix_builds(tmp_path):
    data, summary = build(*write_release(tmp_path, BASE, NEW), patch_id="HP-NOOP")
    manifest = manifest_of(data)
    assert sorted(t["target"] for t in manifest["targets"]) == ["app.core:parse", "app.core:price"]
    assert manifest["globals"] == [] and list(manifest["modules"]) == ["app.core"]
    assert sorted((i["category"], i["target"]) for i in manifest["ignored"]) == IGNORED
    assert summary["ignored"] == manifest["ignored"]
    by = {(i["category"], i["target"]): i["message"] for i in manifest["ignored"]}
    assert by[("ignored:test", "app.tests.test_new:<module>")].startswith("tests/test_new.py: a test module")
    assert by[("ignored:docstring", "app.core:describe")].startswith("core.py:33: only a docstring changed")
    assert "TYPE_CHECKING" in by[("ignored:type-checking", "app.core:<module>")]
    # the removed Shop.__init__ is reached by no self.__init__ / Shop.__init__: it builds


def test_the_fix_applies_beside_what_was_ignored(tmp_path):
    data, _ = build(*write_release(tmp_path, BASE, NEW), patch_id="HP-NOOP")
    core = "sys.modules['app.core']"
    out = round_trip(tmp_path, data, ["app.core"], f"[{core}.price(-1.234), {core}.parse('7'), {core}.describe(1)]")
    assert out == {"before": [-1.23, 7, "1"], "applied": [0, 7, "1"], "rolled_back": [-1.23, 7, "1"]}


@pytest.mark.parametrize("old,new,category", [
    ("class Money(object):", "class Money(dict):", "refused:class-layout"),
    ("    amount: int = 0\n", "    amount: int = 0\n    owner: str = ''\n", "refused:class-layout"),
    ("except ImportError:\n    import json", "except Exception:\n    import json\n    json.loads('1')", "refused:statement"),
    ("    return json.dumps(x)", "    return json.dumps(x, sort_keys=True)", None),
    ("class Shop(Base):\n    def __init__(self):\n        self.ready = False\n",
     "class Shop(Base):\n    def __init__(self):\n        self.ready = False\n        Base.__init__(self)\n", None),
])
def test_real_changes_next_to_the_no_ops_are_still_seen(tmp_path, old, new, category):
    assert old in CORE
    patched = dict(BASE, **{"app/core.py": CORE.replace(old, new)})
    if category is None:
        data, _ = build(*write_release(tmp_path, BASE, patched), patch_id="HP-REAL")
        assert manifest_of(data)["targets"]
        return
    with pytest.raises(BuildRefused) as info:
        build(*write_release(tmp_path, BASE, patched), patch_id="HP-REAL")
    assert category in [p.category for p in info.value.problems], info.value


def test_a_removed_method_still_reached_through_self_or_super_is_refused(tmp_path):
    removed = CORE.replace("    def __init__(self):\n        self.ready = True\n", "    pass\n")
    for user in ("        return super().__init__()", "        return self.__init__()", "        return Base.__init__(self)"):
        patched = removed.replace("        return self.ready", user)
        with pytest.raises(BuildRefused) as info:
            build(*write_release(tmp_path / user.split()[1][:4], BASE, dict(BASE, **{"app/core.py": patched})),
                  patch_id="HP-REF")
        assert [p.target for p in info.value.problems if p.category == "refused:removed-referenced"] == \
            ["app.core:Base.__init__"], user


def test_only_no_ops_changed_is_a_clear_refusal(tmp_path):
    only = dict(NEW, **{"app/core.py": CORE_NEW.replace("round(max(x, 0), 2)", "round(x, 2)")
                        .replace("    return int(value, 10) if isinstance(value, str) else int(value.decode(), 10)",
                                 "    return int(value)")})
    with pytest.raises(BuildRefused, match=r"differ in no function, import or constant \(11 change\(s\) that never run ignored\)"):
        build(*write_release(tmp_path, BASE, only), patch_id="HP-NONE")


def test_cli_summary_lists_the_ignored_in_text_and_json(tmp_path):
    base, new = write_release(tmp_path, BASE, NEW)
    for extra in ((), ("--json",)):
        out = tmp_path / f"b{len(extra)}.lpb"
        proc = subprocess.run([sys.executable, "-m", "livepatch", "build", base, new, "-o", str(out), "--id", "HP-NOOP",
                               *extra], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        if extra:
            assert sorted((i["category"], i["target"]) for i in json.loads(proc.stdout)["ignored"]) == IGNORED
        else:
            assert "  ignored [docstring] app.core:describe: core.py:33: only a docstring changed" in proc.stdout
            assert "  ignored [test] app.tests.test_new:<module>: tests/test_new.py" in proc.stdout


def test_a_release_bundle_applies_to_a_process_that_imported_only_part_of_it(tmp_path):
    base = dict(BASE, **{"app/extra.py": "def greet():\n    return 'hi'\n"})
    new = dict(NEW, **{"app/extra.py": "def greet():\n    return 'hello'\n"})
    data, summary = build(*write_release(tmp_path, base, new), patch_id="HP-PART")
    assert summary["targets"] == {"app.core": ["parse", "price"], "app.extra": ["greet"]}
    # app.extra is imported only once the patch is in: its part commits at import
    probe = "[sys.modules['app.core'].price(-1), sys.modules['app.extra'].greet() if 'app.extra' in sys.modules else None]"
    out = round_trip(tmp_path, data, ["app.core"], probe, import_later=["app.extra"])
    assert out == {"before": [-1, None], "applied": [0, "hello"], "rolled_back": [-1, "hi"]}


@pytest.mark.parametrize("module,rel,expected", [
    ("app.tests.test_core", "tests/test_core.py", True), ("app.tests", "tests/__init__.py", True),
    ("app.conftest", "conftest.py", True), ("app.views_test", "views_test.py", True),
    ("werkzeug.test", "test.py", False), ("flask.testing", "testing.py", False), ("app.attest", "attest.py", False),
])
def test_which_modules_count_as_shipped_tests(module, rel, expected):
    from livepatch.noops import is_test_module
    assert is_test_module(module, rel) is expected
