"""What the services of this host have been through, read from their state
directories (agent/state.py) rather than from running agents, so that it
covers restarts and services that are not running: `livepatch history
[SERVICE | --all] --since 30d` across services, and `livepatch installed
[SERVICE | --all]`, the patches in effect per service in the spirit of
Windows' Get-HotFix (id, classification, references, installed at, by whom
or by which policy)."""

from __future__ import annotations

import datetime
import json
import os
import re

from .cli import EXIT_NO_AGENT, EXIT_USAGE, CliError, _emit, table

_SINCE = re.compile(r"(\d+(?:\.\d+)?)\s*(m|h|d|w)")
_UNIT = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def since_seconds(text: str) -> float:
    m = _SINCE.fullmatch(text.strip()) if isinstance(text, str) else None
    if not m:
        raise CliError(f"--since must be an age such as 30d, 12h, 90m or 2w, got {str(text)[:40]!r}", EXIT_USAGE)
    return float(m.group(1)) * _UNIT[m.group(2)]


def state_root(args) -> str:
    from .agent.state_dir import default_root
    return os.path.abspath(getattr(args, "state_dir", None) or os.environ.get("LIVEPATCH_STATE_DIR") or default_root())


def service_states(args):
    """[(name, State)] for the named service, or every service under the root with --all."""
    from .agent.state import State
    from .agent.state_dir import UnsafeState, location, validate_name
    root = state_root(args)
    if getattr(args, "all", False):
        try:
            names = sorted(n for n in os.listdir(root) if os.path.isdir(os.path.join(root, n)))
        except FileNotFoundError:
            names = []
    else:
        try:
            names = [validate_name(args.target)]
        except UnsafeState as exc:
            raise CliError(str(exc), EXIT_USAGE) from None
    out = []
    for name in names:
        try:
            path = location(name, root)
        except UnsafeState:
            continue  # not a service's directory
        if not os.path.isdir(path):
            if not getattr(args, "all", False):
                raise CliError(f"service {name} has no state directory under {root} (nothing was ever applied to it "
                               "there; give --state-dir DIR if it keeps its state elsewhere)", EXIT_NO_AGENT)
            continue
        try:
            out.append((name, State(path)))
        except UnsafeState as exc:
            raise CliError(f"not reading {path}: {exc}") from None
    return out


def _when(entry) -> float | None:
    try:
        return datetime.datetime.fromisoformat(str(entry.get("time") or entry.get("applied_at"))).timestamp()
    except (TypeError, ValueError):
        return None


def history(args):
    import time
    _check_target(args)
    cutoff = time.time() - since_seconds(args.since or "30d")
    events = []
    states = service_states(args)
    for name, state in states:
        for e in state.history():
            when = _when(e)
            if when is not None and when >= cutoff:
                events.append({"service": name, **e})
    events.sort(key=lambda e: (_when(e), e["service"]))
    data = {"services": [n for n, _ in states], "since": args.since or "30d", "state_dir": state_root(args),
            "history": events}
    if not getattr(args, "all", False):
        data["service"] = states[0][0]

    def human(d):
        rows = [{"time": e.get("time", ""), "service": e["service"], "pid": e.get("pid", ""), "action": e.get("action", ""),
                 "patch": e.get("patch", ""), "outcome": e.get("outcome", ""), "by": _by_entry(e),
                 "reason": (e.get("reason") or "").splitlines()[0][:60] if e.get("reason") else ""}
                for e in d["history"]]
        return table(rows, ["time", "service", "pid", "action", "patch", "outcome", "by", "reason"])
    _emit(args, data, human)


def _by_entry(e: dict) -> str:
    if e.get("policy"):
        return e["policy"]
    peer = e.get("peer") or {}
    if peer.get("uid") is not None:
        return f"{_user(peer['uid'])} (pid {peer.get('pid')})"
    return "at start" if e.get("action") in ("reapply", "import") else ""


def _user(uid) -> str:
    import pwd
    try:
        return f"{pwd.getpwuid(int(uid)).pw_name} (uid {uid})"
    except (KeyError, ValueError, TypeError):
        return f"uid {uid}"


def _manifest(state, rec) -> dict:
    from .bundle import read
    try:
        return read(state.read_bundle(rec), None, allow_unsigned=True).manifest
    except Exception:  # the record stands; its details come from the record alone
        return {}


def installed(args):
    _check_target(args)
    rows = []
    for name, state in service_states(args):
        entries = state.history()
        for rec in state.records():
            manifest = _manifest(state, rec)
            # the apply that put it in effect, and a policy that asked for it
            applies = [e for e in entries if e.get("patch") == rec["id"] and e.get("action") == "apply"
                       and e.get("outcome") == "ok"]
            policy = [e for e in entries if e.get("patch") == rec["id"] and e.get("policy")
                      and e.get("action") == "install"]
            by = policy[-1]["policy"] if policy else _by_entry(applies[-1]) if applies else f"pid {rec.get('pid')}"
            rows.append({"service": name, "id": rec["id"], "classification": rec.get("classification"),
                         "title": rec.get("title") or manifest.get("title") or "",
                         "references": list(manifest.get("references") or ()),
                         "baseline": " ".join(str(v) for v in (rec.get("baseline") or {}).values()),
                         "installed_at": rec.get("applied_at"), "by": by, "signed_by": rec.get("signed_by")})
    data = {"state_dir": state_root(args), "installed": rows}

    def human(d):
        return table([{**r, "references": ",".join(r["references"]) or "-"} for r in d["installed"]],
                     ["service", "id", "classification", "references", "installed_at", "by"])
    _emit(args, data, human)


def add_history_arguments(p) -> None:
    p.add_argument("--all", action="store_true", help="every service with a state directory (read from disk)")
    p.add_argument("--since", metavar="AGE", help="only entries newer than AGE (30d, 12h, 90m, 2w; default 30d); "
                                                  "read from the state directories, across restarts")
    p.add_argument("--state-dir", metavar="DIR", help="the services' state root (default as for `livepatch run`)")


def add_commands(command) -> None:
    p = command("installed", installed, "list the patches in effect per service: id, classification, references, "
                                        "installed at, by whom or which policy")
    p.add_argument("target", nargs="?", metavar="SERVICE")
    p.add_argument("--all", action="store_true", help="every service with a state directory")
    p.add_argument("--state-dir", metavar="DIR", help="the services' state root (default as for `livepatch run`)")


def _check_target(args) -> None:
    if bool(args.target) == bool(args.all):
        raise CliError("name a SERVICE or give --all", EXIT_USAGE)


def wants_persisted(args) -> bool:
    """`livepatch history` reads the state directories with --all, --since
    or --state-dir (a PID or a service without them asks the agents)."""
    if args.target is None and not args.all:
        raise CliError("name a SERVICE or PID, or give --all", EXIT_USAGE)
    if args.target is not None and args.target.isdigit() and (args.all or args.since or args.state_dir):
        raise CliError("--all, --since and --state-dir read services' state directories: name a SERVICE, not a PID",
                       EXIT_USAGE)
    return bool(args.all or args.since or args.state_dir)
