"""Requests that Ctrl-C cancels: an apply or rollback sent to an agent is
abandoned there, before any store, when its client goes away (see
agent/hangup.py). On Ctrl-C the client shuts down its writing half, which
the agent sees as the client leaving, and keeps reading for a moment to
learn what became of the request: cancelled (nothing changed), or done
already (the commit came first). A killed client needs none of this: its
socket closes, and the agent cancels all the same.

`Group` lets a fan-out cancel every request it has in flight at once."""

from __future__ import annotations

import _socket  # the C type, as livepatch/client.py makes them

# How long to wait for the agent to confirm a cancel (it notices within
# one attempt burst, a fraction of a second, unless a store is under way).
CONFIRM_WAIT = 5.0


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a request; `response` is the agent's answer read
    after asking it to cancel (None if none came within CONFIRM_WAIT)."""

    def __init__(self, pid: int, response):
        super().__init__(pid)
        self.pid, self.response = pid, response


def was_cancelled(response) -> bool:
    return bool(response) and not response.get("ok") and (response.get("error") or {}).get("error") == "Cancelled"


class Group:
    """The connections of one fan-out, so that all can be cancelled at once."""

    def __init__(self):
        import threading
        self._lock = threading.Lock()
        self._socks: set = set()
        self.cancelling = False

    def add(self, sock) -> None:
        with self._lock:
            self._socks.add(sock)
            if self.cancelling:
                _hang_up(sock)

    def discard(self, sock) -> None:
        with self._lock:
            self._socks.discard(sock)

    def cancel_all(self) -> None:
        with self._lock:
            self.cancelling = True
            for sock in self._socks:
                _hang_up(sock)


def _hang_up(sock) -> None:
    try:
        sock.shutdown(_socket.SHUT_WR)
    except OSError:
        pass


def request(pid: int, op: str, wait: float = 60.0, group: Group | None = None, **fields) -> dict:
    """client.request, cancellable: Ctrl-C in this thread hangs up and
    raises Interrupted with the agent's answer; `group.cancel_all()` from
    another thread hangs up too, and this returns the answer (usually a
    Cancelled error)."""
    from livepatch.agent import protocol

    from .client import AgentUnavailable, connect
    sock, _ = connect(pid, wait)
    if group is not None:
        group.add(sock)
    try:
        try:
            protocol.send(sock, {"v": protocol.VERSION, "op": op, **fields})
        except KeyboardInterrupt:  # the request never arrived whole: the agent handles nothing
            raise Interrupted(pid, {"ok": False, "error": {"error": "Cancelled",
                                                           "message": "interrupted before the request was sent"}}) from None
        except OSError:
            if group is not None and group.cancelling:
                return {"ok": False, "error": {"error": "Cancelled", "message": "cancelled before it was sent"}}
            raise
        try:
            return protocol.recv(sock)
        except KeyboardInterrupt:
            _hang_up(sock)
            raise Interrupted(pid, _confirmation(sock)) from None
        except protocol.ProtocolError as exc:
            raise AgentUnavailable(f"the agent of process {pid} hung up: {exc}") from None
    finally:
        if group is not None:
            group.discard(sock)
        sock.close()


def _confirmation(sock):
    """The agent's answer after a hang-up, or None; a second Ctrl-C stops waiting."""
    from livepatch.agent import protocol
    try:
        sock.settimeout(CONFIRM_WAIT)
        return protocol.recv(sock)
    except (KeyboardInterrupt, OSError, protocol.ProtocolError):
        return None
