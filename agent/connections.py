"""The connections of the agent's control socket (agent/server.py).

One daemon thread runs the connections (nothing runs while idle: it blocks
in poll() with no timeout when no client is connected). It accepts, reads
request frames and writes answers without ever blocking on a client: every
socket is non-blocking. A complete request is handled on a short-lived
thread (at most MAX_HANDLERS at once), so only requests that arrived whole
cost a thread, and a client that trickles bytes costs a table entry.

Limits, so that clients of the owner's uid cannot wedge or bloat the
service whatever they send:
* each request frame must arrive whole within REQUEST_DEADLINE of the
  connection being accepted (or of its previous answer), and its first
  byte within IDLE_LIMIT; an answer must be taken within WRITE_DEADLINE;
* at most MAX_CONNECTIONS connections are open; when full, the connection
  that has waited longest for its request (or to take its answer) is
  dropped for the new one (a prompt client is never the longest waiting);
* frames over the request limit (protocol.max_request) are refused from
  their header; frames over SMALL_FRAME need room in a budget shared by
  every connection (BUFFER_BUDGET_FRAMES request limits, held until the
  request is handled), or are answered Busy, so the bytes held for
  requests stay bounded;
* refusals (Busy, PermissionDenied, ProtocolError) are written with one
  non-blocking send, the client's unread input drained for LINGER seconds
  at most, and the connection closed: a rejected client that does not read
  can never stall the others."""

from __future__ import annotations

import collections
import os
import selectors
import socket
import threading
import time

from . import hangup, protocol
from .runtime_dir import peer_credentials

REQUEST_DEADLINE = 10.0
IDLE_LIMIT = 10.0
WRITE_DEADLINE = 10.0
MAX_CONNECTIONS = 64
MAX_HANDLERS = 8
SMALL_FRAME = 256 << 10  # up to MAX_CONNECTIONS of these need no budget (16 MiB at most)
BUFFER_BUDGET_FRAMES = 2
_CHUNK = 1 << 20

_READING, _HANDLING, _WRITING, _CLOSING = "reading", "handling", "writing", "closing"
# A refused client's unread input is drained for a moment after the answer:
# closing on unread input resets the connection, and a client reading to
# the end would see the reset instead of the end.
LINGER = 1.0
_MAX_LINGERING = 64
_MAX_DRAIN = 1 << 20


def _error(kind: str, message: str) -> dict:
    return {"v": protocol.VERSION, "ok": False, "error": {"error": kind, "message": message}}


class _Conn:
    __slots__ = ("sock", "fd", "registered", "peer", "state", "head", "buf", "got", "reserved", "since", "deadline", "idle_until",
                 "out", "sent", "close_after")

    def __init__(self, sock, peer, now):
        self.sock, self.fd, self.registered, self.peer = sock, sock.fileno(), False, peer
        self.out, self.sent, self.close_after, self.reserved = None, 0, False, 0
        self.waiting(now)

    def waiting(self, now) -> None:
        """Ready for the next request frame."""
        self.state, self.head, self.buf, self.got = _READING, b"", None, 0
        self.since, self.deadline, self.idle_until = now, now + REQUEST_DEADLINE, now + IDLE_LIMIT

    def started(self) -> bool:
        return bool(self.head)


class Connections:
    """The connections of one listening socket, run by a daemon thread."""

    def __init__(self, listener: socket.socket, handle, max_frame: int, path: str):
        self.handle = handle  # (request dict, peer (pid, uid, gid)) -> response dict
        self.max_frame = max_frame
        self.budget = BUFFER_BUDGET_FRAMES * max_frame
        self.path = path  # for the log lines
        self._sock = listener
        self._sock.listen(64)
        self._sock.setblocking(False)
        self._conns: dict[int, _Conn] = {}  # by file descriptor
        self._lingering: dict[int, _Conn] = {}  # refused, draining input until closed
        self._buffered = 0  # bytes reserved from the budget, by frames being read or handled
        self._handlers = 0
        self._count_lock = threading.Lock()
        self._done: collections.deque = collections.deque()  # (conn, frame) answers from handlers
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        # poll, not epoll: no kernel object shared with a forked child
        self._sel = selectors.PollSelector()
        self._sel.register(self._sock, selectors.EVENT_READ, None)
        self._sel.register(self._wake_r, selectors.EVENT_READ, self._wake_r)
        self._thread = threading.Thread(target=self._serve, name="livepatch-agent", daemon=True)
        self.closed = False

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop accepting, end the loop and close every descriptor."""
        self.closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # no new connections from here on
        except OSError:
            pass
        self._wake()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(2.0)
        if not self._thread.is_alive():
            self._release()  # else the loop thread releases everything as it ends

    def abandon(self) -> None:
        """After fork, in the child: the parent's connections and socket are
        the parent's; the child's copies of them must not keep a client
        waiting for an answer the child will never write."""
        self.closed = True
        self._release()

    def _release(self) -> None:
        """Close every descriptor (the socket file stays)."""
        for conn in [*self._conns.values(), *self._lingering.values()]:
            _close(conn.sock)
        self._conns.clear()
        self._lingering.clear()
        for s in (self._sock, self._wake_r, self._wake_w):
            _close(s)
        try:
            self._sel.close()
        except (OSError, ValueError, KeyError):
            pass

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"w")
        except OSError:
            pass  # the pipe is full: the loop has wake-ups pending anyway

    # ------------------------------------------------------------ the loop
    def _serve(self) -> None:
        try:
            while not self.closed:
                try:
                    self._once()
                except Exception as exc:  # never let the control channel die of one bad moment
                    if self.closed:
                        return
                    warn_once(f"livepatch: control socket {self.path}: {type(exc).__name__}: {exc}")
                    time.sleep(0.1)
        finally:
            if self.closed:
                self._release()

    def _once(self) -> None:
        events = self._sel.select(self._timeout())
        now = time.monotonic()
        for key, mask in events:
            if self.closed:
                return
            if key.data is None:
                self._accept(now)
            elif key.data is self._wake_r:
                self._woken(now)
            else:
                conn = key.data
                if conn.state == _READING:
                    self._read(conn, now)
                elif conn.state == _WRITING:
                    self._write(conn, now)
                elif conn.state == _CLOSING:
                    self._drain(conn)
        self._expire(time.monotonic())

    def _timeout(self) -> float | None:
        """Seconds until the nearest deadline; None (block) with no client."""
        soonest = None
        for c in [*self._conns.values(), *self._lingering.values()]:
            if c.state == _HANDLING:
                continue
            t = min(c.deadline, c.idle_until) if c.state == _READING and not c.started() else c.deadline
            soonest = t if soonest is None else min(soonest, t)
        return None if soonest is None else max(0.0, soonest - time.monotonic()) + 0.005

    def _expire(self, now: float) -> None:
        for conn in list(self._lingering.values()):
            if now >= conn.deadline:
                self._unlinger(conn)
        for conn in list(self._conns.values()):
            if conn.state == _HANDLING:
                continue
            if conn.state == _READING and not conn.started() and now >= conn.idle_until:
                self._drop(conn)  # an idle connection: nothing to answer
            elif now >= conn.deadline:
                if conn.state == _READING:
                    self._refuse(conn, "ProtocolError", f"request not received whole within {REQUEST_DEADLINE:g}s")
                else:
                    self._drop(conn)  # it does not take its answer

    def _accept(self, now: float) -> None:
        for _ in range(16):  # a burst at a time, so connected clients are served in between
            try:
                sock, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if self.closed:
                    return
                if exc.errno in (24, 23, 105, 12):  # EMFILE, ENFILE, ENOBUFS, ENOMEM: let them pass
                    time.sleep(0.05)
                return
            sock.setblocking(False)
            try:
                peer = peer_credentials(sock)
            except OSError:
                _close(sock)
                continue
            if peer[1] not in (os.getuid(), 0):
                # say why, then hang up: the process owner or root only
                self._refuse_sock(sock, _error("PermissionDenied", f"uid {peer[1]} may not control this process "
                                                             f"(owner uid {os.getuid()} or root only)"))
                continue
            if len(self._conns) >= MAX_CONNECTIONS and not self._evict(now):
                self._refuse_sock(sock, _error("Busy", "too many clients connected; retry"))
                continue
            conn = _Conn(sock, peer, now)
            self._conns[conn.fd] = conn
            self._sel.register(sock, selectors.EVENT_READ, conn)
            conn.registered = True

    def _evict(self, now: float) -> bool:
        """Make room: drop the connection that has waited longest for its
        request, if it has waited a while (a prompt client sends at once)."""
        waiting = [c for c in self._conns.values() if c.state != _HANDLING and now - c.since > 0.5]
        if not waiting:
            return False
        oldest = min(waiting, key=lambda c: c.since)
        if oldest.state == _WRITING:
            self._drop(oldest)  # mid-answer: nothing more can be said on it
        else:
            self._refuse(oldest, "Busy", "request not received while other clients waited to connect; retry")
        return True

    def _read(self, conn: _Conn, now: float) -> None:
        try:
            if conn.buf is None:
                data = conn.sock.recv(4 - len(conn.head))
                if not data:
                    return self._drop(conn)  # gone (mid-frame or between requests): no one to answer
                conn.head += data
                if len(conn.head) < 4:
                    return
                length = protocol.frame_length(conn.head)
                if length > self.max_frame:
                    return self._refuse(conn, "ProtocolError", f"frame of {length} bytes is over the limit of "
                                        f"{self.max_frame} (LIVEPATCH_MAX_FRAME in the service sets it)")
                if length > SMALL_FRAME:
                    with self._count_lock:
                        if self._buffered + length > self.budget:
                            room = False
                        else:
                            self._buffered += length
                            conn.reserved, room = length, True
                    if not room:
                        return self._refuse(conn, "Busy", "the agent is receiving other large requests; retry")
                conn.buf = bytearray(length)
                if length == 0:
                    return self._complete(conn)
                return
            view = memoryview(conn.buf)[conn.got:]
            n = conn.sock.recv_into(view, min(len(view), _CHUNK))
            view.release()
            if not n:
                return self._drop(conn)
            conn.got += n
            if conn.got == len(conn.buf):
                self._complete(conn)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)

    def _complete(self, conn: _Conn) -> None:
        """A whole frame arrived: handle it on a thread of its own."""
        self._sel.unregister(conn.sock)
        conn.registered = False
        with self._count_lock:
            full = self._handlers >= MAX_HANDLERS
            if not full:
                self._handlers += 1
        if full:
            self._unreserve(conn)
            return self._refuse(conn, "Busy", f"{MAX_HANDLERS} requests are being handled; retry")
        body, conn.buf, conn.state = conn.buf, None, _HANDLING
        try:
            threading.Thread(target=self._handle, args=(conn, body), name="livepatch-agent-request",
                             daemon=True).start()
        except RuntimeError:  # no thread to be had
            with self._count_lock:
                self._handlers -= 1
            self._unreserve(conn)
            self._refuse(conn, "Busy", "no thread available to handle the request; retry")

    def _handle(self, conn: _Conn, body: bytearray) -> None:
        close_after = False
        try:
            try:
                request = protocol.decode(body)
            except protocol.ProtocolError as exc:
                response, close_after = _error("ProtocolError", str(exc)), True
            else:
                del body
                with hangup.watching(conn.sock):  # an apply or rollback is cancelled if the client goes
                    response = self.handle(request, conn.peer)
                del request
            try:
                frame = protocol.encode(response)
            except Exception as exc:  # an answer that is not JSON: say so rather than nothing
                frame = protocol.encode(_error("InternalError", f"answer could not be encoded: {type(exc).__name__}"))
        except Exception as exc:  # a bug in a request handler: reported, never fatal to the agent
            frame = protocol.encode(_error("InternalError", f"{type(exc).__name__}: {str(exc)[:200]}"))
        finally:
            body = None
            with self._count_lock:
                self._handlers -= 1
            self._unreserve(conn)
        self._done.append((conn, frame, close_after))
        self._wake()

    def _unreserve(self, conn: _Conn) -> None:
        with self._count_lock:
            self._buffered -= conn.reserved
            conn.reserved = 0

    def _woken(self, now: float) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            return
        while self._done:
            conn, frame, close_after = self._done.popleft()
            if self._conns.get(conn.fd) is not conn:
                continue  # gone meanwhile (the server closed)
            conn.state, conn.out, conn.sent, conn.close_after = _WRITING, memoryview(frame), 0, close_after
            conn.since, conn.deadline = now, now + WRITE_DEADLINE
            self._sel.register(conn.sock, selectors.EVENT_WRITE, conn)
            conn.registered = True
            self._write(conn, now)

    def _write(self, conn: _Conn, now: float) -> None:
        try:
            while conn.sent < len(conn.out):
                conn.sent += conn.sock.send(conn.out[conn.sent:conn.sent + _CHUNK])
        except (BlockingIOError, InterruptedError):
            return  # the rest when the client reads
        except OSError:
            return self._drop(conn)
        conn.out.release()
        conn.out = None
        if conn.close_after:
            return self._drop(conn)
        conn.waiting(now)
        self._sel.modify(conn.sock, selectors.EVENT_READ, conn)

    def _refuse(self, conn: _Conn, kind: str, message: str) -> None:
        """One non-blocking try at telling the client why, then hang up."""
        self._forget(conn)
        self._refuse_sock(conn.sock, _error(kind, message), conn.peer)

    def _refuse_sock(self, sock: socket.socket, message: dict, peer=None) -> None:
        """Answer with a single non-blocking send and hang up. The answer is
        tiny and the connection new, so it fits the socket buffer; a client
        whose buffer is full of unread answers just sees the hang-up."""
        try:
            sock.setblocking(False)
            sock.send(protocol.encode(message))
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            return _close(sock)
        if len(self._lingering) >= _MAX_LINGERING:
            return _close(sock)
        conn = _Conn(sock, peer, time.monotonic())
        conn.state, conn.deadline, conn.got = _CLOSING, time.monotonic() + LINGER, 0
        try:
            self._sel.register(sock, selectors.EVENT_READ, conn)
        except (OSError, ValueError, KeyError):
            return _close(sock)
        self._lingering[conn.fd] = conn

    def _drain(self, conn: _Conn) -> None:
        try:
            n = len(conn.sock.recv(65536))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            n = 0
        conn.got += n
        if not n or conn.got > _MAX_DRAIN:
            self._unlinger(conn)

    def _unlinger(self, conn: _Conn) -> None:
        self._lingering.pop(conn.fd, None)
        try:
            self._sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        _close(conn.sock)

    def _drop(self, conn: _Conn) -> None:
        self._forget(conn)
        _close(conn.sock)

    def _forget(self, conn: _Conn) -> None:
        if self._conns.get(conn.fd) is conn:
            del self._conns[conn.fd]
        if conn.registered:
            conn.registered = False
            try:
                self._sel.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
        self._unreserve(conn)


def _close(sock) -> None:
    try:
        sock.close()
    except OSError:
        pass


_warned: set = set()


def warn_once(message: str) -> None:
    if message not in _warned and len(_warned) < 16:  # once each: a repeating fault must not flood the log
        _warned.add(message)
        import logging
        logging.getLogger("livepatch").warning("%s", message)
