"""Released distributions as build inputs: `livepatch build --from PKG==A --to PKG==B`.

An operator who runs release A of a package and wants the fix of release B
has the two published wheels, not two source trees. This module fetches
them with pip (`pip download --no-deps --only-binary=:all:`: a wheel is
unpacked, never built, so nothing of the package runs; pip's own
configuration, such as PIP_INDEX_URL or PIP_FIND_LINKS, applies) into a
private directory made for this build, unpacks them with the same
suspicion as any tree (no absolute paths, no `..`, no links, bounded
sizes), checks that each wheel's dist-info METADATA names the requested
distribution and version, and hands the two trees to the builder, which
takes the baseline's name and version from that METADATA. The directory
is removed when the build ends."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager

from .builder import BuildError, BuildRefused
from .sourcetree import MAX_FILE_BYTES, MAX_TREE_BYTES, MAX_TREE_FILES

PIP_TIMEOUT = 600.0  # seconds for one download, an index may be slow
_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?")
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+!_-]*")


def parse_spec(text: str) -> tuple[str, str]:
    """`NAME==VERSION` -> (name, version); ValueError with what is wrong."""
    name, sep, version = text.strip().partition("==")
    name, version = name.strip(), version.strip()
    if not sep or not name or not version:
        raise ValueError(f"{text!r} is not NAME==VERSION (for example jinja2==3.1.3)")
    if not _NAME.fullmatch(name):
        raise ValueError(f"{name!r} is not a distribution name")
    if not _VERSION.fullmatch(version) or "==" in version:
        raise ValueError(f"{version!r} is not an exact version (ranges are not builds of one release)")
    return name, version


def canonical(name: str) -> str:
    """The distribution name as PEP 503 compares names (Jinja2 = jinja2, python_multipart = python-multipart)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def fetch(name: str, version: str, dest: str, python: str = sys.executable) -> str:
    """Download the wheel of name==version into `dest` (a fresh directory); its path."""
    cmd = [python, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--no-input", "--quiet", "--dest", dest, f"{name}=={version}"]
    try:
        done = subprocess.run(cmd, cwd=dest, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=PIP_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise BuildError(f"cannot fetch {name}=={version}: pip did not finish within {PIP_TIMEOUT:.0f}s") from None
    except OSError as exc:
        raise BuildError(f"cannot fetch {name}=={version}: cannot run {python} -m pip: {exc.strerror}") from None
    if done.returncode != 0:
        errors = [ln.strip() for ln in done.stderr.splitlines() if ln.strip().startswith("ERROR:")]
        reason = (errors[-1] if errors else (done.stderr.strip().splitlines() or ["pip failed"])[-1])
        reason = reason.removeprefix("ERROR:").strip()
        raise BuildError(f"cannot fetch {name}=={version} with pip: {reason} (only wheels are used: "
                         "they unpack without running the package's code)")
    wheels = [f for f in os.listdir(dest) if f.endswith(".whl")]
    if len(wheels) != 1:
        raise BuildError(f"cannot fetch {name}=={version}: pip left {len(wheels)} wheels instead of one")
    return os.path.join(dest, wheels[0])


def unpack(wheel: str, dest: str) -> None:
    """Unpack a wheel into the empty directory `dest`, refusing any entry
    that would land outside it, a link, or sizes beyond the builder's limits.
    Nothing of the wheel is executed; files are written 0600, directories 0700."""
    shown = os.path.basename(wheel)
    try:
        archive = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as exc:
        raise BuildError(f"cannot read {shown}: {exc}") from None
    with archive:
        members = archive.infolist()
        if len(members) > MAX_TREE_FILES:
            raise BuildRefused(f"{shown}: {len(members)} entries, more than the {MAX_TREE_FILES} a tree may have")
        total = 0
        for info in members:
            parts = info.filename.split("/")
            mode = info.external_attr >> 16
            if info.filename.startswith("/") or "\\" in info.filename or any(p in ("..", ".") for p in parts) \
                    or ":" in parts[0]:
                raise BuildRefused(f"{shown}: entry {info.filename!r} would be written outside the unpacked tree")
            kind = stat.S_IFMT(mode)  # 0 where the archiver recorded no file type
            if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
                raise BuildRefused(f"{shown}: entry {info.filename!r} is {'a symbolic link' if stat.S_ISLNK(mode) else 'not a regular file'}")
            if info.file_size > MAX_FILE_BYTES:
                raise BuildRefused(f"{shown}: entry {info.filename!r} is {info.file_size} bytes, over the {MAX_FILE_BYTES} a file may have")
            total += info.file_size
            if total > MAX_TREE_BYTES:
                raise BuildRefused(f"{shown}: more than {MAX_TREE_BYTES} bytes unpacked, over what a tree may have")
        for info in members:
            parts = [p for p in info.filename.split("/") if p]
            if not parts:
                continue
            target = os.path.join(dest, *parts)
            if info.is_dir():
                os.makedirs(target, mode=0o700, exist_ok=True)
                continue
            os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as out, archive.open(info) as src:
                # read at most the declared size + 1: a member whose data outgrows its header is refused
                data = src.read(info.file_size + 1)
                if len(data) > info.file_size:
                    raise BuildRefused(f"{shown}: entry {info.filename!r} holds more than its declared size")
                out.write(data)


def _release_tree(name: str, version: str, work: str, label: str, python: str) -> tuple[str, tuple[str, str]]:
    download = os.path.join(work, f"{label}-wheel")
    tree = os.path.join(work, label)
    os.mkdir(download, 0o700)
    os.mkdir(tree, 0o700)
    wheel = fetch(name, version, download, python)
    unpack(wheel, tree)
    from .builder import distribution_info
    dist = distribution_info(tree)
    if dist is None:
        raise BuildRefused(f"{os.path.basename(wheel)} has no *.dist-info/METADATA naming its distribution and version")
    if canonical(dist[0]) != canonical(name) or dist[1] != version:
        raise BuildRefused(f"{os.path.basename(wheel)}: its METADATA says {dist[0]} {dist[1]}, not {name} {version}")
    return tree, dist


@contextmanager
def release_trees(from_spec: str, to_spec: str, python: str = sys.executable):
    """Yields (baseline tree, patched tree, (name, version) of the baseline)
    for two releases of one distribution; everything fetched is removed
    afterwards."""
    (name_a, ver_a), (name_b, ver_b) = parse_spec(from_spec), parse_spec(to_spec)
    if canonical(name_a) != canonical(name_b):
        raise BuildRefused(f"--from {name_a} and --to {name_b} are different distributions: "
                           "a hotpatch moves one distribution from a release to a later one")
    if ver_a == ver_b:
        raise BuildRefused(f"--from and --to are the same release ({name_a}=={ver_a})")
    work = tempfile.mkdtemp(prefix="livepatch-releases-")  # 0700, a fresh name: no races with other users
    try:
        base, dist = _release_tree(name_a, ver_a, work, "baseline", python)
        new, _ = _release_tree(name_b, ver_b, work, "patched", python)
        yield base, new, dist
    finally:
        shutil.rmtree(work, ignore_errors=True)
