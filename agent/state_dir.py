"""Where a service's state directory is, and what makes it safe to use.

Location: `$LIVEPATCH_STATE_DIR/<name>` (or `start(state_dir=...)`), else
`/var/lib/livepatch/<name>` for root, else `$XDG_STATE_HOME/livepatch/<name>`
(default `~/.local/state/livepatch/<name>`). The directory is created 0700
by the first write (a service that never gets a patch leaves nothing) and
refused, like the socket directory, when it is a symlink, has another
owner or any group/other bits, or when a directory above it lets others
replace it (group/world writable without the sticky bit, or owned by
another user). Its files are read without following symlinks (only
regular files of ours) and replaced by atomic rename; what they hold is
agent/records.py's and agent/history_file.py's."""

from __future__ import annotations

import contextlib
import os
import re
import stat
import threading
import time

from . import log as _log
from . import runtime_dir

MAX_STATE_FILE = 64 << 20
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # used with fullmatch: no trailing newline


class UnsafeState(Exception):
    """The state directory cannot be used safely; the agent runs without it."""


def validate_name(name) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise UnsafeState(f"service name {str(name)[:80]!r} cannot name a state directory "
                          "(letters, digits, '.', '_', '-'; at most 64; no '..' or '/')")
    return name


def default_root() -> str:
    if os.geteuid() == 0:
        return "/var/lib/livepatch"
    base = os.environ.get("XDG_STATE_HOME")
    if not base or not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "livepatch")


def location(name: str, root: str | None = None) -> str:
    root = root or os.environ.get("LIVEPATCH_STATE_DIR") or default_root()
    return os.path.join(os.path.abspath(root), validate_name(name))


def _check_ancestors(path: str) -> None:
    """Nobody but us or root may replace `path` or a directory above it."""
    uid = os.getuid()
    here = os.path.realpath(os.path.dirname(path))
    while not os.path.lexists(here):  # not created yet: check what exists above
        here = os.path.dirname(here)
    while True:
        st = os.stat(here)
        if st.st_uid not in (0, uid):
            raise UnsafeState(f"{here} (above {path}) is owned by uid {st.st_uid}; others could replace the state directory")
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise UnsafeState(f"{here} (above {path}) has mode {stat.S_IMODE(st.st_mode):o}: "
                              "writable by others without the sticky bit")
        parent = os.path.dirname(here)
        if parent == here:
            return
        here = parent


def _ensure_dir(path: str) -> None:
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    try:
        runtime_dir.check(path)
    except runtime_dir.UnsafeDirectory as exc:
        raise UnsafeState(str(exc)) from None


def _makedirs_private(path: str) -> None:
    """Create the missing directories of `path`, each 0700."""
    missing = []
    here = path
    while not os.path.lexists(here):
        missing.append(here)
        parent = os.path.dirname(here)
        if parent == here:
            break
        here = parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            pass


class StateDir:
    """One service's state directory. Every update runs under an exclusive
    flock on `.lock` (agent/state_lock.py) and replaces files by atomic rename."""

    def __init__(self, path: str):
        """Checks what exists; a directory not there yet is created by the
        first write, so services that never get a patch leave nothing on disk."""
        self.path = path
        self._lock_path = os.path.join(path, ".lock")
        self._warned: set = set()
        self._ready = False
        _check_ancestors(path)
        if os.path.lexists(path):
            self._create()

    def _create(self) -> None:
        if self._ready:
            return
        _makedirs_private(os.path.dirname(self.path))
        _check_ancestors(self.path)
        _ensure_dir(self.path)
        for sub in ("bundles", "retired"):
            _ensure_dir(os.path.join(self.path, sub))
        self._ready = True

    # -------------------------------------------------------------- files
    def locked(self):
        """Every update runs inside this (agent/state_lock.py)."""
        from .state_lock import exclusive
        self._create()
        return exclusive(self._lock_path)

    def _present(self) -> bool:
        """Whether the directory exists (checked before its first use)."""
        if not self._ready and os.path.lexists(self.path):
            self._create()
        return self._ready

    def _read(self, name: str) -> bytes | None:
        if not self._present():
            return None
        try:
            # O_NONBLOCK: a FIFO planted here cannot hang the service
            fd = os.open(os.path.join(self.path, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
                raise UnsafeState(f"{os.path.join(self.path, name)} is not a regular file of ours")
            return fh.read(MAX_STATE_FILE + 1)

    def _read_or_warn(self, name: str, key: str) -> bytes | None:
        """`_read`, or None with one log line (per `key`) when it cannot be read."""
        try:
            return self._read(name)
        except (OSError, UnsafeState) as exc:
            self._warn_once(key, f"cannot read {self.path}/{name} ({exc}); treating it as empty")
            return None

    def _write(self, name: str, data: bytes) -> None:
        """Write to a fresh temporary name, then rename over `name`."""
        final = os.path.join(self.path, name)
        tmp = os.path.join(os.path.dirname(final),
                           f".{os.path.basename(name)}.{os.getpid()}.{threading.get_ident()}.{time.monotonic_ns()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            _log.logger.warning("livepatch: %s", message)

