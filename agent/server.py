"""The agent's control channel: a Unix socket per process, named by PID in
a directory only the process owner can enter (agent/runtime_dir.py),
admitting only the same uid or root.

The directory is the first safe candidate: one that someone else created
or left open is passed over (the service log says so), and when none is
safe the server is not created (UnsafeDirectory). Sockets left in the
directory by processes that died without cleaning up (SIGTERM skips
atexit) are removed when the socket is made.

What is read and written on the connections, and the limits that keep
clients from wedging the service: agent/connections.py."""

from __future__ import annotations

import os
import socket
import weakref

from livepatch import atfork

from . import protocol, runtime_dir
from .connections import Connections, warn_once
from .stale_sockets import answers, remove_stale

_servers: "weakref.WeakSet[Server]" = weakref.WeakSet()


class Server:
    """This process's control socket: made in the first safe directory,
    served by agent/connections.py, removed on close."""

    def __init__(self, handle, directory: str | None = None, max_frame: int | None = None):
        try:
            self.max_frame = protocol.max_request(max_frame)
        except ValueError as exc:
            if max_frame is not None:
                raise  # the caller's own argument: its mistake to see
            warn_once(f"livepatch: {exc}; the control socket accepts frames up to {protocol.DEFAULT_MAX_REQUEST} bytes")
            self.max_frame = protocol.DEFAULT_MAX_REQUEST
        name = runtime_dir.socket_name(os.getpid())
        reasons: list = []
        places = [runtime_dir.ensure(directory)] if directory is not None else runtime_dir.usable(reasons)
        for place in places:
            path = os.path.join(place, name)
            if answers(path):  # another live process with our PID number (another PID namespace)
                reasons.append(f"{path} is in use by another process")
                continue
            sock, bound = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), False
            try:
                remove_stale(place, own=path)
                sock.bind(path)
                bound = True
                os.chmod(path, 0o600)  # the 0700 directory already keeps others out
            except OSError as exc:  # a path too long for AF_UNIX, a full or read-only disk
                sock.close()
                if bound:
                    os.unlink(path)
                reasons.append(f"{path}: {exc.strerror or exc}")
                continue
            break
        else:
            raise runtime_dir.UnsafeDirectory(runtime_dir.nowhere(reasons))
        self.directory, self.path = place, path
        self._inode = os.lstat(self.path).st_ino
        self._pid = os.getpid()
        self._connections = Connections(sock, handle, self.max_frame, path)
        _servers.add(self)
        if reasons:
            import logging
            logging.getLogger("livepatch").warning(
                "livepatch: the control socket of process %d is %s (passed over: %s)",
                os.getpid(), self.path, "; ".join(reasons))

    def start(self) -> None:
        self._connections.start()

    def close(self) -> None:
        if self._connections.closed:
            return
        self._connections.close()
        try:
            if os.lstat(self.path).st_ino == self._inode:  # ours, not a successor's
                os.unlink(self.path)
        except OSError:
            pass

    def abandon(self) -> None:
        """In a forked child: close the child's copies of the parent's socket
        and connections (the parent keeps serving; the file stays)."""
        self._connections.abandon()


def _after_fork_in_child() -> None:
    for server in list(_servers):
        if server._pid != os.getpid():
            server.abandon()


atfork.on_child_reset(_after_fork_in_child)
