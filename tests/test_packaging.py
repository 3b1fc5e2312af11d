"""What a production host gets from the package: the attach shim built with
the package (no C compiler needed to attach), the compile-at-attach path as
the fallback, and an sdist complete enough to run its own tests."""

import email
import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import zipfile

import pytest

from live import Service, cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "demo_apps", "http_api")


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """The sdist and the wheel, built without network from the tracked files
    only (what a clean clone holds)."""
    if shutil.which("git") is None or not os.path.isdir(os.path.join(ROOT, ".git")):
        pytest.skip("needs the git checkout to know the tracked files")
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    files = [f for f in tracked.decode().split("\0") if f and os.path.isfile(os.path.join(ROOT, f))]
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    for f in files:
        os.makedirs(os.path.dirname(src / f) or src, exist_ok=True)
        shutil.copy2(os.path.join(ROOT, f), src / f)
    r = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel", "-o", str(out), str(src)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    (sdist,), (wheel,) = out.glob("*.tar.gz"), out.glob("*.whl")
    return {"files": files, "sdist": sdist, "wheel": wheel}


def test_the_sdist_holds_everything_its_tests_demo_and_benchmarks_need(dist):
    with tarfile.open(dist["sdist"]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    wanted = [f for f in dist["files"]
              if f.split("/")[0] in ("tests", "demo_apps", "docs", "scripts", "livepatch", "agent")
              or (f.startswith("benchmarks/") and f.endswith(".py"))
              or f in ("LICENSE", "Makefile", "README.md", "livepatch-autostart.pth", "pyproject.toml", "setup.py")]
    assert "tests/live.py" in wanted and "tests/conftest.py" in wanted
    assert sorted(set(wanted) - names) == []


def test_the_wheel_carries_the_built_shim_for_every_python_and_current_metadata(dist):
    assert "-py3-none-linux_" in dist["wheel"].name  # one wheel for 3.11 to 3.13
    with zipfile.ZipFile(dist["wheel"]) as whl:
        names = set(whl.namelist())
        assert {"livepatch/_attach_shim.so", "livepatch/attach_shim.c", "livepatch-autostart.pth"} <= names
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = email.message_from_bytes(whl.read(meta_name))
        assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
        # the `livepatch` command: packaging/bin/livepatch, its `#!python` made this environment's at install
        script = next(n for n in names if n.endswith(".data/scripts/livepatch"))
        assert whl.read(script).startswith(b"#!python\n")
        shim = whl.read("livepatch/_attach_shim.so")
    assert meta["License-Expression"] == "MIT" and shim[:4] == b"\x7fELF"


def _no_compiler_env(tmp_path):
    """PATH without cc or gcc, as on a production host, and a runtime
    directory of its own (where a shim compiled earlier would be cached)."""
    empty, run = tmp_path / "bin-without-compiler", tmp_path / "runtime"
    empty.mkdir(exist_ok=True)
    run.mkdir(mode=0o700, exist_ok=True)
    return dict(os.environ, PATH=str(empty), CC=str(empty / "cc"), XDG_RUNTIME_DIR=str(run))


def test_attach_needs_no_compiler_when_the_package_was_built_with_one(tmp_path):
    from livepatch import attach
    if attach.prebuilt_shim() is None:
        pytest.skip("this install was built without a compiler")
    svc = Service(tmp_path, DEMO, ["-m", "inventory.server"])
    try:
        r = cli("attach", str(svc.pid), "--allow-unsigned", "--json", env=_no_compiler_env(tmp_path))
        assert r.returncode == 0, r.stdout + r.stderr
        assert json.loads(r.stdout)["method"] == "pyinjector"
        assert cli("status", str(svc.pid)).returncode == 0
    finally:
        svc.stop()


def test_an_install_without_the_built_shim_compiles_it_at_attach_or_says_what_is_missing(tmp_path):
    svc = Service(tmp_path, DEMO, ["-m", "inventory.server"])
    program = textwrap.dedent(f"""
        import json, sys
        from livepatch import attach
        attach.prebuilt_shim = lambda: None  # as an install whose build had no compiler
        try:
            print(json.dumps(attach.attach({svc.pid}, allow_unsigned=True)))
        except attach.AttachError as exc:
            print(exc)
            sys.exit(1)
    """)
    try:
        r = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120,
                           env=_no_compiler_env(tmp_path))
        assert r.returncode == 1 and r.stdout.strip() == \
            "attaching needs a C compiler (cc/gcc) to build the 1 KB loader shim once", r.stdout + r.stderr
        if shutil.which("cc") or shutil.which("gcc"):
            r = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120,
                               env=dict(_no_compiler_env(tmp_path), PATH=os.environ["PATH"], CC="cc"))
            assert r.returncode == 0, r.stdout + r.stderr
            assert json.loads(r.stdout)["method"] == "pyinjector"
    finally:
        svc.stop()


def test_the_api_reference_covers_every_public_name_and_agent_option():
    import inspect

    import livepatch
    import livepatch.agent
    with open(os.path.join(ROOT, "docs", "api.md")) as fh:
        reference = fh.read()
    missing = [n for n in livepatch.__all__ if f"livepatch.{n}" not in reference]
    options = inspect.signature(livepatch.agent.start).parameters
    missing += [f"start({p}=)" for p in options if f"`{p}`" not in reference]
    assert missing == []
