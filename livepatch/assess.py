"""Assess: for every process of every service, the state of each catalog
entry of a repository (livepatch/repository.py) in it.

States:
  installed       applied in the process
  pending         would apply now
  pending-import  would apply, but none of its targets is imported yet:
                  it is committed when they are
  superseded      a later cumulative bundle, or a later version of the same
                  lineage, in the catalog or applied, replaces it
  not-applicable  built for another distribution or version than the
                  process runs, or its baseline code does not match
  needs-baseline  the fix exists only as a release of what the process runs:
                  upgrade and restart

What a process runs comes from its agent (agent/baseline.py: the declared
or installed release, and the loaded distributions), never from a bundle;
whether a bundle applies is the agent's own check (verify, baseline
fingerprints, ordering), which changes nothing."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

from . import fanout
from .catalog import CatalogEntry

STATES = ("installed", "pending", "pending-import", "superseded", "not-applicable", "needs-baseline")
STATUS_WAIT = 30.0
ASSESS_WAIT = 60.0
MAX_BUNDLES_PER_REQUEST = 64  # what the agent's assess takes at once


@dataclass
class ServiceAssessment:
    service: str
    processes: dict = field(default_factory=dict)   # pid -> {bundle id: state}
    reasons: dict = field(default_factory=dict)     # pid -> {bundle id: why, for states other than installed/pending}
    roles: dict = field(default_factory=dict)       # pid -> "master" | "worker"
    runs: dict = field(default_factory=dict)        # pid -> {"baseline": ..., "distributions": ...}
    errors: dict = field(default_factory=dict)      # pid -> why it could not be assessed
    entries: list = field(default_factory=list)     # the catalog entries assessed
    assessed_at: str = ""
    target: tuple = ()                              # how the CLI names the service: (name,) or (PID, "--tree")

    def state_of(self, patch_id: str) -> str:
        """The entry's state for the service: the most actionable of its processes'."""
        states = {p.get(patch_id) for p in self.processes.values()} - {None}
        for s in ("pending", "pending-import", "needs-baseline", "installed", "superseded", "not-applicable"):
            if s in states:
                return s
        return "not-applicable"

    def to_json(self) -> dict:
        return {"service": self.service, "assessed_at": self.assessed_at,
                "processes": {str(pid): dict(states) for pid, states in self.processes.items()},
                "reasons": {str(pid): dict(r) for pid, r in self.reasons.items() if r},
                "roles": {str(pid): role for pid, role in self.roles.items()},
                "runs": {str(pid): r for pid, r in self.runs.items()},
                "errors": {str(pid): e for pid, e in self.errors.items()},
                "summary": {e.id: self.state_of(e.id) for e in self.entries},
                "entries": [e.to_json() for e in self.entries]}


def _normal(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def runs_version(runs: dict, distribution: str):
    """(known, version) of `distribution` in a process: the application
    baseline, a loaded distribution, or one installed for it and not
    imported yet; (False, None) if it has none of them."""
    base = runs.get("baseline") or {}
    if base.get("name") and _normal(base["name"]) == _normal(distribution):
        return True, base.get("version")
    for group in ("distributions", "installed"):
        for name, version in (runs.get(group) or {}).items():
            if version is not None and _normal(name) == _normal(distribution):
                return True, version
    return False, None


def superseded_by(entry: CatalogEntry, others) -> CatalogEntry | None:
    """A later bundle on the same baseline that replaces `entry`: cumulative,
    or the same lineage with a higher sequence."""
    for o in others:
        if (o.kind == "hotpatch" and o.id != entry.id and o.baseline == entry.baseline and o.sequence > entry.sequence
                and (o.cumulative or (entry.lineage is not None and o.lineage == entry.lineage))):
            return o
    return None


def _classify(entry: CatalogEntry, runs: dict, applied: list, verdict: dict | None, catalog) -> tuple[str, str]:
    if entry.kind == "baseline":
        known, version = runs_version(runs, entry.distribution)
        if known and version == entry.version:
            fixed = f" {entry.fixed_in}" if entry.fixed_in else " a later release"
            return "needs-baseline", f"fixed only in {entry.distribution}{fixed}: upgrade and restart"
        return "not-applicable", (f"runs {entry.distribution} {version}" if known else
                                  f"does not run {entry.distribution}")
    if entry.id in applied:
        return "installed", ""
    later = superseded_by(entry, [e for e in catalog if e.id != entry.id])
    if later is not None:
        return "superseded", f"replaced by {later.id}"
    known, version = runs_version(runs, entry.distribution)
    if not known:
        return "not-applicable", (f"built for {entry.distribution} {entry.version}; the process does not run "
                                  f"{entry.distribution} and has none installed")
    if version is not None and version != entry.version:
        return "not-applicable", f"built for {entry.distribution} {entry.version}; the process runs {entry.distribution} {version}"
    if verdict is None:
        return "not-applicable", "not checked"
    v = verdict.get("verdict")
    if v == "already-applied":
        return "installed", ""
    if v == "refused":
        error = verdict.get("error") or ""
        message = verdict.get("message") or ""
        if error == "Downgrade":
            return "superseded", message
        if any(p.get("category") == "requires" for p in verdict.get("problems") or ()):
            return "pending", message  # installed after what it requires
        return "not-applicable", f"{error}: {message}"
    if verdict.get("pending") and not verdict.get("targets"):
        return "pending-import", "its modules are not imported yet: committed when they are"
    return "pending", ""


def _statuses(pids, names=()) -> dict:
    fields = {"installed": sorted(set(names))[:MAX_BUNDLES_PER_REQUEST]} if names else {}
    return fanout.request_all(pids, "status", wait=STATUS_WAIT, distributions=True, **fields)


def _verdicts(pids, blobs: list[str]) -> dict[int, list]:
    """{pid: [verdict per blob]} from the agents' own checks (None where
    a process did not answer)."""
    out = {pid: [] for pid in pids}
    for start in range(0, len(blobs), MAX_BUNDLES_PER_REQUEST):
        chunk = blobs[start:start + MAX_BUNDLES_PER_REQUEST]
        for pid, o in fanout.request_all(pids, "assess", wait=ASSESS_WAIT, bundles=chunk).items():
            out[pid] += o.result if o.ok else [None] * len(chunk)
    return out


def target_of(service) -> tuple:
    return (service.name,) if service.name is not None else (str(service.root), "--tree")


def assess(repo, services) -> list[ServiceAssessment]:
    """The state of every catalog entry of `repo` in every process of
    `services` (livepatch.tree.Service). Bundles are fetched and verified
    only where a process runs their baseline. Raises RepositoryError when
    the catalog cannot be had or does not verify."""
    from .client import encode_bundle
    catalog = repo.catalog(refresh=True)  # a long-lived Repository (the updater's) sees new entries
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out = []
    blobs: dict[str, str] = {}
    for svc in services:
        sa = ServiceAssessment(svc.label, entries=list(catalog), assessed_at=now, target=target_of(svc))
        pids = [m.pid for m in svc.members if m.answering]
        for m in svc.members:
            sa.roles[m.pid] = m.role
            if not m.answering:
                sa.errors[m.pid] = m.error or "not answering"
        statuses = _statuses(pids, [e.distribution for e in catalog])
        live = []
        for pid, o in statuses.items():
            if o.ok:
                sa.runs[pid] = {"baseline": o.result.get("baseline"), "distributions": o.result.get("distributions") or {},
                                "installed": o.result.get("installed") or {}}
                live.append(pid)
            else:
                sa.errors[pid] = o.describe()
        # the bundles some process of this service runs the baseline of
        # (and that not every one of them has applied already)
        applied = {p: {a["id"] for a in statuses[p].result.get("applied", [])} for p in live}
        wanted = [e for e in catalog if e.kind == "hotpatch" and superseded_by(e, catalog) is None
                  and any(runs_version(sa.runs[p], e.distribution)[0] and e.id not in applied[p] for p in live)]
        for e in wanted:
            if e.id not in blobs:
                blobs[e.id] = encode_bundle(repo.fetch(e))
        verdicts = _verdicts(live, [blobs[e.id] for e in wanted]) if wanted else {p: [] for p in live}
        for pid in live:
            status = statuses[pid].result
            applied = [p["id"] for p in status.get("applied", [])]
            by_id = dict(zip((e.id for e in wanted), verdicts.get(pid) or []))
            states, reasons = {}, {}
            for e in catalog:
                state, why = _classify(e, sa.runs[pid], applied, by_id.get(e.id), catalog)
                states[e.id] = state
                if why:
                    reasons[e.id] = why
            sa.processes[pid], sa.reasons[pid] = states, reasons
        out.append(sa)
    _record(repo, out)
    return out


def _record(repo, assessments) -> None:
    """The time and result of the last assessment, next to the repository's
    cache (`last-assessment.json`)."""
    from .repository import _write_atomic
    try:
        path = repo._cache("last-assessment.json")
        _write_atomic(path, json.dumps({"repository": repo.location, "assessed_at": assessments[0].assessed_at
                                        if assessments else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                        "services": [a.to_json() for a in assessments]}, indent=1).encode())
    except OSError:
        pass  # the assessment stands; only its record is lost


def last_assessment(repo) -> dict | None:
    try:
        with open(os.path.join(repo.cache_dir, "last-assessment.json"), "rb") as fh:
            return json.loads(fh.read())
    except (OSError, ValueError):
        return None
