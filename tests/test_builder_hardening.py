"""The builder over hostile input: a working directory full of modules that
shadow the standard library, trees with links out of them, links to `/`,
FIFOs, devices, sockets and huge files, sources in every encoding Python
accepts, expressions too deep to compile, and operator mistakes on the
command line. Nothing of any of it is executed, nothing leaks into a bundle,
nothing hangs, and every refusal is one line with its exit code."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from livepatch import bundle as fmt, builder, sourcetree
from livepatch.builder import BuildError, BuildRefused, UnknownInterpreter, build
from livepatch.patch import PYTHON_TAG

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
HANG_GUARD = 60  # seconds: a builder that blocks on a FIFO or walks / fails the test, never hangs it

BASE = textwrap.dedent('''\
    import os

    SIDE_EFFECT = os.environ.get("LP_MARKER") and open(os.environ["LP_MARKER"], "w")

    def price(x):
        return round(x, 2)
''')
FIXED = BASE.replace("round(x, 2)", "round(x, 3)")


def _other_python():
    """Another CPython of the test matrix (a real second interpreter), or None."""
    for version in ("3.11", "3.12", "3.13"):
        python = os.path.join(ROOT, f".venv-{version}", "bin", "python")
        if os.path.exists(python) and version != f"{sys.version_info[0]}.{sys.version_info[1]}":
            return python, version
    return None, None


OTHER, OTHER_VERSION = _other_python()
needs_other = pytest.mark.skipif(OTHER is None, reason="no second Python of 3.11-3.13 installed here")


def trees(tmp_path, base=BASE, new=FIXED, *, encoding="utf-8"):
    """tmp_path/base/app and tmp_path/new/app, a package with one module."""
    out = []
    for side, src in (("base", base), ("new", new)):
        pkg = tmp_path / side / "app"
        pkg.mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "core.py").write_bytes(src if isinstance(src, bytes) else src.encode(encoding))
        out.append(str(tmp_path / side))
    return out


def run_cli(*args, cwd=None, env=None, timeout=HANG_GUARD):
    """The installed `livepatch` command, as an operator runs it."""
    script = os.path.join(BIN, "livepatch")
    cmd = [script] if os.path.exists(script) else [sys.executable, "-P", "-m", "livepatch"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def one_line_error(r, code):
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("livepatch build: "), r.stderr
    return lines[0]


# ---------------------------------------------------------------- nothing is executed

HOSTILE_NAMES = ("json", "os", "site", "sitecustomize", "types", "marshal", "base64", "ast", "tokenize", "encodings")


def _hostile_dir(path, marker_dir):
    """Modules shadowing what a Python process imports first, each writing
    a marker if it ever runs, and a fake livepatch package doing the same."""
    path.mkdir(parents=True, exist_ok=True)
    for name in HOSTILE_NAMES:
        (path / f"{name}.py").write_text(f"open({str(marker_dir / name)!r}, 'w').close()\n")
    (path / "livepatch").mkdir(exist_ok=True)
    (path / "livepatch" / "__init__.py").write_text(f"open({str(marker_dir / 'livepatch')!r}, 'w').close()\n")
    (path / "livepatch" / "builder.py").write_text(f"open({str(marker_dir / 'builder')!r}, 'w').close()\n")


@needs_other
@pytest.mark.parametrize("how", ["absolute", "name-on-path"])
def test_build_for_another_python_from_a_hostile_directory_runs_nothing_of_it(tmp_path, how):
    markers = tmp_path / "markers"
    markers.mkdir()
    cwd = tmp_path / "cwd"
    _hostile_dir(cwd, markers)
    base, new = trees(tmp_path)
    _hostile_dir(tmp_path / "new" / "app", markers)  # modules of the tree itself shadow the stdlib too
    _hostile_dir(tmp_path / "base" / "app", markers)
    env = dict(os.environ, LP_MARKER=str(markers / "tree-module"))
    python = OTHER
    if how == "name-on-path":
        env["PATH"] = os.path.dirname(OTHER) + os.pathsep + env.get("PATH", "")
        python = f"python{OTHER_VERSION}"
    out = tmp_path / "x.lpb"
    r = run_cli("build", base, new, "-o", str(out), "--id", "HP-CWD", "--python", python,
                "--python", sys.executable, cwd=str(cwd), env=env)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(markers)) == []
    manifest = fmt.read(out.read_bytes(), allow_unsigned=True).manifest
    assert sorted(manifest["pythons"]) == sorted([PYTHON_TAG, "cpython-" + OTHER_VERSION.replace(".", "")])
    assert [t["target"] for t in manifest["targets"]] == ["app.core:price"]


def test_build_in_this_interpreter_from_a_hostile_directory_runs_nothing_of_it(tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    _hostile_dir(tmp_path / "cwd", markers)
    base, new = trees(tmp_path)
    _hostile_dir(tmp_path / "new" / "app", markers)
    _hostile_dir(tmp_path / "base" / "app", markers)
    r = run_cli("build", base, new, "-o", str(tmp_path / "x.lpb"), "--id", "HP-CWD",
                cwd=str(tmp_path / "cwd"), env=dict(os.environ, LP_MARKER=str(markers / "tree-module")))
    assert r.returncode == 0, r.stderr
    assert os.listdir(markers) == []


@needs_other
def test_the_worker_is_isolated_and_sent_its_code(tmp_path, monkeypatch):
    """The command line and environment the worker really gets."""
    seen = {}
    real_run = subprocess.run

    def spy(cmd, *a, **kw):  # records what is started, then starts it for real
        seen.setdefault("calls", []).append((cmd, kw.get("cwd"), kw.get("env")))
        return real_run(cmd, *a, **kw)

    monkeypatch.setattr(builder.subprocess, "run", spy)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    base, new = trees(tmp_path)
    build(base, new, patch_id="HP-ISO", pythons=[OTHER])
    worker = seen["calls"][-1]
    cmd, cwd, env = worker
    assert cmd[:5] == [OTHER, "-I", "-P", "-S", "-c"] and "-m" not in cmd
    assert cwd == "/" and "PYTHONPATH" not in env and set(env) <= {"PATH"}


# ---------------------------------------------------------------- what is read

def _refused(tmp_path, base, new, *, code=3, expect=()):
    out = tmp_path / "x.lpb"
    r = run_cli("build", base, new, "-o", str(out), "--id", "HP-BAD")
    line = one_line_error(r, code)
    for text in expect:
        assert text in line, line
    assert not out.exists() and not [n for n in os.listdir(tmp_path) if ".tmp" in n]
    return line


def test_a_patched_file_linking_outside_its_tree_is_refused_and_not_read(tmp_path):
    secret = tmp_path / "secret.py"
    secret.write_text(FIXED + "\nTOKEN = 'hunter2-do-not-leak'\n")
    base, new = trees(tmp_path)
    core = tmp_path / "new" / "app" / "core.py"
    core.unlink()
    core.symlink_to(secret)
    line = _refused(tmp_path, base, new, expect=(os.path.join(new, "app", "core.py"), "outside the tree", str(secret)))
    assert "hunter2" not in line
    with pytest.raises(BuildRefused, match="outside the tree"):
        build(base, new, patch_id="HP-BAD")


def test_a_link_inside_the_tree_is_read(tmp_path):
    base, new = trees(tmp_path)
    real = tmp_path / "new" / "app" / "_real_core.txt"
    (tmp_path / "new" / "app" / "core.py").rename(real)
    (tmp_path / "new" / "app" / "core.py").symlink_to("_real_core.txt")
    data, summary = build(base, new, patch_id="HP-IN")
    assert summary["targets"] == {"app.core": ["price"]}


@pytest.mark.parametrize("where", ["patched-subdir", "baseline-subdir", "baseline-top"])
def test_a_link_to_the_root_directory_is_refused_without_walking_it(tmp_path, where):
    base, new = trees(tmp_path)
    link = {"patched-subdir": tmp_path / "new" / "app" / "everything",
            "baseline-subdir": tmp_path / "base" / "app" / "everything",
            "baseline-top": tmp_path / "base" / "everything"}[where]
    link.symlink_to("/")
    _refused(tmp_path, base, new, expect=("everything: a symbolic link to /, outside the tree",))


def test_a_directory_link_inside_the_tree_is_skipped_with_a_line(tmp_path):
    base, new = trees(tmp_path)
    for side in ("base", "new"):
        (tmp_path / side / "app" / "sub").mkdir()
        (tmp_path / side / "app" / "sub" / "__init__.py").write_text("")
        (tmp_path / side / "app" / "alias").symlink_to("sub")
    r = run_cli("build", base, new, "-o", str(tmp_path / "x.lpb"), "--id", "HP-SKIP")
    assert r.returncode == 0, r.stderr
    assert f"skipped {os.path.join(new, 'app', 'alias')}: a link to a directory (not followed)" in r.stdout


def test_a_baseline_made_of_links_to_the_deployed_package_still_builds(tmp_path):
    """As the demo trees are: baseline/app -> the application's package."""
    deployed = tmp_path / "srv" / "app"
    deployed.mkdir(parents=True)
    (deployed / "__init__.py").write_text("")
    (deployed / "core.py").write_text(BASE)
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "app").symlink_to(deployed)
    (tmp_path / "new" / "app").mkdir(parents=True)
    (tmp_path / "new" / "app" / "__init__.py").write_text("")
    (tmp_path / "new" / "app" / "core.py").write_text(FIXED)
    data, summary = build(str(tmp_path / "base"), str(tmp_path / "new"), patch_id="HP-DEPLOYED")
    assert summary["targets"] == {"app.core": ["price"]}
    # inside the linked package the usual rules hold
    (deployed / "core.py").unlink()
    (deployed / "core.py").symlink_to(tmp_path / "secret.py")
    (tmp_path / "secret.py").write_text(BASE)
    with pytest.raises(BuildRefused, match="outside the tree"):
        build(str(tmp_path / "base"), str(tmp_path / "new"), patch_id="HP-DEPLOYED")
    # and the patched tree may not link out at all
    (tmp_path / "new" / "app").rename(tmp_path / "newapp")
    (tmp_path / "new" / "app").symlink_to(tmp_path / "newapp")
    with pytest.raises(BuildRefused, match="outside the tree"):
        build(str(tmp_path / "base"), str(tmp_path / "new"), patch_id="HP-DEPLOYED")


def test_a_fifo_is_refused_by_type_without_blocking(tmp_path):
    base, new = trees(tmp_path)
    core = tmp_path / "new" / "app" / "core.py"
    core.unlink()
    os.mkfifo(core)
    _refused(tmp_path, base, new, expect=(os.path.join(new, "app", "core.py"), "a FIFO (named pipe), not a regular file"))


def test_a_link_to_a_fifo_inside_the_tree_is_refused_by_type(tmp_path):
    base, new = trees(tmp_path)
    os.mkfifo(tmp_path / "new" / "app" / "pipe")
    core = tmp_path / "new" / "app" / "core.py"
    core.unlink()
    core.symlink_to("pipe")
    _refused(tmp_path, base, new, expect=("a symbolic link to a FIFO (named pipe)",))


def test_a_fifo_swapped_in_after_discovery_is_refused_on_the_open_descriptor(tmp_path):
    base, new = trees(tmp_path)
    tree = sourcetree.SourceTree(new, "patched")
    core = tmp_path / "new" / "app" / "core.py"
    core.unlink()
    os.mkfifo(core)
    with pytest.raises(sourcetree.UnsafeEntry, match="a FIFO"):
        tree.read_bytes(tree.modules["app.core"])


def test_a_link_to_dev_zero_is_refused(tmp_path):
    base, new = trees(tmp_path)
    core = tmp_path / "new" / "app" / "core.py"
    core.unlink()
    core.symlink_to("/dev/zero")
    _refused(tmp_path, base, new, expect=("a symbolic link to /dev/zero, outside the tree",))


def test_a_directory_swapped_for_a_link_out_after_discovery_is_caught_on_the_open_file(tmp_path):
    """Discovery saw a regular file; by the time it is opened a directory on
    the way links out of the tree. The open descriptor is checked, not the name."""
    base, new = trees(tmp_path)
    tree = sourcetree.SourceTree(new, "patched")
    outside = tmp_path / "outside"
    (tmp_path / "new" / "app").rename(outside)
    (tmp_path / "new" / "app").symlink_to(outside)
    with pytest.raises(sourcetree.UnsafeEntry, match=f"resolves to {outside / 'core.py'}, outside the tree"):
        tree.read_bytes(tree.modules["app.core"])


def test_a_socket_is_refused_by_type(tmp_path):
    base, new = trees(tmp_path)
    path = tmp_path / "new" / "app" / "core.py"
    path.unlink()
    if len(str(path)) > 100:
        pytest.skip("the path is too long for a Unix socket here")
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(path))
        _refused(tmp_path, base, new, expect=("a socket, not a regular file",))
    finally:
        sock.close()


def test_a_file_over_the_size_limit_is_refused_before_it_is_read(tmp_path):
    base, new = trees(tmp_path)
    core = tmp_path / "new" / "app" / "core.py"
    with open(core, "r+b") as fh:
        fh.truncate(sourcetree.MAX_FILE_BYTES + 1)  # sparse: costs no disk
    _refused(tmp_path, base, new, expect=(f"{sourcetree.MAX_FILE_BYTES + 1} bytes, over the limit",))


def test_tree_limits_on_files_and_bytes(tmp_path, monkeypatch):
    base, new = trees(tmp_path)
    for i in range(5):
        (tmp_path / "new" / "app" / f"m{i}.py").write_text("")
    monkeypatch.setattr(sourcetree, "MAX_TREE_FILES", 3)
    with pytest.raises(BuildRefused, match="more than 3 module files"):
        build(base, new, patch_id="HP-MANY")
    monkeypatch.setattr(sourcetree, "MAX_TREE_FILES", 100)
    monkeypatch.setattr(sourcetree, "MAX_TREE_BYTES", len(BASE) - 1)
    with pytest.raises(BuildRefused, match="bytes of sources"):
        build(base, new, patch_id="HP-BIG")


def test_a_fifo_as_dist_info_metadata_is_refused(tmp_path):
    base, new = trees(tmp_path)
    dist = tmp_path / "base-wheel"
    (tmp_path / "base" / "app").rename(tmp_path / "app-base")
    dist.mkdir()
    (dist / "app").symlink_to(tmp_path / "app-base")
    (dist / "app-1.0.dist-info").mkdir()
    os.mkfifo(dist / "app-1.0.dist-info" / "METADATA")
    with pytest.raises(BuildRefused, match="METADATA: a FIFO"):
        build(str(dist), new, patch_id="HP-META")


def test_the_worker_is_stopped_at_its_time_limit(tmp_path, monkeypatch):
    if OTHER is None:
        pytest.skip("no second Python of 3.11-3.13 installed here")
    big = BASE + "".join(f"\ndef f{i}(a, b):\n    return [a + b * {i} for _ in range(a)]\n" for i in range(20000))
    base, new = trees(tmp_path, big, big.replace("round(x, 2)", "round(x, 3)"))
    monkeypatch.setattr(builder, "WORKER_TIMEOUT", 0.2)
    with pytest.raises(BuildError, match=r"took longer than 0.2 s; it was stopped"):
        build(base, new, patch_id="HP-SLOW", pythons=[OTHER])


# ---------------------------------------------------------------- encodings

LATIN1 = '# -*- coding: latin-1 -*-\n' + BASE + '\ndef dish():\n    return "caf\xe9"\n'
LATIN1_FIXED = LATIN1.replace('"caf\xe9"', '"cr\xe8me br\xfbl\xe9e"')

APPLY = r"""
import json, sys, traceback
sys.path.insert(0, sys.argv[1])
import app.core as core, livepatch
before = core.dish()
patch = livepatch.load_bundle(sys.argv[2], allow_unsigned=True)
livepatch.apply(patch)
after = core.dish()
print(json.dumps({"before": before, "after": after, "sources": sorted(patch.sources.values())}))
"""


@pytest.mark.parametrize("python", ["this", "other"])
@pytest.mark.parametrize("name, base, new, encoding", [
    ("latin-1 cookie", LATIN1, LATIN1_FIXED, "latin-1"),
    ("vim cookie cp1252", LATIN1.replace("-*- coding: latin-1 -*-", "vim: set fileencoding=cp1252 :"),
     LATIN1_FIXED.replace("-*- coding: latin-1 -*-", "vim: set fileencoding=cp1252 :"), "cp1252"),
    ("utf-8 BOM", "\ufeff" + LATIN1.split("\n", 1)[1], "\ufeff" + LATIN1_FIXED.split("\n", 1)[1], "utf-8"),
    ("CRLF newlines", LATIN1.replace("\n", "\r\n"), LATIN1_FIXED.replace("\n", "\r\n"), "latin-1"),
])
def test_sources_in_any_encoding_python_accepts_build_and_apply(tmp_path, python, name, base, new, encoding):
    if python == "other" and OTHER is None:
        pytest.skip("no second Python of 3.11-3.13 installed here")
    interpreter = sys.executable if python == "this" else OTHER
    base_dir, new_dir = trees(tmp_path, base, new, encoding=encoding)
    out = tmp_path / "x.lpb"
    r = run_cli("build", base_dir, new_dir, "-o", str(out), "--id", "HP-ENC", "--python", interpreter)
    assert r.returncode == 0, r.stderr
    bundle = fmt.read(out.read_bytes(), allow_unsigned=True)
    stored = bundle.payloads[bundle.manifest["modules"]["app.core"]["source"]].decode("utf-8")
    assert "cr\xe8me br\xfbl\xe9e" in stored and "\r" not in stored and not stored.startswith("\ufeff")
    assert sorted(t["target"] for t in bundle.manifest["targets"]) == ["app.core:dish"]
    # the service imports the baseline from its bytes, as Python decodes them
    proc = subprocess.run([interpreter, "-c", APPLY, base_dir, str(out)], capture_output=True, text=True,
                          timeout=HANG_GUARD, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["before"] == "caf\xe9" and result["after"] == "cr\xe8me br\xfbl\xe9e"
    assert any("cr\xe8me br\xfbl\xe9e" in s for s in result["sources"])


@pytest.mark.parametrize("content, expect", [
    (b"# -*- coding: bogus-codec -*-\nx = 1\n", "core.py: bad encoding declaration: unknown encoding"),
    (b"# coding: hex\nx = 1\n", "core.py: bad encoding declaration"),
    (b"x = 1\n\ny = 'caf\xe9'\n", "core.py:3: not valid utf-8"),
    (b"\xef\xbb\xbf# coding: latin-1\nx = 1\n", "core.py: bad encoding declaration"),
])
def test_sources_python_would_not_decode_are_one_clear_line(tmp_path, content, expect):
    base, new = trees(tmp_path, BASE, content)
    line = _refused(tmp_path, base, new, expect=(expect,))
    assert os.path.join(new, "app", "core.py") in line


# ---------------------------------------------------------------- deep code

DEEP = {
    "parentheses": ("x = " + "(" * 300 + "1" + ")" * 300 + "\n", "core.py:3: too many nested parentheses"),
    "brackets": ("x = " + "[" * 200_000 + "]" * 200_000 + "\n", "core.py:3: too many nested parentheses"),
    "unary": ("x = " + "-" * 200_000 + "1\n", "core.py: too complex to parse"),
    "binary": ("def f():\n    return " + "1 + " * 200_000 + "1\n", "core.py: nested too deeply to compile"),
    "attributes": ("x = a" + ".b" * 200_000 + "\n", "core.py: nested too deeply to compile"),
    "middling": ("x = " + "1 + " * 3000 + "1\n", "core.py"),  # parses; may be too deep to compare
}


@pytest.mark.parametrize("python", ["this", "other"])
@pytest.mark.parametrize("case", sorted(DEEP))
def test_very_deep_expressions_are_one_line_naming_the_file(tmp_path, case, python):
    if python == "other" and OTHER is None:
        pytest.skip("no second Python of 3.11-3.13 installed here")
    tail, expect = DEEP[case]
    base, new = trees(tmp_path, BASE, BASE.replace("import os\n", "import os\n\n" + tail, 1))
    args = ["build", base, new, "-o", str(tmp_path / "x.lpb"), "--id", "HP-DEEP"]
    if python == "other":
        args += ["--python", OTHER]
    r = run_cli(*args)
    if case == "middling" and r.returncode == 0:
        return  # within what every step handles: a valid build
    line = one_line_error(r, 3)
    assert os.path.join(new, "app", "core.py") in line and expect in line, line


def test_deep_code_in_the_baseline_names_the_baseline_file(tmp_path):
    deep = BASE.replace("import os\n", "import os\n\nx = " + "-" * 200_000 + "1\n", 1)
    base, new = trees(tmp_path, deep, FIXED)
    with pytest.raises(BuildRefused) as info:
        build(base, new, patch_id="HP-DEEP")
    assert f"{os.path.join(base, 'app', 'core.py')}: too complex to parse" in str(info.value)


def test_several_bad_sources_are_listed_one_per_line(tmp_path):
    base, new = trees(tmp_path, BASE, "def price(:\n")
    (tmp_path / "base" / "app" / "other.py").write_text("x = 1\n")
    (tmp_path / "new" / "app" / "other.py").write_text("x = " + "(" * 300 + ")" * 300 + "\n")
    with pytest.raises(BuildRefused) as info:
        build(base, new, patch_id="HP-TWO")
    assert str(info.value).splitlines()[0] == "cannot build HP-TWO: 2 source files do not compile"
    assert sorted(p.category for p in info.value.problems) == ["refused:syntax", "refused:syntax"]


# ---------------------------------------------------------------- the command line

def test_cli_errors_are_one_line_with_their_exit_code_and_write_nothing(tmp_path):
    base, new = trees(tmp_path)
    out = tmp_path / "out.lpb"
    key = tmp_path / "k"
    run_cli("keygen", str(key))
    os.mkfifo(tmp_path / "fifo")
    cases = [
        (["--key", str(tmp_path / "missing.key")], 1, "cannot read the key"),
        (["--key", str(tmp_path)], 1, "cannot read the key"),
        (["--key", str(tmp_path / "fifo")], 1, "not a regular file"),
        (["--python", "python2.4-not-here"], 2, "--python python2.4-not-here: no such interpreter on PATH"),
        (["--python", "/bin/sh"], 2, "is not a Python interpreter livepatch can use"),
        (["--python", str(tmp_path / "nope" / "python")], 2, "no such interpreter"),
        (["--python", sys.executable, "--python", sys.executable], 2, "two --python interpreters are the same version"),
    ]
    for extra, code, text in cases:
        r = run_cli("build", base, new, "-o", str(out), "--id", "HP-CLI", *extra)
        assert text in one_line_error(r, code)
        assert not out.exists()
    for args, code, text in [
        ([str(tmp_path / "nobase"), new, "-o", str(out)], 1, f"baseline directory {tmp_path / 'nobase'} does not exist"),
        ([base, str(tmp_path / "nonew"), "-o", str(out)], 1, f"patched directory {tmp_path / 'nonew'} does not exist"),
        ([base, str(key) + ".pub", "-o", str(out)], 1, "is not a directory"),
        ([base, new, "-o", str(tmp_path / "no" / "dir" / "x.lpb")], 1, f"there is no directory {tmp_path / 'no' / 'dir'}"),
        ([base, new, "-o", str(tmp_path)], 1, "it is a directory"),
    ]:
        r = run_cli("build", *args, "--id", "HP-CLI", "--key", str(key) + ".key")
        assert text in one_line_error(r, code)
        assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == ["base", "fifo", "k.key", "k.pub", "new"]


def test_cli_json_error_carries_the_exit_code(tmp_path):
    base, new = trees(tmp_path)
    r = run_cli("build", base, new, "-o", str(tmp_path / "x.lpb"), "--id", "HP-J", "--python", "no-such-python",
                "--json")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    error = json.loads(r.stdout)["error"]
    assert error["exit_code"] == 2 and error["type"] == "UnknownInterpreter" and "no-such-python" in error["message"]


def test_api_error_classes(tmp_path):
    base, new = trees(tmp_path)
    with pytest.raises(UnknownInterpreter):
        build(base, new, patch_id="HP-A", pythons=["no-such-python"])
    with pytest.raises(BuildError, match="does not exist"):
        build(str(tmp_path / "missing"), new, patch_id="HP-A")
    data, _ = build(base, new, patch_id="HP-A", pythons=[sys.executable])  # this interpreter: in process
    assert fmt.read(data, allow_unsigned=True).manifest["pythons"] == [PYTHON_TAG]
