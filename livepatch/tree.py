"""Which processes make up a service, and what each of them is.

A service is found either by name (every live agent whose status gives that
`agent.name`) or as a process tree (a PID and all its descendants that have
an agent). Within a service a process with descendants in it is a *master*
(a pre-fork master, a reloader: it starts the others and serves nothing);
the others are *workers*, the processes that serve. The statuses come from
one concurrent round of `status` requests (livepatch/fanout.py); the
parent/child relations from one read of /proc."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from . import fanout

STATUS_WAIT = 5.0
# A process forked or spawned moments ago may not be listening yet: wait
# this long for its agent before counting it as a process without one.
NEWCOMER_WAIT = 1.5


@dataclass
class Member:
    pid: int
    status: dict | None            # None: the agent did not answer
    error: str = ""                # why it did not answer
    command: str = ""
    parent: int | None = None      # nearest ancestor that is in the same service
    depth: int = 0
    role: str = "worker"
    children: list = field(default_factory=list)

    @property
    def answering(self) -> bool:
        return self.status is not None

    @property
    def name(self) -> str | None:
        return self.status["agent"]["name"] if self.status else None

    @property
    def serves(self) -> bool:
        return self.role == "worker"

    @property
    def applied(self) -> list[str]:
        return [p["id"] for p in self.status["applied"]] if self.status else []

    @property
    def pending(self) -> list[str]:
        """Modules with patch work waiting for their import."""
        return list(self.status.get("pending") or []) if self.status else []

    def pending_of(self, patch_id: str) -> dict:
        for p in (self.status or {}).get("applied", []):
            if p["id"] == patch_id:
                return dict(p.get("pending") or {})
        return {}

    @property
    def refused_at_import(self) -> list[str]:
        """Modules that refused a patch as they were imported: they run their own code, not the patch's."""
        return sorted({m for p in (self.status or {}).get("applied", []) for m in (p.get("refused_at_import") or {})})

    @property
    def state_code(self) -> str:
        """baseline, patched, pending, forced, refused_at_import or not_answering."""
        if self.status is None:
            return "not_answering"
        if self.status.get("forced"):
            return "forced"
        if self.refused_at_import:
            return "refused_at_import"
        if self.pending:
            return "pending"
        return "patched" if self.status["applied"] else "baseline"

    @property
    def state(self) -> str:
        code = self.state_code
        if code == "refused_at_import":
            return "refused at import: " + ", ".join(self.refused_at_import)
        return code.replace("_", " ")

    def row(self) -> dict:
        """The structured form used by `ps --json` and the service commands
        (docs/json.md): codes, flags and lists, no display text."""
        s = self.status or {}
        base = s.get("baseline") or {}
        agent = s.get("agent") or {}
        doing = agent.get("in_progress") or s.get("in_progress")
        return {"pid": self.pid, "parent": self.parent, "name": self.name, "role": self.role, "serves": self.serves,
                "python": s.get("python", {}).get("version"), "patches": self.applied, "pending": self.pending,
                "state": self.state_code, "refused_at_import": self.refused_at_import,
                "baseline": base or None, "command": self.command, "argv": list(agent.get("argv") or []),
                "development_mode_unsigned_bundles": bool(agent.get("development_mode_unsigned_bundles")),
                "trusted_keys": list(agent.get("trusted_keys") or []),
                "in_progress": {k: doing.get(k) for k in ("action", "patch", "since")} if doing else None,
                **({"error": self.error} if self.error else {})}


@dataclass
class Service:
    label: str                     # the name, or "tree of PID"
    name: str | None               # set when found by name
    root: int | None               # set when found as a tree
    members: list[Member]          # masters before their workers, depth first
    # every process under the service when it was found, with an agent or not:
    # whatever is under it later and not in here started meanwhile
    seen: set = field(default_factory=set)

    @property
    def pids(self) -> list[int]:
        return [m.pid for m in self.members]

    def get(self, pid: int) -> Member | None:
        return next((m for m in self.members if m.pid == pid), None)

    @property
    def workers(self) -> list[Member]:
        return [m for m in self.members if m.serves]

    @property
    def masters(self) -> list[Member]:
        return [m for m in self.members if not m.serves]


class NoSuchService(Exception):
    pass


# ---------------------------------------------------------------- discovery

def _statuses(pids) -> dict[int, fanout.Outcome]:
    return fanout.request_all(pids, "status", wait=STATUS_WAIT)


def _member(pid: int, outcome: fanout.Outcome) -> Member | None:
    if outcome.ok:
        status = outcome.result
        return Member(pid, status, command=" ".join(status["agent"].get("argv") or []))
    import psutil
    try:
        command = " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return None  # gone meanwhile
    return Member(pid, None, error=outcome.describe(), command=command)


def _ppids() -> dict[int, int]:
    """{pid: parent pid} of every process, from one pass over /proc (psutil
    costs ~20x more per process here: this runs on every service command)."""
    out = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as fh:
                    stat = fh.read()
                # "pid (comm) state ppid ...": comm may hold spaces and parentheses
                out[int(entry.name)] = int(stat[stat.rindex(b")") + 2:].split(None, 2)[1])
            except (OSError, ValueError, IndexError):
                continue  # gone meanwhile
    return out


def _ancestors(pid: int, ppids: dict) -> list[int]:
    out = []
    while (pid := ppids.get(pid, 0)) > 1 and pid not in out:
        out.append(pid)
    return out


def _descendants(roots, ppids: dict) -> set[int]:
    children: dict[int, list] = {}
    for pid, ppid in ppids.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = set(), list(roots)
    while todo:
        for c in children.get(todo.pop(), ()):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def _arrange(members: list[Member], ppids: dict | None = None) -> list[Member]:
    """Set parent, role and depth among `members`; return them depth first
    (each master followed by its workers), roots and siblings by PID."""
    ppids = _ppids() if ppids is None else ppids
    by_pid = {m.pid: m for m in members}
    for m in members:
        m.parent, m.children, m.role = None, [], "worker"
    for m in members:
        m.parent = next((a for a in _ancestors(m.pid, ppids) if a in by_pid), None)
    for m in members:
        if m.parent is not None:
            by_pid[m.parent].children.append(m)
            by_pid[m.parent].role = "master"
    ordered = []

    def walk(m, depth):
        m.depth = depth
        ordered.append(m)
        for c in sorted(m.children, key=lambda c: c.pid):
            walk(c, depth + 1)
    for m in sorted((m for m in members if m.parent is None), key=lambda m: m.pid):
        walk(m, 0)
    return ordered


def _with_agents(pids) -> list[int]:
    from .client import live_agents
    live = set(live_agents())
    return [p for p in pids if p in live]


def by_name(name: str) -> Service:
    from .client import live_agents
    found = [m for pid, o in _statuses(live_agents()).items() if (m := _member(pid, o))]
    members = [m for m in found if m.name == name]
    if not members:
        raise NoSuchService(f"no live agent belongs to a service named {name!r} (see `livepatch ps`)")
    ppids = _ppids()
    pids = [m.pid for m in members]
    # an agent that does not answer cannot say its name: it is counted in (as
    # not answering) when it is the parent or child of a member, never left out
    near = set(pids) | _descendants(pids, ppids) | {ppids.get(p) for p in pids}
    members += [m for m in found if not m.answering and m.pid in near]
    pids = [m.pid for m in members]
    return Service(name, name, None, _arrange(members, ppids), seen={*pids, *_descendants(pids, ppids)})


def by_tree(pid: int) -> Service:
    import psutil
    if not psutil.pid_exists(pid):
        raise NoSuchService(f"no process with PID {pid}")
    ppids = _ppids()
    under = {pid, *_descendants([pid], ppids)}
    members = [m for p, o in _statuses(_with_agents(sorted(under))).items() if (m := _member(p, o))]
    if not members:
        raise NoSuchService(f"neither process {pid} nor any of its descendants has a livepatch agent")
    return Service(f"tree of {pid}", None, pid, _arrange(members, ppids), seen=under)


def find(target: str, tree: bool) -> Service:
    """A service as the CLI names it: a PID with --tree, else a name."""
    if target.isdigit():
        return by_tree(int(target))
    if tree:
        raise NoSuchService(f"--tree needs a PID, not {target!r}")
    return by_name(target)


def rediscover(service: Service, ask=None) -> tuple[Service, list[Member]]:
    """The service as it is now, and the members that were not in it
    before: processes started since it was found, under one of its members
    (forked or spawned workers), which get a moment to start listening.
    `ask`: the known members whose status is asked again (default: all);
    the others keep the status they had, if they are still alive."""
    from .client import AgentUnavailable, socket_for
    known = set(service.pids)
    roots = [service.root] if service.root is not None else service.pids
    ppids = _ppids()
    under = _descendants(roots, ppids)
    fresh = under - service.seen
    deadline = time.monotonic() + NEWCOMER_WAIT
    waiting, listening = set(fresh), set()
    # forked just before the service was looked at, its agent listening only
    # since (a worker replacing a recycled one): a newcomer too, not waited for
    for d in sorted((under & service.seen) - known):
        try:
            if socket_for(d) is not None:
                listening.add(d)
        except AgentUnavailable:  # exited
            pass
    while waiting:
        exited = False
        for d in sorted(waiting):
            try:
                if socket_for(d) is not None:
                    listening.add(d)
                    waiting.discard(d)
            except AgentUnavailable:  # exited
                waiting.discard(d)
                exited = True
        if exited and time.monotonic() < deadline:
            # one that exited before it listened (a worker recycled young) may
            # have been replaced already: its successor is a newcomer too
            ppids = _ppids()
            new = _descendants(roots, ppids) - service.seen - fresh - known
            fresh |= new
            waiting |= new
        if not waiting or time.monotonic() >= deadline:
            break
        time.sleep(0.02)
    asked = known if ask is None else known & set(ask)
    members = [m for p, o in _statuses(sorted(asked | listening)).items() if (m := _member(p, o))]
    members += [m for m in service.members if m.pid not in asked and m.pid in ppids]
    # a newcomer listening under another name is not part of a service found
    # by name; one that does not answer cannot say its name, and is counted in
    # (it was forked or spawned under a member, as by_name counts them)
    members = [m for m in members if m.pid in known or service.name is None or not m.answering
               or m.name == service.name]
    if listening:
        ppids = _ppids()
    now = Service(service.label, service.name, service.root, _arrange(members, ppids), seen=service.seen | fresh)
    return now, [m for m in now.members if m.pid not in known]


def everything() -> list[Service]:
    """Every process with an agent socket, grouped into services by name;
    a process that does not answer joins its nearest ancestor's service."""
    from .client import live_agents
    members = [m for pid, o in _statuses(live_agents()).items() if (m := _member(pid, o))]
    ppids = _ppids()
    names = {m.pid: m.name for m in members if m.name is not None}
    groups: dict[str, list[Member]] = {}
    for m in members:
        name = m.name or next((names[a] for a in _ancestors(m.pid, ppids) if a in names), None)
        groups.setdefault(name or "(not answering)", []).append(m)
    return [Service(name, name, None, _arrange(ms, ppids)) for name, ms in sorted(groups.items())]


def is_pid(target: str) -> bool:
    return target.isdigit() and int(target) > 0 and int(target) <= 2**31

