"""The flock(2) that serialises every update of a service's state
directory, across the processes of the service and the threads of each
(a new descriptor per update), and safe across fork."""

from __future__ import annotations

import contextlib
import os

from livepatch import atfork

# Lock descriptors open in this process. A forked child inherits them (and
# with them the flock of a thread that no longer exists there): the child
# closes its copies, which never releases the parent's lock, but keeping
# them would hold it after the parent lets go. Done at fork (a reset,
# before the agent's own start in the child: livepatch/atfork.py) and again
# before each lock, whoever forked how.
_lock_fds = {"pid": os.getpid(), "fds": set()}


def _forget_inherited_locks() -> None:
    if _lock_fds["pid"] == os.getpid():
        return
    for fd in list(_lock_fds["fds"]):
        try:
            os.close(fd)
        except OSError:
            pass
    _lock_fds["fds"].clear()
    _lock_fds["pid"] = os.getpid()


atfork.on_child_reset(_forget_inherited_locks)


@contextlib.contextmanager
def exclusive(lock_path: str):
    """Hold an exclusive flock on `lock_path` (created 0600, never through a symlink)."""
    import fcntl
    _forget_inherited_locks()
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    _lock_fds["fds"].add(fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        # unlock explicitly: a child forked meanwhile shares this open
        # file, and closing our descriptor alone would leave it locked
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        _lock_fds["fds"].discard(fd)
        os.close(fd)
