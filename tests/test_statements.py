"""Module-level statements that only bind names (`try: import ... except
ImportError: ...`, `if sys.version_info >= ...: X = ...`): new or changed
ones run at apply time in a namespace overlaying the module, the names they
bind are stored in the same commit and restored (or deleted) by rollback;
anything else they would do keeps them refused, with the reason."""

import importlib
import itertools
import json
import os
import sys
import zlib

import pytest

import livepatch
from conftest import assert_unchanged, snapshot
from livepatch import bundle as fmt
from livepatch.builder import BuildRefused, build
from livepatch.errors import PatchError
from release_trees import manifest_of, round_trip, write_release, write_tree

BASE = """\
import sys

try:
    import json as _codec
except ImportError:
    _codec = None

if sys.version_info >= (3, 0):
    MODE = "plain"
    SETTINGS = dict(mode="plain")
else:
    MODE = "legacy"
    SETTINGS = dict(mode="legacy")

try:
    import pickle as _legacy
except ImportError:
    _legacy = None


class Parser:
    def parse(self, text):
        return text.split(",")


def encode(obj):
    return _codec.dumps(obj)
"""

TRY = """\
try:
    import json as _codec
except ImportError:
    _codec = None
    HAS_CODEC = False
else:
    HAS_CODEC = True  # the codec is there
"""

NEW_TRY = """\
try:
    from zlib import crc32 as _checksum
except ImportError:
    _checksum = None
"""

IF = """\
if sys.version_info >= (3, 11):
    MODE = "strict"
    SETTINGS = dict(mode="strict")
else:
    MODE = "plain"
    SETTINGS = dict(mode="plain")
"""

NEW = f"""\
import sys

{TRY}
{NEW_TRY}
{IF}

class Parser:
    def parse(self, text):
        return text.split(";") if MODE == "strict" else text.split(",")


def encode(obj):
    if not HAS_CODEC:
        raise RuntimeError("no codec")
    return _codec.dumps(obj)


def checksum(data):
    return _checksum(data) if _checksum else 0
"""

USER = "from .core import SETTINGS, MODE\n"


def release(tmp_path, base=BASE, new=NEW):
    files = lambda core: {"app/__init__.py": "", "app/core.py": core, "app/user.py": USER}  # noqa: E731
    return write_release(tmp_path, files(base), files(new))


def statements_of(manifest):
    return sorted((g for g in manifest["globals"] if g["kind"] == "statement"), key=lambda g: g["name"])


def test_new_and_changed_binding_statements_are_carried_with_exactly_what_they_bind(tmp_path):
    data, summary = build(*release(tmp_path), patch_id="HP-S")
    m = manifest_of(data)
    entry = lambda name, source, line, binds: {"name": f"app.core:{name}", "kind": "statement",  # noqa: E731
                                               "source": source, "line": line, "binds": binds}
    assert statements_of(m) == [
        entry("HAS_CODEC", TRY, 3, ["_codec", "HAS_CODEC"]),
        entry("MODE", IF, 16, ["MODE", "SETTINGS"]),
        entry("SETTINGS", IF, 16, ["MODE", "SETTINGS"]),
        entry("_checksum", NEW_TRY, 11, ["_checksum"]),
        entry("_codec", TRY, 3, ["_codec", "HAS_CODEC"]),
    ]
    assert sorted(t["target"] for t in m["targets"]) == ["app.core:Parser.parse", "app.core:encode"]
    assert [g["name"] for g in m["globals"] if g["kind"] != "statement"] == ["app.core:checksum"]
    # the changed try and if are paired with their baseline statements; the
    # removed try binding _legacy, which nothing uses, is not re-run either
    assert m["ignored"] == [{"category": "ignored:unused-binding", "target": "app.core:<module>",
                             "message": "core.py: baseline line 15: a removed statement bound _legacy, which "
                                        "nothing in the patched module uses (they stay bound, unused)"}]
    assert {f"app.core:{n}" for n in ("HAS_CODEC", "MODE", "SETTINGS", "_checksum", "_codec")} \
        <= set(summary["made_at_apply"])


def test_applied_names_are_used_by_patched_code_and_rollback_removes_or_restores_them(tmp_path):
    data, _ = build(*release(tmp_path), patch_id="HP-S")
    probe = ("(lambda c, u: [c.MODE, getattr(c, 'HAS_CODEC', 'absent'), c.Parser().parse('a;b'), c.encode([1]),"
             " c.checksum(b'x') if hasattr(c, 'checksum') else 'absent', u.SETTINGS is c.SETTINGS, u.SETTINGS,"
             " sorted(k for k in vars(c) if not k.startswith('__'))])(sys.modules['app.core'], sys.modules['app.user'])")
    out = round_trip(tmp_path, data, ["app.core", "app.user"], probe)
    names = ["Parser", "SETTINGS", "MODE", "_codec", "_legacy", "encode", "sys"]
    before = ["plain", "absent", ["a;b"], "[1]", "absent", True, {"mode": "plain"}, sorted(names)]
    assert out["before"] == before
    assert out["applied"] == ["strict", True, ["a", "b"], "[1]", zlib.crc32(b"x"), True, {"mode": "strict"},
                              sorted(names + ["HAS_CODEC", "_checksum", "checksum"])], out
    assert out["rolled_back"] == before  # the added names deleted, SETTINGS the old object again


@pytest.fixture
def imported(tmp_path, monkeypatch):
    """Import tmp_path/base/<pkg> (a package name of its own) in this process."""
    made = []

    def load(base_dir):
        pkg = os.path.basename(base_dir)
        monkeypatch.syspath_prepend(os.path.dirname(base_dir))
        importlib.invalidate_caches()
        made.append(pkg)
        return importlib.import_module(f"{pkg}.core")
    yield load
    for pkg in made:
        for name in [n for n in sys.modules if n == pkg or n.startswith(pkg + ".")]:
            del sys.modules[name]


_pkgs = itertools.count()


def package(tmp_path, base, new):
    pkg = f"lpstatements{next(_pkgs)}_{os.getpid()}"
    files = lambda core: {f"{pkg}/__init__.py": "", f"{pkg}/core.py": core}  # noqa: E731
    return write_release(tmp_path, files(base), files(new), package=pkg)


def test_a_statement_raising_at_apply_refuses_with_nothing_changed(tmp_path, imported):
    broken = NEW.replace("    HAS_CODEC = True  # the codec is there", "    HAS_CODEC = _codec.no_such_attribute")
    base, new = package(tmp_path, BASE, broken)
    data, _ = build(base, new, patch_id="HP-RAISE")  # the builder runs nothing: only the apply finds out
    core = imported(base)
    before = snapshot(core)
    engine = livepatch.Engine()
    with pytest.raises(PatchError) as info:
        engine.apply(fmt.load_bundle(data, allow_unsigned=True))
    first = str(info.value).splitlines()[0]
    assert "AttributeError" in first and "no_such_attribute" in first and first.endswith("nothing was changed"), first
    assert_unchanged(core, before)
    assert not engine.status()["applied"]
    assert core.Parser().parse("a;b") == ["a;b"] and not hasattr(core, "HAS_CODEC")


def test_rebinding_a_class_the_patch_does_not_replace_is_refused_at_apply(tmp_path, imported):
    base_src = "try:\n    from json import JSONDecoder as Decoder\nexcept ImportError:\n    Decoder = None\n\n\n" \
               "def parse(text):\n    return Decoder().decode(text)\n"
    new_src = base_src.replace("JSONDecoder as Decoder", "JSONEncoder as Decoder")
    base, new = package(tmp_path, base_src, new_src)
    data, _ = build(base, new, patch_id="HP-CLASS")
    assert [g["binds"] for g in statements_of(manifest_of(data))] == [["Decoder"]]
    core = imported(base)
    before = snapshot(core)
    with pytest.raises(PatchError) as info:
        livepatch.Engine().apply(fmt.load_bundle(data, allow_unsigned=True))
    assert str(info.value).splitlines()[0].endswith(
        "line 1: the statement would rebind Decoder, now the class JSONDecoder, which the patch does not replace "
        "(instances and references would keep the old one); nothing was changed"), info.value
    assert_unchanged(core, before)


@pytest.mark.parametrize("body,reason", [
    ("    REGISTRY.append('zstd')",
     "line 4: an expression whose result is not assigned (REGISTRY.append('zstd')) runs for its effect"),
    ("    Parser.strict = True", "line 4: a store to Parser.strict changes an object, not a name of the module"),
    ("    del REGISTRY[:]", "line 4: del does more at import than binding names"),
    ("    REGISTRY += ['zstd']", "line 4: an augmented assignment (REGISTRY += ['zstd']) may change the old object in place"),
    ("    for name in ('a', 'b'):\n        pass", "line 4: a loop does more at import than binding names"),
])
def test_a_statement_that_does_more_than_bind_names_is_refused_with_the_reason(tmp_path, body, reason):
    base_src = "REGISTRY = []\n\n\nclass Parser:\n    pass\n"
    new_src = "REGISTRY = []\n\nif REGISTRY is not None:\n" + body + "\n\n\nclass Parser:\n    pass\n"
    with pytest.raises(BuildRefused) as info:
        build(*package(tmp_path, base_src, new_src), patch_id="HP-SIDE")
    messages = [p.message for p in info.value.problems if p.category == "refused:statement"]
    assert messages == [f"core.py:3: changed module-level statement (If) ran at import and cannot be re-run: "
                        f"{reason}"], info.value


@pytest.mark.parametrize("before,after,reason", [
    ("Parser.strict = False", "Parser.strict = True",
     "line 6: a store to Parser.strict changes an object, not a name of the module"),
    ("REGISTRY[:] = ['gzip']", "REGISTRY[:] = ['gzip', 'zstd']",
     "line 6: a store to REGISTRY[:] changes an object, not a name of the module"),
])
def test_a_changed_store_into_an_object_at_module_level_is_refused_not_dropped(tmp_path, before, after, reason):
    # an assignment whose target is not a plain name is code that ran at import:
    # a changed one must be refused, never left out of the bundle unseen
    base_src = "REGISTRY = []\n\n\nclass Parser:\n    pass\n" + before + "\n"
    new_src = "REGISTRY = []\n\n\nclass Parser:\n    pass\n" + after + "\n"
    with pytest.raises(BuildRefused) as info:
        build(*package(tmp_path, base_src, new_src), patch_id="HP-STORE")
    messages = [p.message for p in info.value.problems if p.category == "refused:statement"]
    assert messages == [f"core.py:6: changed module-level statement (Assign) ran at import and cannot be re-run: "
                        f"{reason}"], info.value


def test_a_removed_statement_whose_names_are_still_used_stays_refused(tmp_path):
    base_src = "try:\n    import json as codec\nexcept ImportError:\n    codec = None\n\n\n" \
               "def dump(x):\n    return codec.dumps(x)\n"
    new_src = "def dump(x):\n    return codec.dumps(x, sort_keys=True)\n"
    with pytest.raises(BuildRefused) as info:
        build(*package(tmp_path, base_src, new_src), patch_id="HP-GONE")
    assert [(p.category, p.message) for p in info.value.problems if p.target.endswith(":<module>")] == [
        ("refused:statement", "core.py: baseline line 1: a module-level statement (Try) was removed; "
                              "what it did at import stays done")]


def test_inspect_lists_each_name_a_statement_binds_with_the_statement(tmp_path):
    from live import cli
    data, _ = build(*release(tmp_path), patch_id="HP-S")
    (tmp_path / "hp.lpb").write_bytes(data)
    proc = cli("--json", "inspect", str(tmp_path / "hp.lpb"))
    assert proc.returncode == 0, proc.stderr
    shown = {g["name"]: g for g in json.loads(proc.stdout)["manifest"]["globals"] if g["kind"] == "statement"}
    assert shown["app.core:MODE"]["source"] == IF and shown["app.core:MODE"]["binds"] == ["MODE", "SETTINGS"]
    proc = cli("inspect", str(tmp_path / "hp.lpb"))
    assert "app.core:_checksum  statement  try: from zlib import crc32 as _checksum except ImportError: " \
           "_checksum = None" in proc.stdout, proc.stdout


def test_the_loader_refuses_a_statement_entry_that_does_more_than_bind_names(tmp_path):
    data, _ = build(*release(tmp_path), patch_id="HP-S")
    bundle = fmt.read(data, allow_unsigned=True)
    manifest = dict(bundle.manifest)
    manifest["globals"] = [dict(g, source=g["source"] + "    print('side effect')\n") if g["kind"] == "statement"
                           else g for g in manifest["globals"]]
    tampered = fmt.write(manifest, bundle.payloads)
    with pytest.raises(fmt.BundleError) as info:
        fmt.load_bundle(tampered, allow_unsigned=True)
    assert "does more than bind names" in str(info.value) and "print('side effect')" in str(info.value)


COMPAT_BASE = "import sys\n"
COMPAT_NEW = "import sys\n\ntry:\n    IS_NEW = sys.version_info >= (3, 11)\nexcept AttributeError:\n    IS_NEW = False\n"
UTILS_BASE = "from .compat import sys\n\n\ndef netrc():\n    return 'old'\n\n\ndef other():\n    return 1\n"
UTILS_NEW = UTILS_BASE.replace("import sys", "import sys, IS_NEW").replace("'old'", "'new' if IS_NEW else 'old'") \
    .replace("return 1", "return 2")


def test_only_pulls_in_the_statement_binding_what_the_selected_code_imports(tmp_path):
    files = lambda compat, utils: {"app/__init__.py": "", "app/compat.py": compat, "app/utils.py": utils}  # noqa: E731
    base, new = write_release(tmp_path, files(COMPAT_BASE, UTILS_BASE), files(COMPAT_NEW, UTILS_NEW))
    data, summary = build(base, new, patch_id="HP-ONLY", only=["app.utils:netrc"])
    m = manifest_of(data)
    assert [t["target"] for t in m["targets"]] == ["app.utils:netrc"]
    assert [g["name"] for g in statements_of(m)] == ["app.compat:IS_NEW"]
    out = round_trip(tmp_path, data, ["app.utils"], "[sys.modules['app.utils'].netrc(), sys.modules['app.utils'].other()]")
    assert out == {"before": ["old", 1], "applied": ["new", 1], "rolled_back": ["old", 1]}

    # compat's statement refused: the selection names what it misses instead of an ImportError at apply
    side = COMPAT_NEW.replace("    IS_NEW = False\n", "    IS_NEW = False\n    sys.stderr.write('old Python')\n")
    write_tree(tmp_path / "new2", files(side, UTILS_NEW))
    with pytest.raises(BuildRefused) as info:
        build(base, str(tmp_path / "new2" / "app"), patch_id="HP-ONLY", only=["app.utils:netrc"])
    assert str(info.value) == ("cannot build HP-ONLY: app.utils:IS_NEW imports IS_NEW from app.compat, which neither "
                               "the baseline nor what this bundle carries binds: add --only 'app.compat:*' (or see "
                               "why it is refused)")
