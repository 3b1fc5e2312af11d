"""Install now: the pending catalog entries of each service, chosen by
classification and include/exclude lists, in dependency and sequence
order, each through the process-tree apply (`livepatch apply SERVICE
BUNDLE --json`, livepatch/cli_tree.py: every process checks first, all
commit or none, newcomers included, back-out on a refusal).

With `canary`, each bundle goes to one serving process first
(`livepatch apply PID BUNDLE`), `on_event` is told, and the rest of the
service follows only if it does not answer False."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

from .assess import assess

EXIT_OK, EXIT_ERROR, EXIT_REFUSED, EXIT_VERIFY, EXIT_NO_AGENT, EXIT_PARTIAL = 0, 1, 3, 4, 5, 6
APPLY_TIMEOUT = 600.0
INSTALLABLE = ("pending", "pending-import")


@dataclass
class Outcome:
    patch_id: str
    outcome: str                   # "installed", "refused", "skipped"
    reason: str = ""
    processes: dict = field(default_factory=dict)  # pid -> that process's outcome in the apply
    exit_code: int = 0             # of the apply, when one ran

    def to_json(self) -> dict:
        return {"id": self.patch_id, "outcome": self.outcome, "reason": self.reason,
                "processes": {str(k): v for k, v in self.processes.items()}, "exit_code": self.exit_code}


@dataclass
class ServiceResult:
    service: str
    outcomes: list = field(default_factory=list)

    def to_json(self) -> dict:
        return {"service": self.service, "bundles": [o.to_json() for o in self.outcomes]}


@dataclass
class InstallResult:
    services: list = field(default_factory=list)
    assessments: list = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0: nothing refused; 4: a bundle did not verify; 6: a service left
        partly patched; 3: refused (nothing left changed by that bundle)."""
        codes = {o.exit_code for s in self.services for o in s.outcomes if o.outcome == "refused"}
        for code in (EXIT_VERIFY, EXIT_PARTIAL):
            if code in codes:
                return code
        return EXIT_REFUSED if codes else EXIT_OK

    def to_json(self) -> dict:
        return {"exit_code": self.exit_code, "services": [s.to_json() for s in self.services]}


def order(entries) -> list:
    """Entries in dependency order (what an entry requires first), else by
    baseline, sequence and id."""
    by_id = {e.id: e for e in entries}
    done, out = set(), []

    def visit(e, path=()):
        if e.id in done or e.id in path:
            return
        for r in e.requires:
            if r in by_id:
                visit(by_id[r], (*path, e.id))
        done.add(e.id)
        out.append(e)
    for e in sorted(entries, key=lambda e: (e.distribution, e.version, e.sequence, e.id)):
        visit(e)
    return out


def _selected(entry, classifications, include, exclude) -> str:
    """Why `entry` is not to be installed ('' if it is)."""
    if entry.id in exclude:
        return "excluded (--exclude)"
    if include and entry.id not in include:
        return "not included (--include)"
    if classifications and entry.classification not in classifications and entry.id not in include:
        return f"classification {entry.classification} not selected ({', '.join(classifications)})"
    return ""


def _apply(target: tuple, path: str) -> tuple[int, dict]:
    """Run the documented process-tree apply; (exit code, its JSON)."""
    cmd = [sys.executable, "-m", "livepatch", "apply", *target, path, "--json"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=APPLY_TIMEOUT)
    except subprocess.TimeoutExpired:
        return EXIT_ERROR, {"error": f"the apply did not finish within {APPLY_TIMEOUT:g}s"}
    try:
        data = json.loads(r.stdout)
    except ValueError:
        data = {"error": (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]}
        data["error"] = data["error"][0]
    return r.returncode, data if isinstance(data, dict) else {"processes": data}


def _processes(data: dict) -> dict:
    if "processes" in data and isinstance(data["processes"], list):
        return {p.get("pid"): p.get("outcome", "") for p in data["processes"]}
    if "patch_id" in data:  # one process
        return {"": "patched"}
    return {}


def _reason(code: int, data: dict) -> str:
    return str(data.get("summary") or data.get("error") or f"exit code {code}").splitlines()[0]


def install(repo, services, *, classifications=None, include=(), exclude=(), canary=False,
            on_event=None) -> InstallResult:
    """Install what assess finds pending in `services`; see the module
    docstring. `on_event(dict)` hears each step ("assessed", "canary",
    "installed", "refused", "skipped")."""
    from .repository import RepositoryError
    emit = on_event or (lambda event: None)
    include, exclude = set(include or ()), set(exclude or ())
    classifications = tuple(classifications or ())
    result = InstallResult()
    result.assessments = assess(repo, services)
    emit({"event": "assessed", "services": [a.service for a in result.assessments]})
    work = _private_workdir(repo)
    try:
        for sa in result.assessments:
            sr = ServiceResult(sa.service)
            result.services.append(sr)
            candidates = []
            for e in sa.entries:
                state = sa.state_of(e.id)
                if state == "needs-baseline" and not _selected(e, classifications, include, exclude):
                    sr.outcomes.append(Outcome(e.id, "skipped", "needs a new baseline: " + _any_reason(sa, e.id)))
                elif state == "not-applicable" and e.id in include:
                    sr.outcomes.append(Outcome(e.id, "refused", "not applicable: " + _any_reason(sa, e.id),
                                               exit_code=EXIT_REFUSED))
                    emit({"event": "refused", "service": sa.service, "patch": e.id, "reason": sr.outcomes[-1].reason})
                elif state in INSTALLABLE:
                    why = _selected(e, classifications, include, exclude)
                    if why:
                        sr.outcomes.append(Outcome(e.id, "skipped", why))
                    else:
                        candidates.append(e)
            installed = {e.id for e in sa.entries if sa.state_of(e.id) == "installed"}
            for e in order(candidates):
                missing = [r for r in e.requires if r not in installed]
                if missing:
                    sr.outcomes.append(Outcome(e.id, "skipped", f"requires {', '.join(missing)}, which is not installed"))
                    emit({"event": "skipped", "service": sa.service, "patch": e.id})
                    continue
                try:
                    data = repo.fetch(e)
                except RepositoryError as exc:
                    sr.outcomes.append(Outcome(e.id, "refused", str(exc),
                                               exit_code=EXIT_VERIFY if exc.verification else EXIT_ERROR))
                    emit({"event": "refused", "service": sa.service, "patch": e.id, "reason": str(exc)})
                    continue
                path = os.path.join(work, f"{e.id}.lpb")
                with open(path, "wb") as fh:
                    fh.write(data)
                outcome = _install_one(sa, e, path, canary, emit)
                sr.outcomes.append(outcome)
                if outcome.outcome == "installed":
                    installed.add(e.id)
    finally:
        for name in os.listdir(work):
            os.unlink(os.path.join(work, name))
        os.rmdir(work)
    return result


def _any_reason(sa, patch_id: str) -> str:
    return next((r[patch_id] for r in sa.reasons.values() if patch_id in r), "")


def _install_one(sa, e, path: str, canary: bool, emit) -> Outcome:
    processes = {}
    if canary:
        workers = [pid for pid, states in sa.processes.items()
                   if sa.roles.get(pid) == "worker" and states.get(e.id) in INSTALLABLE]
        if len(workers) > 1 or (workers and len(sa.processes) > 1):
            first = sorted(workers)[0]
            code, data = _apply((str(first),), path)
            if code != 0:
                out = Outcome(e.id, "refused", f"canary process {first}: {_reason(code, data)}", {first: "refused"}, code)
                emit({"event": "refused", "service": sa.service, "patch": e.id, "pids": [first], "reason": out.reason})
                return out
            processes[first] = "patched (canary)"
            if emit({"event": "canary", "service": sa.service, "patch": e.id, "pid": first}) is False:
                out = Outcome(e.id, "refused", f"stopped after the canary process {first}", processes, EXIT_PARTIAL)
                emit({"event": "refused", "service": sa.service, "patch": e.id, "reason": out.reason})
                return out
    code, data = _apply(sa.target, path)
    for pid, what in _processes(data).items():
        processes.setdefault(pid, what)
    if code == 0:
        emit({"event": "installed", "service": sa.service, "patch": e.id, "pids": sorted(p for p in processes if p)})
        return Outcome(e.id, "installed", _reason(code, data), processes, 0)
    if code == EXIT_NO_AGENT:
        emit({"event": "skipped", "service": sa.service, "patch": e.id})
        return Outcome(e.id, "skipped", f"the service is gone: {_reason(code, data)}", processes, code)
    emit({"event": "refused", "service": sa.service, "patch": e.id, "reason": _reason(code, data)})
    return Outcome(e.id, "refused", _reason(code, data), processes, code)


def _private_workdir(repo) -> str:
    from .repository import _private_dir
    return tempfile.mkdtemp(prefix="install-", dir=_private_dir(repo.cache_dir))
