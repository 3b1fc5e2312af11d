"""Control sockets left behind: a process that died without cleaning up
(SIGTERM skips atexit) leaves its socket file in the runtime directory.
They are told apart from live ones by whether anything answers on them and
by their age against the process whose PID names them, and removed by the
agent making its own socket and by the CLI listing agents."""

from __future__ import annotations

import os
import socket
import time


def answers(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
        return True
    except socket.timeout:
        return True  # a listener with a full backlog is still a listener
    except OSError:
        return False
    finally:
        probe.close()


def stale_inode(path: str, pid: int) -> int | None:
    """The inode of `path` if it is a stale socket of process `pid`: one
    nothing listens on any more, left by a process `pid` that is gone, or
    by an earlier process whose PID number was recycled (the file is older
    than the process). A socket being set up between bind() and listen() by
    a live process is newer than that process, so it is never taken for
    stale."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    started = process_start_time(pid)
    if started is not None and st.st_mtime >= started - 0.5:
        return None
    return None if answers(path) else st.st_ino


def remove_stale(directory: str, own: str | None = None) -> list[str]:
    """Remove the stale sockets in `directory` (the caller owns it); `own`
    is our own socket's path, which nothing else answers on by now."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for entry in names:
        stem = entry[:-5] if entry.endswith(".sock") else ""
        if not stem.isdigit():
            continue
        path = os.path.join(directory, entry)
        try:
            inode = os.lstat(path).st_ino if path == own else stale_inode(path, int(stem))
            # only the file judged stale: not one a new process has bound since
            if inode is not None and os.lstat(path).st_ino == inode:
                os.unlink(path)
                removed.append(path)
        except OSError:
            pass
    return removed


def process_start_time(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    ticks = int(fields[19])  # field 22, starttime, in clock ticks since boot
    age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    return time.time() - age
