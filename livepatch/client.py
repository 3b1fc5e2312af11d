"""Talking to agents from outside: find a process's socket, send one
request, and list the processes on this machine that have a live agent."""

from __future__ import annotations

import base64
import os
import socket

from livepatch.agent import protocol, runtime_dir


class AgentUnavailable(Exception):
    """No such process, or no agent answering in it."""


def socket_for(pid: int) -> str | None:
    uid = _owner(pid)
    for directory in runtime_dir.candidates(uid):
        path = os.path.join(directory, runtime_dir.socket_name(pid))
        if os.path.exists(path):
            return path
    return None


def _owner(pid: int) -> int:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except FileNotFoundError:
        raise AgentUnavailable(f"no process with PID {pid}") from None


def request(pid: int, op: str, wait: float = 60.0, **fields) -> dict:
    """Send one request; returns the response dict ({"ok": ..., ...})."""
    path = socket_for(pid)
    if path is None:
        raise AgentUnavailable(f"process {pid} has no livepatch agent (start one with `livepatch attach {pid}`)")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(wait)
    try:
        try:
            sock.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            raise AgentUnavailable(f"the agent socket of process {pid} ({path}) does not answer: stale") from None
        except PermissionError:
            raise AgentUnavailable(f"not allowed to connect to {path}: only the process owner or root may") from None
        protocol.send(sock, {"v": protocol.VERSION, "op": op, **fields})
        try:
            return protocol.recv(sock)
        except protocol.ProtocolError as exc:
            raise AgentUnavailable(f"the agent of process {pid} hung up: {exc}") from None
    finally:
        sock.close()


def encode_bundle(data: bytes) -> str:
    return base64.b64encode(data).decode()


def live_agents() -> list[int]:
    """PIDs with an agent socket in a runtime directory we can read."""
    pids = set()
    for directory in runtime_dir.candidates():
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            stem = name[:-5] if name.endswith(".sock") else ""
            if stem.isdigit() and os.path.exists(f"/proc/{stem}"):
                pids.add(int(stem))
    if os.getuid() == 0:  # root sees every user's agents
        import glob
        import tempfile
        for path in glob.glob(os.path.join(tempfile.gettempdir(), "livepatch-*", "*.sock")) + glob.glob("/run/user/*/livepatch/*.sock"):
            stem = os.path.basename(path)[:-5]
            if stem.isdigit() and os.path.exists(f"/proc/{stem}"):
                pids.add(int(stem))
    return sorted(pids)
