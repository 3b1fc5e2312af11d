"""livepatch as a user has it: a wheel built from this checkout and
installed (not editable) into a private virtual environment.

An editable install imports the package through a finder that site runs
at every start (and that imports pathlib, urllib.parse, ipaddress and
more); a user's `pip install livepatch` has none of that, so start-up
figures are measured here. The wheel is built from a copy of the checkout
(the checkout is left untouched); its dependencies are copied, file by
file as their installed metadata lists them, from the environment running
the benchmark, so that nothing is fetched."""

from __future__ import annotations

import glob
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SOURCES = ("livepatch", "agent", "pyproject.toml", "setup.py", "README.md", "LICENSE", "MANIFEST.in",
            "livepatch-autostart.pth", "packaging")


def _copy_checkout(dest: str) -> None:
    os.makedirs(dest)
    skip = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info", "build")
    for name in _SOURCES:
        path = os.path.join(ROOT, name)
        if os.path.isdir(path):
            shutil.copytree(path, os.path.join(dest, name), ignore=skip)
        elif os.path.exists(path):
            shutil.copy2(path, dest)


def _requirements(dist) -> list[str]:
    names = []
    for req in dist.requires or ():
        if ";" in req and "extra ==" in req:
            continue
        marker = req.split(";", 1)[1] if ";" in req else None
        if marker and not _marker_holds(marker):
            continue
        names.append(re.match(r"[A-Za-z0-9._-]+", req.strip()).group(0))
    return names


def _marker_holds(marker: str) -> bool:
    from packaging.markers import Marker
    return Marker(marker).evaluate()


def _copy_dependencies(wheel_metadata, site_packages: str) -> list[str]:
    """Every distribution the wheel needs, transitively, copied from ours."""
    seen, todo = set(), _requirements(wheel_metadata)
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        seen.add(key)
        dist = importlib.metadata.distribution(name)
        for file in dist.files or ():
            source = os.path.realpath(dist.locate_file(file))
            target = os.path.normpath(os.path.join(site_packages, file))
            if not target.startswith(site_packages + os.sep) or not os.path.isfile(source):
                continue  # scripts installed outside site-packages (../../bin): not needed to import
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copy2(source, target)
        todo.extend(_requirements(dist))
    return sorted(seen)


def install(work: str) -> dict:
    """Build the wheel and install it into `work`/venv; returns the venv's
    python, its `livepatch` console script and what went in."""
    src, wheels, venv = (os.path.join(work, n) for n in ("src", "wheel", "venv"))
    _copy_checkout(src)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                          "-w", wheels, src], capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise SystemExit(f"building the wheel failed: {out.stderr.strip()[-2000:]}")
    wheel = glob.glob(os.path.join(wheels, "livepatch-*.whl"))[0]
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=300)
    python = os.path.join(venv, "bin", "python")
    out = subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index",
                          "--disable-pip-version-check", wheel], capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise SystemExit(f"installing the wheel failed: {out.stderr.strip()[-2000:]}")
    site_packages = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   capture_output=True, text=True, check=True).stdout.strip()
    installed = importlib.metadata.Distribution.at(glob.glob(os.path.join(site_packages, "livepatch-*.dist-info"))[0])
    dependencies = _copy_dependencies(installed, site_packages)
    # compiled once, as pip does on install: a start should not compile
    subprocess.run([python, "-m", "compileall", "-q", site_packages], check=True, capture_output=True, timeout=600)
    return {"python": python, "livepatch": os.path.join(venv, "bin", "livepatch"), "venv": venv,
            "site_packages": site_packages, "wheel": os.path.basename(wheel), "dependencies": dependencies}
