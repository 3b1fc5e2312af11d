"""Noticing that the client of a request has gone while the request runs:
an apply or rollback waiting for a safe point is abandoned, before any
store, when the client that sent it pressed Ctrl-C or was killed.

The server marks each request it serves (`watching`); the request asks
`cancelled()` for a callable that the engine calls between attempts. Each
call is one poll(2) of the connection with no timeout: the client closing
its end, or shutting down its writing half (how the CLI asks to cancel and
still reads the confirmation), shows as end-of-file. Nothing runs while
no request waits (no thread, no timer)."""

from __future__ import annotations

import contextlib
import select
import socket
import threading

_local = threading.local()
_HANGUP = select.POLLHUP | select.POLLERR | select.POLLNVAL | getattr(select, "POLLRDHUP", 0)


class Watch:
    """Whether the peer of `conn` has hung up (sticky once seen)."""

    def __init__(self, conn: socket.socket):
        self._conn = conn
        self._gone = False

    def gone(self) -> bool:
        if self._gone:
            return True
        try:
            poller = select.poll()
            poller.register(self._conn.fileno(), select.POLLIN | _HANGUP)
            events = poller.poll(0)
        except (OSError, ValueError):  # closed under us
            self._gone = True
            return True
        for _, ev in events:
            if ev & _HANGUP:
                self._gone = True
            elif ev & select.POLLIN:
                # readable: end-of-file, or bytes of a next request (left unread)
                try:
                    self._gone = self._conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
                except (BlockingIOError, InterruptedError, socket.timeout):
                    pass
                except OSError:
                    self._gone = True
        return self._gone


@contextlib.contextmanager
def watching(conn: socket.socket):
    """Around serving one request read from `conn`, on the serving thread."""
    previous = getattr(_local, "watch", None)
    _local.watch = Watch(conn)
    try:
        yield
    finally:
        _local.watch = previous


def cancelled():
    """The `cancelled()` callable of the request this thread serves (true
    once its client has gone), or None outside a served request."""
    watch = getattr(_local, "watch", None)
    return watch.gone if watch is not None else None
