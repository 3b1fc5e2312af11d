"""The in-process agent, installed as `livepatch.agent`.

`start()` opens the control channel (agent/server.py) in this process and
returns its socket path; `livepatch attach`, `livepatch run` (through
agent/autostart.py) and services that call it themselves all end up here.
It imports only the standard library and livepatch; cryptography is loaded
when a bundle is verified.

The agent follows the process: after `os.fork` the child starts its own
agent (a socket named by its own PID, the same options), and the options
are kept in `os.environ` (LIVEPATCH_AUTOSTART and friends) so that spawned
interpreters of this environment start one too through
livepatch-autostart.pth. `follow=False` (LIVEPATCH_FOLLOW=0) turns both off."""

from __future__ import annotations

import _thread
import atexit
import os
import sys

from livepatch import atfork

# _thread: a command that only talks to agents imports this package too (for
# the protocol), and needs nothing of threading
_lock = _thread.allocate_lock()
_server = None
_pid = None
_agent = None
_options = None  # what the running agent was started with: a forked child starts with the same


def start(*, name: str | None = None, trust=None, allow_unsigned: bool | None = None,
          socket_dir: str | None = None, state_dir: str | None = None, follow: bool | None = None,
          max_frame: int | None = None, version: str | None = None) -> str | None:
    """Start the agent (idempotent); returns the socket path, or None when
    no safe socket directory could be had (the agent then runs without a
    control channel: recorded patches still re-apply).

    `trust`: a .pub file or directory of trusted keys (default: the
    LIVEPATCH_TRUST environment variable). `allow_unsigned`: development
    switch accepting unsigned bundles (default: LIVEPATCH_ALLOW_UNSIGNED=1);
    the status reports it. `state_dir`: where the service's state lives
    (default: LIVEPATCH_STATE_DIR). `follow`: start agents in forked and
    spawned children too (default: on unless LIVEPATCH_FOLLOW=0).
    `max_frame`: the largest request frame the control socket accepts, in
    bytes (default: LIVEPATCH_MAX_FRAME, else 16 MiB; see agent/protocol.py).
    `version`: the release this program is, which status, ps and assess
    show as its baseline (default: LIVEPATCH_VERSION, else the installed
    distribution of `name`'s version; see agent/baseline.py)."""
    global _server, _pid, _agent, _options
    with _lock:
        if _agent is not None and _pid == os.getpid():
            return _server.path if _server is not None else None
        from .requests import Agent
        from .runtime_dir import UnsafeDirectory
        from .server import Server
        env = os.environ
        if trust is None:
            trust = env.get("LIVEPATCH_TRUST") or None
        if allow_unsigned is None:
            allow_unsigned = env.get("LIVEPATCH_ALLOW_UNSIGNED") == "1"
        if state_dir is None:
            state_dir = env.get("LIVEPATCH_STATE_DIR") or None
        if follow is None:
            follow = env.get("LIVEPATCH_FOLLOW", "1") != "0"
        name = name or env.get("LIVEPATCH_NAME") or _default_name()
        version = version or env.get("LIVEPATCH_VERSION") or None
        # absolute, so that a child forked after a chdir() still finds them
        trust = os.path.abspath(trust) if isinstance(trust, (str, os.PathLike)) else trust
        state_dir = os.path.abspath(state_dir) if state_dir is not None else None
        holder = {}
        try:
            server = Server(lambda request, peer: holder["agent"].handle(request, peer), socket_dir, max_frame)
        except UnsafeDirectory as exc:
            import logging
            logging.getLogger("livepatch").warning(
                "livepatch: agent in process %d runs without a control socket: %s", os.getpid(), exc)
            server = None
        try:
            agent = Agent(name=name, trust=trust, allow_unsigned=allow_unsigned,
                          socket_path=server.path if server is not None else None)
            agent.state_dir = state_dir
            agent.declared_version = version
            from .state import on_agent_start; on_agent_start(agent)  # noqa: E702
        except BaseException:
            if server is not None:
                server.close()  # no socket file left behind by an agent that never ran
            raise
        holder["agent"] = agent
        if server is not None:
            server.start()
        _server, _pid, _agent = server, os.getpid(), agent
        _options = {"name": name, "trust": trust, "allow_unsigned": allow_unsigned, "socket_dir": socket_dir,
                    "state_dir": state_dir, "follow": follow, "max_frame": max_frame, "version": version}
        _export(_options)
        from . import quietfork  # only where an agent runs: the CLI imports this package too
        quietfork.install()
        return server.path if server is not None else None


def _export(options: dict) -> None:
    """Children spawned from here (a new interpreter, not a fork) learn the
    options from the environment; with following off they get no agent."""
    env = os.environ
    if not options["follow"]:
        env.pop("LIVEPATCH_AUTOSTART", None)
        return
    env["LIVEPATCH_AUTOSTART"] = "1"
    env["LIVEPATCH_NAME"] = options["name"]
    for var, value in (("LIVEPATCH_TRUST", options["trust"]), ("LIVEPATCH_STATE_DIR", options["state_dir"])):
        if isinstance(value, str):
            env[var] = value
        elif value is None:
            env.pop(var, None)
    if options.get("max_frame") is not None:
        env["LIVEPATCH_MAX_FRAME"] = str(options["max_frame"])
    if options.get("version"):
        env["LIVEPATCH_VERSION"] = options["version"]
    if options["allow_unsigned"]:
        env["LIVEPATCH_ALLOW_UNSIGNED"] = "1"
    else:
        env.pop("LIVEPATCH_ALLOW_UNSIGNED", None)
    env.pop("LIVEPATCH_FOLLOW", None)


def _default_name() -> str:
    """The program's name, from the command line as the interpreter got it
    (started from livepatch-autostart.pth, sys.argv[0] is still "-m" or
    "-c": the interpreter replaces it later)."""
    from livepatch import pyargs
    return pyargs.program_name(list(getattr(sys, "orig_argv", [])[1:]))


def stop() -> None:
    global _server, _agent
    with _lock:
        if _server is not None and _pid == os.getpid():
            _server.close()
        _server = _agent = None


def socket_path() -> str | None:
    return _server.path if _server is not None and _pid == os.getpid() else None


def _after_fork_in_child() -> None:
    # The child has no agent thread, the parent's socket is named by the
    # parent's PID, and a lock some parent thread held at the fork would stay
    # held here forever: start from scratch.
    global _server, _agent, _lock
    _lock = _thread.allocate_lock()
    inherited, options = _server, _options
    _server = _agent = None
    if inherited is not None:
        inherited.abandon()  # only our copies of its descriptors: the parent keeps listening
    if options is not None and options["follow"]:
        try:
            start(**options)
        except Exception as exc:  # the child goes on without an agent, never dies of it
            import logging
            logging.getLogger("livepatch").warning(
                "livepatch: no agent in forked process %d: %s: %s", os.getpid(), type(exc).__name__, exc)


atfork.on_child_start(_after_fork_in_child)
atexit.register(stop)
