"""A module the release adds and patched code imports is carried in the
bundle: importable while the patch is in, gone after its rollback."""

import subprocess
import sys

import pytest

from livepatch import bundle as fmt
from livepatch.builder import BuildRefused, build
from livepatch.patch import PYTHON_TAG

from release_trees import round_trip, write_release

CORE = "def render(s):\n    return s\n"
CORE_NEW = "from .safety import escape\n\n\ndef render(s):\n    return escape(s)\n"
SAFETY = "import html\n\nCALLS = []\n\n\ndef escape(s):\n    CALLS.append(s)\n    return html.escape(s)\n"
BASE = {"app/__init__.py": "", "app/core.py": CORE}
NEW = {"app/__init__.py": "", "app/core.py": CORE_NEW, "app/safety.py": SAFETY}


def test_the_new_module_is_carried_with_its_code_and_source(tmp_path):
    data, summary = build(*write_release(tmp_path, BASE, NEW), patch_id="HP-NEW")
    bundle = fmt.read(data, allow_unsigned=True)
    m = bundle.manifest
    assert [t["target"] for t in m["targets"]] == ["app.core:render"]
    assert [(g["name"], g["kind"]) for g in m["globals"]] == [("app.core:escape", "import")]
    assert list(m["new_modules"]) == ["app.safety"] and m["new_modules"]["app.safety"]["file"] == "safety.py"
    assert list(m["new_modules"]["app.safety"]["code"]) == [PYTHON_TAG]
    assert bundle.payloads["source/app.safety"] == SAFETY.encode()
    assert summary["new_modules"] == ["app.safety"]


def test_patched_code_imports_the_new_module_and_rollback_removes_it(tmp_path):
    data, _ = build(*write_release(tmp_path, BASE, NEW), patch_id="HP-NEW")
    probe = ("[sys.modules['app.core'].render('<b>'), 'app.safety' in sys.modules, hasattr(sys.modules['app'], 'safety'),"
             " sys.modules['app.safety'].CALLS if 'app.safety' in sys.modules else None]")
    out = round_trip(tmp_path, data, ["app.core"], probe)
    assert out == {"before": ["<b>", False, False, None], "applied": ["&lt;b&gt;", True, True, ["<b>"]],
                   "rolled_back": ["<b>", False, False, None]}


def test_a_new_module_that_does_not_compile_is_refused_with_its_line(tmp_path):
    broken = dict(NEW, **{"app/safety.py": "def escape(s):\n    return (\n"})
    with pytest.raises(BuildRefused, match=r"safety.py:2"):
        build(*write_release(tmp_path, BASE, broken), patch_id="HP-NEW")


def test_a_failed_apply_leaves_no_new_module_behind(tmp_path):
    # fault injection: post_apply fails once the new module is imported and in use
    hooks = tmp_path / "hooks.py"
    hooks.write_text("def post_apply(ctx):\n    assert ctx.module('app.safety') is not None\n"
                     "    raise RuntimeError('injected')\n")
    base, new = write_release(tmp_path, BASE, NEW)
    data, _ = build(base, new, patch_id="HP-NEW", hooks=str(hooks))
    probe = "[sys.modules['app.core'].render('<b>'), 'app.safety' in sys.modules, hasattr(sys.modules['app'], 'safety')]"
    out = round_trip(tmp_path, data, ["app.core"], probe)
    assert out["apply_error"] == "post_apply of HP-NEW failed: RuntimeError: injected; the patch was rolled back"
    assert out["rolled_back"] == out["before"] == ["<b>", False, False]


def test_cli_build_and_inspect_name_the_new_module(tmp_path):
    base, new = write_release(tmp_path, BASE, NEW)
    out = tmp_path / "hp.lpb"
    r = subprocess.run([sys.executable, "-m", "livepatch", "build", base, new, "-o", str(out), "--id", "HP-NEW"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "  new modules (importable while the patch is in): app.safety" in r.stdout, r.stderr
    r = subprocess.run([sys.executable, "-m", "livepatch", "inspect", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "new modules app.safety (importable while the patch is in)" in r.stdout, r.stderr


def test_applying_the_same_patch_twice_keeps_the_first_ones_modules(tmp_path):
    import importlib
    from livepatch import Engine
    base, new = write_release(tmp_path, BASE, NEW)
    data, _ = build(base, new, patch_id="HP-NEW")
    sys.path.insert(0, str(tmp_path / "base"))
    engine = Engine()
    try:
        core = importlib.import_module("app.core")
        patch = fmt.load_bundle(data, allow_unsigned=True)
        engine.apply(patch)
        with pytest.raises(Exception, match="already applied"):
            engine.apply(patch)
        assert core.render("<b>") == "&lt;b&gt;" and "app.safety" in sys.modules
        engine.rollback()
        assert core.render("<b>") == "<b>" and "app.safety" not in sys.modules
    finally:
        sys.path.remove(str(tmp_path / "base"))
        for name in ("app.safety", "app.core", "app"):
            sys.modules.pop(name, None)
