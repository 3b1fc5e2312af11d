"""The agent's control channel: a Unix socket per process, named by PID in
a directory only the process owner can enter (agent/runtime_dir.py),
admitting only the same uid or root.

The directory is the first safe candidate: one that someone else created
or left open is passed over (the service log says so), and when none is
safe the server is not created (UnsafeDirectory). Sockets left in the
directory by processes that died without cleaning up (SIGTERM skips
atexit) are removed when the socket is made.

One daemon thread blocks in accept() (nothing runs while idle: no polling,
no hooks). Each connection is served on its own short-lived thread with a
read timeout, so a client that stalls or sends garbage only ever costs its
own thread; at most MAX_CLIENTS are served at once."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time

from . import protocol, runtime_dir

READ_TIMEOUT = 10.0
MAX_CLIENTS = 8
_UCRED = struct.Struct("iII")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}


def peer_credentials(conn: socket.socket) -> tuple[int, int, int]:
    return _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))


class Server:
    def __init__(self, handle, directory: str | None = None):
        self.handle = handle  # (request dict, peer (pid, uid, gid)) -> response dict
        name = runtime_dir.socket_name(os.getpid())
        reasons: list = []
        places = [runtime_dir.ensure(directory)] if directory is not None else runtime_dir.usable(reasons)
        for place in places:
            path = os.path.join(place, name)
            if _answers(path):  # another live process with our PID number (another PID namespace)
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
        self.directory, self.path, self._sock = place, path, sock
        self._slots = threading.BoundedSemaphore(MAX_CLIENTS)
        self._inode = os.lstat(self.path).st_ino
        self._sock.listen(16)
        self._thread = threading.Thread(target=self._serve, name="livepatch-agent", daemon=True)
        self._closed = False
        if reasons:
            import logging
            logging.getLogger("livepatch").warning(
                "livepatch: the control socket of process %d is %s (passed over: %s)",
                os.getpid(), self.path, "; ".join(reasons))

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        except OSError:
            pass
        self._sock.close()
        try:
            if os.lstat(self.path).st_ino == self._inode:  # ours, not a successor's
                os.unlink(self.path)
        except OSError:
            pass

    def _serve(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                if self._closed:
                    return
                continue
            if not self._slots.acquire(blocking=False):
                self._reply_quietly(conn, {"v": protocol.VERSION, "ok": False,
                                           "error": {"error": "Busy", "message": "too many clients connected; retry"}})
                continue
            threading.Thread(target=self._client, args=(conn,), name="livepatch-agent-client", daemon=True).start()

    @staticmethod
    def _reply_quietly(conn, message) -> None:
        """Answer and hang up. Unread input would make close() send a reset
        that can destroy the answer in flight, so a little is drained first."""
        try:
            conn.settimeout(0.5)
            protocol.send(conn, message)
            conn.shutdown(socket.SHUT_WR)
            for _ in range(16):
                if not conn.recv(65536):
                    break
        except OSError:
            pass
        finally:
            conn.close()

    def _client(self, conn: socket.socket) -> None:
        try:
            peer = peer_credentials(conn)
            if peer[1] not in (os.getuid(), 0):
                # say why, then hang up: the process owner or root only
                self._reply_quietly(conn, {"v": protocol.VERSION, "ok": False, "error": {
                    "error": "PermissionDenied", "message": f"uid {peer[1]} may not control this process (owner uid {os.getuid()} or root only)"}})
                return
            conn.settimeout(READ_TIMEOUT)
            while True:
                try:
                    request = protocol.recv(conn)
                except protocol.ProtocolError as exc:
                    if str(exc) != "connection closed":
                        self._reply_quietly(conn, {"v": protocol.VERSION, "ok": False,
                                                   "error": {"error": "ProtocolError", "message": str(exc)}})
                    return
                protocol.send(conn, self.handle(request, peer))
        except (OSError, socket.timeout):
            pass  # the client went away or stalled: nothing of ours is left half-done
        finally:
            conn.close()
            self._slots.release()


def _answers(path: str) -> bool:
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
    return None if _answers(path) else st.st_ino


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
