"""Talking to agents from outside: find a process's agent, make sure it is
that process's, send one request, and list the processes on this machine
that have a live agent.

A socket is used only when its directory passes the agent's own checks for
the target's uid (agent/runtime_dir.py: the target's candidate directories,
computed from its environment), the file is a socket owned by that uid, and
SO_PEERCRED says the listener is the target process itself, running as its
owner or root. Anything else is refused with the reason, and nothing is
sent to it: a directory planted in /tmp, or a same-named socket served by
another process, cannot answer for the target."""

from __future__ import annotations

import os

# the C socket type: the socket module makes enums of its constants at
# import (about 5 ms, an eighth of a `livepatch status`), which a client needs none of
import _socket

from livepatch.agent import protocol, runtime_dir
from livepatch.agent.runtime_dir import peer_credentials


class AgentUnavailable(Exception):
    """No such process, no agent answering in it, or a socket that is not its agent's."""


def owner(pid: int) -> int:
    """The real uid of process `pid` (the one its agent names and checks its directory by)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except OSError:
        pass
    raise AgentUnavailable(f"no process with PID {pid}")


def environment(pid: int) -> dict:
    """The environment process `pid` started with ({} if not ours to read)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            data = fh.read()
    except OSError:
        return {}
    env = {}
    for item in data.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            env[key.decode(errors="replace")] = value.decode(errors="replace")
    return env


def _directories(pid: int, uid: int) -> list[str]:
    """Where the agent of `pid` may have put its socket: its candidates
    from its own environment, then from ours (it may have changed its
    environment since it started, and ours is all we have when we may not
    read its)."""
    found = runtime_dir.candidates(uid, environment(pid), every_temp=True)
    found += runtime_dir.candidates(uid, None, every_temp=True)
    if uid == os.getuid():
        found += runtime_dir.candidates(uid, os.environ, every_temp=True)
    return list(dict.fromkeys(found))


def socket_for(pid: int) -> str | None:
    """The socket file named after `pid` in a safe directory of its owner,
    without connecting to it (None when there is none)."""
    uid = owner(pid)
    for directory in _directories(pid, uid):
        path = os.path.join(directory, runtime_dir.socket_name(pid))
        try:
            runtime_dir.check_socket(path, uid)
            runtime_dir.check_path(directory, uid)
        except (runtime_dir.UnsafeDirectory, OSError):
            continue
        return path
    return None


def connect(pid: int, wait: float = 60.0) -> tuple[_socket.socket, str]:
    """A connection to the agent of process `pid`, its peer verified; or
    AgentUnavailable naming why not."""
    uid = owner(pid)
    if os.getuid() not in (uid, 0):
        raise AgentUnavailable(f"process {pid} belongs to uid {uid}: only its owner or root may talk to its agent")
    refused, stale, denied = [], None, None
    for directory in _directories(pid, uid):
        path = os.path.join(directory, runtime_dir.socket_name(pid))
        try:
            os.lstat(path)
        except PermissionError:
            denied = denied or path
            continue
        except OSError:
            continue
        try:
            runtime_dir.check_path(directory, uid)
            runtime_dir.check_socket(path, uid)
        except runtime_dir.UnsafeDirectory as exc:
            refused.append(str(exc))
            continue
        except OSError:
            continue
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        sock.settimeout(wait)
        try:
            sock.connect(path)
            problem = _impostor(sock, path, pid, uid)
        except (ConnectionRefusedError, FileNotFoundError):
            sock.close()
            stale = stale or path
            continue
        except PermissionError:
            sock.close()
            denied = denied or path
            continue
        except BaseException:
            sock.close()
            raise
        if problem is None:
            return sock, path
        sock.close()
        refused.append(problem)
    if refused:
        raise AgentUnavailable(f"refusing the socket of process {pid}: {'; '.join(refused)}")
    if stale:
        raise AgentUnavailable(f"the agent socket of process {pid} ({stale}) does not answer: stale")
    if denied:
        raise AgentUnavailable(f"not allowed to connect to {denied}: only the process owner or root may")
    if not os.path.exists(f"/proc/{pid}"):
        raise AgentUnavailable(f"no process with PID {pid}")
    raise AgentUnavailable(f"process {pid} has no livepatch agent (start one with `livepatch attach {pid}`)")


def _impostor(sock: _socket.socket, path: str, pid: int, uid: int) -> str | None:
    """Why the listener on `sock` is not the agent of `pid` (None if it is)."""
    peer_pid, peer_uid, _ = peer_credentials(sock)
    if peer_pid != pid:
        who = f"process {peer_pid}" if peer_pid else "a process outside this PID namespace"
        return f"{path} is served by {who}, not {pid}"
    if peer_uid not in (uid, 0):
        return f"{path} is served by uid {peer_uid}, not {uid} or root"
    return None


def agent_socket(pid: int, wait: float = 5.0) -> str:
    """The path of the verified agent socket of `pid` (AgentUnavailable if none)."""
    sock, path = connect(pid, wait)
    sock.close()
    return path


def request(pid: int, op: str, wait: float = 60.0, **fields) -> dict:
    """Send one request; returns the response dict ({"ok": ..., ...})."""
    sock, _ = connect(pid, wait)
    try:
        try:
            protocol.send(sock, {"v": protocol.VERSION, "op": op, **fields})
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused from its header (too large, busy): the agent's answer is waiting to be read
        try:
            return protocol.recv(sock)
        except protocol.ProtocolError as exc:
            raise AgentUnavailable(f"the agent of process {pid} hung up: {exc}") from None
    finally:
        sock.close()


def encode_bundle(data: bytes) -> str:
    """base64.b64encode(data), without the base64 module (which imports re)."""
    import binascii
    return binascii.b2a_base64(data, newline=False).decode()


def live_agents() -> list[int]:
    """PIDs whose agent answers on a verified socket, ours or (for root)
    anyone's. Stale sockets are skipped, and removed from our own
    directories; sockets that fail the checks are not listed."""
    from livepatch.agent.stale_sockets import remove_stale
    me = os.getuid()
    places = {(d, me) for d in runtime_dir.candidates(me, os.environ, every_temp=True)}
    seen = set()
    for pid, uid in _processes(None if me == 0 else me):
        env = environment(pid)
        key = (uid, *(env.get(v) for v in ("XDG_RUNTIME_DIR", "TMPDIR", "TEMP", "TMP", "HOME")))
        if key not in seen:
            seen.add(key)
            places.update((d, uid) for d in runtime_dir.candidates(uid, env, every_temp=True))
    pids = set()
    for directory, uid in sorted(places):
        try:
            runtime_dir.check_path(directory, uid)
            names = os.listdir(directory)
        except (runtime_dir.UnsafeDirectory, OSError):
            continue
        if uid == me:
            remove_stale(directory)
            names = os.listdir(directory)
        for name in names:
            stem = name[:-5] if name.endswith(".sock") else ""
            if stem.isdigit() and int(stem) not in pids and _answers_as(int(stem), os.path.join(directory, name), uid):
                pids.add(int(stem))
    return sorted(pids)


def _answers_as(pid: int, path: str, uid: int) -> bool:
    """Whether `path` is the live agent socket of `pid`, owned by `uid`."""
    try:
        if owner(pid) != uid:
            return False
        runtime_dir.check_socket(path, uid)
    except (AgentUnavailable, runtime_dir.UnsafeDirectory, OSError):
        return False
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    sock.settimeout(2.0)
    try:
        sock.connect(path)
        return _impostor(sock, path, pid, uid) is None
    except TimeoutError:
        return True  # busy, but there: `ps` shows it as not answering
    except OSError:
        return False
    finally:
        sock.close()


def _processes(uid: int | None):
    """(pid, uid) of every process (of `uid` only, when given)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                owner_uid = os.stat(f"/proc/{entry}").st_uid
            except OSError:
                continue
            if uid is None or owner_uid == uid:
                yield int(entry), owner_uid
