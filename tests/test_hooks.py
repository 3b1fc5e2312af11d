"""State migration hooks carried in a bundle: signed with it, never run by
the build, run around apply and rollback in a real process, with a failing
pre_apply changing nothing and a failing post_apply rolling back."""

import json
import os
import subprocess
import sys

import pytest

from livepatch import bundle as fmt
from livepatch.builder import BuildRefused, build

from release_trees import manifest_of, write_release

CORE = '''\
_sessions = {"alice": "admin"}
log = []


def role(user):
    return _sessions.get(user)
'''
# the fix stores (role, expiry) pairs: the live sessions need migrating
CORE_NEW = CORE.replace("    return _sessions.get(user)", "    entry = _sessions.get(user)\n    return entry and entry[0]")

HOOKS = '''\
import os
if os.environ.get("HOOKS_MARKER"):
    open(os.environ["HOOKS_MARKER"], "w").close()


def pre_apply(ctx):
    core = ctx.module("app.core")
    core.log.append(("pre_apply", ctx.patch_id, ctx.action))
    if os.environ.get("FAIL") == "pre_apply":
        raise RuntimeError("sessions store is read-only")
    for user, role in list(core._sessions.items()):
        core._sessions[user] = (role, 0)


def post_apply(ctx):
    core = ctx.module("app.core")
    core.log.append(("post_apply", ctx.patch_id, ctx.action))
    if os.environ.get("FAIL") == "post_apply":
        raise ValueError("health check after the migration failed")


def pre_rollback(ctx):
    core = ctx.module("app.core")
    core.log.append(("pre_rollback", ctx.patch_id, ctx.action))
    if os.environ.get("FAIL") == "pre_rollback":
        raise RuntimeError("not now")


def post_rollback(ctx):
    core = ctx.module("app.core")
    core.log.append(("post_rollback", ctx.patch_id, ctx.action))
    for user, entry in list(core._sessions.items()):
        core._sessions[user] = entry[0]
'''

PROGRAM = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import app.core as core, livepatch
from livepatch.bundle import load_bundle

def observe():
    return {"role": core.role("alice"), "sessions": dict(core._sessions), "applied": livepatch.engine.applied_ids()}

out = {"before": observe()}
patch = load_bundle(sys.argv[2], allow_unsigned=True)
out["loaded"] = list(core.log)  # loading runs no hook
try:
    livepatch.apply(patch)
except Exception as exc:
    out["apply_error"] = str(exc).splitlines()[0]
out["applied"] = observe()
try:
    livepatch.rollback()
except Exception as exc:
    out["rollback_error"] = str(exc).splitlines()[0]
out["rolled_back"] = observe()
out["log"] = [list(e) for e in core.log]
print(json.dumps(out))
"""


def _bundle(tmp_path, hooks_text=HOOKS, **kw):
    hooks = tmp_path / "hooks.py"
    hooks.write_text(hooks_text)
    base, new = write_release(tmp_path, {"app/__init__.py": "", "app/core.py": CORE},
                              {"app/__init__.py": "", "app/core.py": CORE_NEW})
    return build(base, new, patch_id="HP-MIG", hooks=str(hooks), **kw)


def _run(tmp_path, data, fail=None):
    path = tmp_path / "hp.lpb"
    path.write_bytes(data)
    env = dict(os.environ, FAIL=fail or "")
    env.pop("HOOKS_MARKER", None)
    proc = subprocess.run([sys.executable, "-c", PROGRAM, str(tmp_path / "base"), str(path)], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


BEFORE = {"role": "admin", "sessions": {"alice": "admin"}, "applied": []}


def test_hooks_are_carried_signed_and_never_run_by_the_build(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    monkeypatch.setenv("HOOKS_MARKER", str(marker))
    data, summary = _bundle(tmp_path)
    manifest = manifest_of(data)
    assert manifest["hooks"] == {"file": "hooks.py", "payload": "hooks/module",
                                 "functions": ["pre_apply", "post_apply", "pre_rollback", "post_rollback"]}
    assert fmt.read(data, allow_unsigned=True).payloads["hooks/module"] == HOOKS.encode()
    assert summary["hooks"] == manifest["hooks"]["functions"]
    assert not marker.exists()
    # the hooks' bytes are pinned by the manifest: a changed byte is refused before anything loads
    i = data.index(b"health check")
    with pytest.raises(fmt.BundleError, match="payloads.hooks/module: content does not match"):
        fmt.read(data[:i] + b"H" + data[i + 1:], allow_unsigned=True)


def test_apply_and_rollback_run_the_hooks_in_order_and_migrate_the_state(tmp_path):
    out = _run(tmp_path, _bundle(tmp_path)[0])
    assert out["before"] == BEFORE and out["loaded"] == []
    assert out["applied"] == {"role": "admin", "sessions": {"alice": ["admin", 0]}, "applied": ["HP-MIG"]}
    assert out["rolled_back"] == BEFORE
    assert out["log"] == [["pre_apply", "HP-MIG", "apply"], ["post_apply", "HP-MIG", "apply"],
                          ["pre_rollback", "HP-MIG", "rollback"], ["post_rollback", "HP-MIG", "rollback"]]


def test_a_failing_pre_apply_aborts_with_nothing_changed(tmp_path):
    out = _run(tmp_path, _bundle(tmp_path)[0], fail="pre_apply")
    assert out["apply_error"] == ("pre_apply of HP-MIG failed: RuntimeError: sessions store is read-only; "
                                  "nothing was changed")
    assert out["applied"] == BEFORE
    assert out["log"] == [["pre_apply", "HP-MIG", "apply"]]


def test_a_failing_post_apply_rolls_the_patch_back_through_the_rollback_hooks(tmp_path):
    out = _run(tmp_path, _bundle(tmp_path)[0], fail="post_apply")
    assert out["apply_error"] == ("post_apply of HP-MIG failed: ValueError: health check after the migration "
                                  "failed; the patch was rolled back")
    assert out["applied"] == BEFORE
    assert out["log"] == [["pre_apply", "HP-MIG", "apply"], ["post_apply", "HP-MIG", "apply"],
                          ["pre_rollback", "HP-MIG", "rollback"], ["post_rollback", "HP-MIG", "rollback"]]


def test_a_failing_pre_rollback_keeps_the_patch(tmp_path):
    out = _run(tmp_path, _bundle(tmp_path)[0], fail="pre_rollback")
    assert out["rollback_error"] == "pre_rollback of HP-MIG failed: RuntimeError: not now; the patch stays applied"
    assert out["rolled_back"] == out["applied"] == {"role": "admin", "sessions": {"alice": ["admin", 0]},
                                                    "applied": ["HP-MIG"]}


@pytest.mark.parametrize("text,message", [
    ("def pre_apply(ctx):\n    return (\n", r"--hooks .*hooks.py:2: does not compile"),
    ("def helper():\n    pass\n", r"--hooks .*hooks.py: defines none of pre_apply, post_apply"),
])
def test_a_hooks_file_that_does_not_compile_or_defines_no_hook_is_refused(tmp_path, text, message):
    with pytest.raises(BuildRefused, match=message):
        _bundle(tmp_path, text)


def test_cli_build_hooks(tmp_path):
    (tmp_path / "hooks.py").write_text(HOOKS)
    base, new = write_release(tmp_path, {"app/__init__.py": "", "app/core.py": CORE},
                              {"app/__init__.py": "", "app/core.py": CORE_NEW})
    cmd = [sys.executable, "-m", "livepatch", "build", base, new, "-o", str(tmp_path / "hp.lpb"), "--id", "HP-MIG"]
    proc = subprocess.run(cmd + ["--hooks", str(tmp_path / "hooks.py")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "  hooks: pre_apply, post_apply, pre_rollback, post_rollback (run around apply and rollback" in proc.stdout
    proc = subprocess.run(cmd + ["--hooks", str(tmp_path / "missing.py")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3 and proc.stderr.strip().endswith("cannot read it: No such file or directory"), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
