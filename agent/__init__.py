"""The in-process agent, installed as `livepatch.agent`.

`start()` opens the control channel (agent/server.py) in this process and
returns its socket path; `livepatch attach`, `livepatch run` and services
that call it themselves all end up here. It imports only the standard
library and livepatch; cryptography is loaded when a bundle is verified."""

from __future__ import annotations

import atexit
import os
import sys
import threading

_lock = threading.Lock()
_server = None
_pid = None


def start(*, name: str | None = None, trust=None, allow_unsigned: bool | None = None,
          socket_dir: str | None = None) -> str:
    """Start the agent (idempotent); returns the socket path.

    `trust`: a .pub file or directory of trusted keys (default: the
    LIVEPATCH_TRUST environment variable). `allow_unsigned`: development
    switch accepting unsigned bundles (default: LIVEPATCH_ALLOW_UNSIGNED=1);
    the status reports it."""
    global _server, _pid
    with _lock:
        if _server is not None and _pid == os.getpid():
            return _server.path
        from .requests import Agent
        from .server import Server
        if trust is None:
            trust = os.environ.get("LIVEPATCH_TRUST") or None
        if allow_unsigned is None:
            allow_unsigned = os.environ.get("LIVEPATCH_ALLOW_UNSIGNED") == "1"
        name = name or os.environ.get("LIVEPATCH_NAME") or os.path.basename(sys.argv[0] or "python")
        holder = {}
        server = Server(lambda request, peer: holder["agent"].handle(request, peer), socket_dir)
        holder["agent"] = Agent(name=name, trust=trust, allow_unsigned=allow_unsigned, socket_path=server.path)
        server.start()
        _server, _pid = server, os.getpid()
        return server.path


def stop() -> None:
    global _server
    with _lock:
        if _server is not None and _pid == os.getpid():
            _server.close()
        _server = None


def socket_path() -> str | None:
    return _server.path if _server is not None and _pid == os.getpid() else None


def _after_fork_in_child() -> None:
    # The child has no agent thread, and the socket is named by the parent's PID.
    global _server
    if _server is not None:
        try:
            _server._sock.close()
        except OSError:
            pass
    _server = None


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(stop)
