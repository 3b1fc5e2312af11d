"""Where control sockets live: one directory per user, mode 0700.

`$XDG_RUNTIME_DIR/livepatch` when that is set and safe, else
`<system temp dir>/livepatch-<uid>`. The directory is created with mode
0700 and refused if it already exists as a symlink, with another owner, or
with any group/other permission bits, so nobody else can plant, replace or
reach a socket in it."""

from __future__ import annotations

import os
import stat


class UnsafeDirectory(Exception):
    pass


def candidates(uid: int | None = None) -> list[str]:
    uid = os.getuid() if uid is None else uid
    out = []
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and uid == os.getuid():
        out.append(os.path.join(xdg, "livepatch"))
    out.append(os.path.join(f"/run/user/{uid}", "livepatch"))
    out.append(os.path.join(_temp_root(), f"livepatch-{uid}"))
    return list(dict.fromkeys(out))


def check(path: str, uid: int | None = None) -> None:
    """Raise UnsafeDirectory unless `path` is a real directory owned by
    `uid` with no group/other permissions."""
    uid = os.getuid() if uid is None else uid
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeDirectory(f"{path} is a symlink; refusing to use it")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeDirectory(f"{path} is not a directory")
    if st.st_uid != uid:
        raise UnsafeDirectory(f"{path} is owned by uid {st.st_uid}, not {uid}; refusing to use it")
    if st.st_mode & 0o077:
        raise UnsafeDirectory(f"{path} has mode {stat.S_IMODE(st.st_mode):o}; it must be 0700")


def ensure(path: str | None = None) -> str:
    """The directory for this process's socket, created safely."""
    if path is None:
        xdg = os.environ.get("XDG_RUNTIME_DIR")
        parent_ok = bool(xdg) and os.path.isdir(xdg) and os.stat(xdg).st_uid == os.getuid()
        path = os.path.join(xdg, "livepatch") if parent_ok else candidates()[-1]
    try:
        os.mkdir(path, 0o700)  # atomic: either we create it (0700, ours) or it existed
    except FileExistsError:
        pass
    check(path)
    return path


def socket_name(pid: int) -> str:
    return f"{pid}.sock"


def _temp_root() -> str:
    """The directory tempfile.gettempdir() would choose, without importing
    tempfile into the service (it pulls in shutil, random, bz2 and lzma)."""
    for var in ("TMPDIR", "TEMP", "TMP"):
        path = os.environ.get(var)
        if path and os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK):
            return os.path.abspath(path)
    return "/tmp"
