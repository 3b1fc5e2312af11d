"""Inputs an operator has: an upstream fix as a unified diff applied to the
baseline (`build BASELINE --diff fix.patch`), and `--only PATTERN`
choosing the functions of a release diff; `inspect` shows the choice."""

import difflib
import json
import os
import subprocess
import sys

import pytest

from livepatch.builder import BuildRefused, build
from livepatch.difftree import DiffRefused, patched_copy

from release_trees import manifest_of, round_trip, write_release
from test_build_fixes import A, A_NEW, B, B_NEW, PROBE

BASE = {"app/__init__.py": "", "app/a.py": A, "app/b.py": B}
NEW = {"app/__init__.py": "", "app/a.py": A_NEW, "app/b.py": B_NEW}


def _unified(old_root, new_root, names, prefix=("a/", "b/")):
    out = []
    for name in names:
        old = open(os.path.join(old_root, name)).read().splitlines(keepends=True)
        new = open(os.path.join(new_root, name)).read().splitlines(keepends=True)
        out += difflib.unified_diff(old, new, prefix[0] + name, prefix[1] + name)
    return "".join(out)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "livepatch", *args], capture_output=True, text=True, timeout=120)


def _essentials(manifest):
    return (sorted(t["target"] for t in manifest["targets"]), sorted(g["name"] for g in manifest["globals"]),
            sorted(manifest["modules"]))


@pytest.mark.parametrize("prefix", [("a/", "b/"), ("a/app/", "b/app/"), ("", "")])
def test_a_diff_applied_to_the_baseline_builds_the_same_bundle_as_the_patched_tree(tmp_path, prefix):
    base, new = write_release(tmp_path, BASE, NEW)
    fix = tmp_path / "fix.patch"
    fix.write_text(_unified(base, new, ["a.py", "b.py"], prefix))
    with patched_copy(base, str(fix)) as patched:
        assert os.stat(os.path.dirname(patched)).st_mode & 0o777 == 0o700  # private to the builder
        from_diff, _ = build(base, patched, patch_id="HP-D")
        copy = os.path.dirname(patched)
    assert not os.path.exists(copy)  # removed afterwards
    from_trees, _ = build(base, new, patch_id="HP-D")
    assert _essentials(manifest_of(from_diff)) == _essentials(manifest_of(from_trees)) == (
        ["app.b:g", "app.b:h", "app.b:k"], ["app.a:clean", "app.b:clean", "app.b:f"], ["app.a", "app.b"])
    assert open(os.path.join(base, "b.py")).read() == B  # the baseline itself is untouched


def test_a_diff_that_does_not_apply_is_refused_in_one_line_and_nothing_is_written(tmp_path):
    base, new = write_release(tmp_path, BASE, NEW)
    fix = tmp_path / "fix.patch"
    fix.write_text(_unified(base, new, ["b.py"]).replace(" def g(xs):", " def g(items):"))
    out = tmp_path / "hp.lpb"
    r = _cli("build", base, "--diff", str(fix), "-o", str(out), "--id", "HP-D")
    assert r.returncode == 3, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"livepatch build: --diff {fix} does not apply to {base}: b.py: hunk @@ -1 does not apply to the baseline "
        "(its lines are not there)"]
    assert not out.exists() and open(os.path.join(base, "b.py")).read() == B


@pytest.mark.parametrize("header,message", [
    ("--- a/../outside.py\n+++ b/../outside.py\n", "names a path outside the baseline tree"),
    ("--- /dev/null\n+++ b/a.py\n", "the diff creates it, but the baseline has it already"),
    ("just text\n", "not a unified diff"),
])
def test_a_diff_leaving_the_tree_or_contradicting_it_is_refused(tmp_path, header, message):
    base, _ = write_release(tmp_path, BASE, NEW)
    fix = tmp_path / "fix.patch"
    fix.write_text(header + ("@@ -0,0 +1 @@\n+x = 1\n" if header.startswith("---") else ""))
    with pytest.raises(DiffRefused, match=message):
        with patched_copy(base, str(fix)):
            pass
    assert not (tmp_path / "base" / "outside.py").exists()


def test_only_selects_the_fix_keeps_what_it_imports_and_records_what_it_left_out(tmp_path):
    data, summary = build(*write_release(tmp_path, BASE, NEW), patch_id="HP-O", only=["app.b:g"])
    manifest = manifest_of(data)
    # g imports the new app.a:clean through app.b:clean: both stay; h and k are left out
    assert _essentials(manifest) == (["app.b:g"], ["app.a:clean", "app.b:clean", "app.b:f"], ["app.a", "app.b"])
    assert manifest["selection"] == {"only": ["app.b:g"], "left_out": ["app.b:h", "app.b:k"]}
    assert summary["left_out"] == ["app.b:h", "app.b:k"]
    out = round_trip(tmp_path, data, ["app.b"], PROBE)
    assert out["applied"] == [[2, 4], 3, [1]]  # g fixed; h and k as they were
    assert out["rolled_back"] == out["before"]


def test_only_leaves_out_an_unsafe_change_elsewhere(tmp_path):
    # a changed import-time statement in a module unrelated to the fix
    base, new = write_release(tmp_path, dict(BASE, **{"app/c.py": "print(1)\n"}), dict(NEW, **{"app/c.py": "print(2)\n"}))
    with pytest.raises(BuildRefused):
        build(base, new, patch_id="HP-O")
    data, _ = build(base, new, patch_id="HP-O", only=["app.b:*"])
    assert manifest_of(data)["selection"]["left_out"] == ["app.c:<module> (refused:statement)"]
    assert "app.c" not in manifest_of(data)["modules"]


def test_only_matching_nothing_names_what_changed(tmp_path):
    with pytest.raises(BuildRefused, match=r"--only app.b:nothing\*: matches none of the changed functions "
                                           r"\(app.b:g, app.b:h, app.b:k\)"):
        build(*write_release(tmp_path, BASE, NEW), patch_id="HP-O", only=["app.b:nothing*"])


def test_cli_only_and_inspect_show_included_ignored_and_left_out(tmp_path):
    base, new = write_release(tmp_path, dict(BASE, **{"app/tests/test_b.py": "x = 1\n"}),
                              dict(NEW, **{"app/tests/test_b.py": "x = 2\n"}))
    out = tmp_path / "hp.lpb"
    r = _cli("build", base, new, "-o", str(out), "--id", "HP-O", "--only", "app.b:g", "--only", "app.b:h")
    assert r.returncode == 0, r.stderr
    assert "  left out (not selected by --only): app.b:k" in r.stdout
    r = _cli("inspect", str(out))
    assert r.returncode == 0, r.stderr
    assert "selected with --only app.b:g --only app.b:h; left out: app.b:k" in r.stdout
    assert "ignored [test] app.tests.test_b:<module>: tests/test_b.py: a test module" in r.stdout
    data = json.loads(_cli("inspect", str(out), "--json").stdout)
    assert data["manifest"]["selection"] == {"only": ["app.b:g", "app.b:h"], "left_out": ["app.b:k"]}
    assert sorted(t["target"] for t in data["manifest"]["targets"]) == ["app.b:g", "app.b:h"]
    r = _cli("build", base, new, "-o", str(out), "--id", "HP-O", "--only", "render")
    assert r.returncode == 2 and "expected MODULE:QUALNAME" in r.stderr
