"""The agent's control channel: a Unix socket per process, named by PID in
the user's 0700 runtime directory, admitting only the same uid or root.

One daemon thread blocks in accept() (nothing runs while idle: no polling,
no hooks). Each connection is served on its own short-lived thread with a
read timeout, so a client that stalls or sends garbage only ever costs its
own thread; at most MAX_CLIENTS are served at once."""

from __future__ import annotations

import os
import socket
import struct
import threading

from . import protocol, runtime_dir

READ_TIMEOUT = 10.0
MAX_CLIENTS = 8
_UCRED = struct.Struct("3i")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}


def peer_credentials(conn: socket.socket) -> tuple[int, int, int]:
    return _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))


class Server:
    def __init__(self, handle, directory: str | None = None):
        self.handle = handle  # (request dict, peer (pid, uid, gid)) -> response dict
        self.directory = runtime_dir.ensure(directory)
        self.path = os.path.join(self.directory, runtime_dir.socket_name(os.getpid()))
        self._slots = threading.BoundedSemaphore(MAX_CLIENTS)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._remove_stale()
        self._sock.bind(self.path)
        os.chmod(self.path, 0o600)  # the 0700 directory already keeps others out
        self._inode = os.lstat(self.path).st_ino
        self._sock.listen(16)
        self._thread = threading.Thread(target=self._serve, name="livepatch-agent", daemon=True)
        self._closed = False

    def _remove_stale(self) -> None:
        """A socket left by a dead process whose PID we now have."""
        try:
            os.lstat(self.path)
        except FileNotFoundError:
            return
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(self.path)
        except OSError:
            os.unlink(self.path)
            return
        finally:
            probe.close()
        raise RuntimeError(f"another agent already listens on {self.path}")

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
