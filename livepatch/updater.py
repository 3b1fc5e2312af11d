"""The updater: a host service that assesses the services on the machine
against a patch repository on a schedule, installs the configured
classifications by itself only inside a maintenance window, watches each
install's health, and rolls an unhealthy install back on every process.

One cycle (`Updater.tick`):
  1. assess when due (every `interval`): livepatch/assess.py;
  2. inside a window, for every service with a pending bundle of a
     configured classification and not held: install it
     (livepatch/install.py), one process first for services with more than
     one (canary), the rest after the canary stayed healthy; then observe
     the whole service (livepatch/health.py);
  3. a failed check rolls that bundle back everywhere it went (through
     `livepatch rollback`, with an authorisation signed by the configured
     operator key for security and critical fixes), writes why into the
     service's history, and holds the service: no further installs until
     `livepatch updater clear SERVICE`.
Every decision is one log line, and kept in the state file with the last
assessment, the next window, the results and the held services."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time

from . import health, windows

logger = logging.getLogger("livepatch.updater")
MAX_KEPT = 100          # decisions and results kept in the state file
ROLLBACK_TIMEOUT = 300.0
IDLE_WAKE = 60.0        # longest sleep: the clock may jump, a window may open


def iso(ts: float | None) -> str | None:
    return None if ts is None else windows.local_iso(ts)


class _Unhealthy(Exception):
    """Raised out of an install's event to stop the service's installs."""


class StateFile:
    """The updater's state (JSON), read and replaced under an flock, so the
    running updater and `livepatch updater clear` never lose each other's
    changes."""

    def __init__(self, path: str):
        self.path = path

    def read(self) -> dict:
        try:
            with open(self.path, "rb") as fh:
                data = json.loads(fh.read())
            return data if isinstance(data, dict) else {}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise OSError(f"cannot read the updater state {self.path}: {exc}") from None

    @contextlib.contextmanager
    def update(self):
        import fcntl
        os.makedirs(os.path.dirname(self.path) or ".", mode=0o700, exist_ok=True)
        fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            state = self.read()
            yield state
            tmp = f"{self.path}.tmp{os.getpid()}"
            with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600), "w") as fh:
                json.dump(state, fh, indent=1, sort_keys=True, default=str)
            os.replace(tmp, self.path)
        finally:
            os.close(fd)


class Updater:
    def __init__(self, config, *, clock=time.time, repository=None):
        self.config = config
        self.clock = clock
        self.state = StateFile(config.state_file)
        self._repo = repository
        self.next_assessment = None   # set by the first tick: assess at once
        self.pending: dict[str, list[str]] = {}  # service -> installable ids found by the last assessment

    # ------------------------------------------------------------ pieces
    def repository(self):
        if self._repo is None:
            from .repository import Repository
            self._repo = Repository(self.config.repository, trusted_keys=self.config.trusted_keys,
                                    cache_dir=self.config.cache_dir)
        return self._repo

    def decide(self, message: str, **fields) -> None:
        """One decision: a log line, and an entry in the state file."""
        logger.info("livepatch updater: %s", message)
        entry = {"at": iso(self.clock()), "message": message, **fields}
        with self.state.update() as s:
            s["decisions"] = (s.get("decisions") or [])[-(MAX_KEPT - 1):] + [entry]

    def services(self) -> list:
        """The services to look after, as they run now: the configured
        ones, or every named service on the host when none is configured."""
        from . import tree
        if not self.config.services:
            return [s for s in tree.everything() if s.name]
        found = []
        for name in self.config.services:
            try:
                found.append(tree.by_name(name))
            except tree.NoSuchService:
                self.decide(f"service {name} is not running: nothing to assess or install there", service=name)
        return found

    def held(self) -> dict:
        return dict(self.state.read().get("held") or {})

    def failed(self, service: str) -> set:
        """Bundles rolled back for failing this service's checks: never installed there by
        the updater again, unless an operator names them (install-now --include)."""
        return set((self.state.read().get("failed") or {}).get(service) or {})

    # ------------------------------------------------------------ assess
    def assess_now(self) -> dict:
        from .assess import assess
        from .install import INSTALLABLE
        from .repository import RepositoryError
        started = self.clock()
        try:
            services = self.services()
            repo = self.repository()
            repo.catalog(refresh=True)  # what the repository holds now, not what this object read before
            assessments = assess(repo, services)
        except (RepositoryError, OSError) as exc:
            result = {"at": iso(started), "ok": False, "error": str(exc).splitlines()[0]}
            self.decide(f"assessment failed, retrying in {self.config.interval:g}s: {result['error']}")
        else:
            offline = bool(getattr(repo.info, "offline", False))
            summary = {}
            self.pending = {}
            for sa in assessments:
                states = {e.id: sa.state_of(e.id) for e in sa.entries}
                failed = self.failed(sa.service)
                wanted = [e.id for e in sa.entries if states[e.id] in INSTALLABLE
                          and e.classification in self.config.classifications and e.id not in failed]
                self.pending[sa.service] = wanted
                summary[sa.service] = {"processes": len(sa.processes), "to_install": wanted,
                                       **{k: sorted(i for i, s in states.items() if s == k)
                                          for k in ("installed", "pending", "pending-import", "needs-baseline")}}
            result = {"at": iso(started), "ok": True, "offline": offline, "seconds": round(self.clock() - started, 3),
                      "services": summary}
            if offline:
                result["problem"] = getattr(repo.info, "problem", "")
            self.decide(f"assessed {len(assessments)} services" + (" from the cache (repository unreachable)" if offline else "")
                        + "; to install: " + (", ".join(f"{s}: {', '.join(ids)}" for s, ids in self.pending.items() if ids)
                                              or "nothing"))
        self.next_assessment = started + self.config.interval
        with self.state.update() as s:
            s["last_assessment"] = result
            s["next_assessment"] = iso(self.next_assessment)
        return result

    # ------------------------------------------------------------ install
    def install_now(self, *, classifications=None, include=(), exclude=(), reason="install now") -> list[dict]:
        """Install into every service not held; returns one result per bundle tried."""
        from . import tree
        classes = tuple(classifications or self.config.classifications)
        results = []
        held = self.held()
        for svc in self.services():
            if svc.name in held:
                self.decide(f"{svc.name}: held since {held[svc.name].get('since')} ({held[svc.name].get('reason')}); "
                            f"not installing until `livepatch updater clear {svc.name}`", service=svc.name)
                continue
            try:
                svc = tree.by_name(svc.name)  # as it runs now: it may have restarted since the assessment
            except tree.NoSuchService:
                self.decide(f"{svc.name}: gone before its install; trying again at the next cycle", service=svc.name)
                continue
            skip = set(exclude) | (self.failed(svc.name) - set(include))
            results += self._install_service(svc, classes, include, tuple(skip), reason)
        with self.state.update() as s:
            s["results"] = (s.get("results") or [])[-(MAX_KEPT - len(results)):] + results if results else s.get("results", [])
        return results

    def _install_service(self, svc, classes, include, exclude, reason) -> list[dict]:
        from .install import install
        from .repository import RepositoryError
        cfg = self.config.health(svc.name)
        canary = self.config.canary_for(svc.name) and len(svc.members) > 1
        results, current = [], {}

        def on_event(event):
            kind, patch = event.get("event"), event.get("patch")
            if kind == "canary":
                current.update(patch=patch, canary=event["pid"], installed_at=self.clock())
                self.decide(f"{svc.name}: {patch} installed in canary process {event['pid']}; observing it "
                            f"for {cfg.observe:g}s", service=svc.name, patch=patch)
                verdict = health.observe([event["pid"]], patch, cfg, log=self._note(svc.name))
                if not verdict.healthy:
                    self._unhealthy(svc, patch, verdict, (str(event["pid"]),), results, canary_pid=event["pid"])
                    raise _Unhealthy(patch)
                self.decide(f"{svc.name}: canary {event['pid']} healthy with {patch}; installing in the rest",
                            service=svc.name, patch=patch)
            elif kind == "installed":
                pids = self._answering(svc.name)
                self.decide(f"{svc.name}: {patch} installed in {len(event.get('pids') or pids)} processes; observing "
                            f"for {cfg.observe:g}s", service=svc.name, patch=patch)
                observed_at = self.clock()
                verdict = health.observe(pids, patch, cfg, log=self._note(svc.name))
                if not verdict.healthy:
                    self._unhealthy(svc, patch, verdict, (svc.name,), results)
                    raise _Unhealthy(patch)
                results.append({"at": iso(self.clock()), "service": svc.name, "patch": patch, "outcome": "installed",
                                "healthy": True, "reason": reason, "observed_s": round(self.clock() - observed_at, 3),
                                "health": verdict.to_json()})
                self._history(svc, patch, "install", "installed", f"{reason}; healthy for {cfg.observe:g}s")
                self.decide(f"{svc.name}: {patch} healthy after {cfg.observe:g}s: kept", service=svc.name, patch=patch)
            elif kind in ("refused", "skipped"):
                self.decide(f"{svc.name}: {patch} {kind}" + (f": {event.get('reason')}" if event.get("reason") else ""),
                            service=svc.name, patch=patch)
            return None

        try:
            outcome = install(self.repository(), [svc], classifications=classes, include=include, exclude=exclude,
                              canary=canary, on_event=on_event)
        except _Unhealthy:
            return results
        except (RepositoryError, OSError) as exc:
            self.decide(f"{svc.name}: install failed, nothing changed by it: {str(exc).splitlines()[0]}", service=svc.name)
            return results
        for sr in outcome.services:
            for o in sr.outcomes:
                if o.outcome == "refused":
                    results.append({"at": iso(self.clock()), "service": svc.name, "patch": o.patch_id,
                                    "outcome": "refused", "reason": o.reason})
        return results

    def _answering(self, name: str) -> list[int]:
        from . import tree
        try:
            return [m.pid for m in tree.by_name(name).members if m.answering]
        except tree.NoSuchService:
            return []

    def _note(self, service):
        return lambda message: self.decide(f"{service}: {message}", service=service)

    def _unhealthy(self, svc, patch, verdict, target, results, canary_pid=None) -> None:
        where = f"canary process {canary_pid}" if canary_pid else "every process"
        self.decide(f"{svc.name}: {patch} UNHEALTHY: {verdict.reason}; rolling it back in {where}",
                    service=svc.name, patch=patch)
        rolled, detail = self.rollback(target, patch)
        if canary_pid is not None and not rolled:
            # the canary may have gone (its process exited): make sure of the whole service
            rolled, more = self.rollback((svc.name,), patch, quiet_if_absent=True)
            detail += "; " + more
        outcome = "rolled back" if rolled else "rollback failed"
        reason = f"health check failed after install: {verdict.reason}; {outcome} ({detail})"
        self._history(svc, patch, "health-rollback", outcome, reason)
        with self.state.update() as s:
            s.setdefault("held", {})[svc.name] = {"since": iso(self.clock()), "patch": patch, "reason": verdict.reason,
                                                 "rollback": outcome}
            s.setdefault("failed", {}).setdefault(svc.name, {})[patch] = verdict.reason
        results.append({"at": iso(self.clock()), "service": svc.name, "patch": patch, "outcome": outcome,
                        "healthy": False, "reason": verdict.reason, "health": verdict.to_json()})
        self.decide(f"{svc.name}: {patch} {outcome}; the service is held: no further installs until "
                    f"`livepatch updater clear {svc.name}`", service=svc.name, patch=patch)

    # ------------------------------------------------------------ rollback
    def rollback(self, target: tuple, patch_id: str, quiet_if_absent=False) -> tuple[bool, str]:
        """`livepatch rollback TARGET PATCH_ID`, with an authorisation when
        the operator key is configured. (done, one line)."""
        with tempfile.TemporaryDirectory(prefix="livepatch-updater-") as tmp:
            cmd = [sys.executable, "-m", "livepatch", "rollback", *target, patch_id, "--json"]
            auth = self._authorization(patch_id, tmp)
            if auth:
                cmd += ["--authorization", auth]
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=ROLLBACK_TIMEOUT)
            except subprocess.TimeoutExpired:
                return False, f"the rollback did not finish within {ROLLBACK_TIMEOUT:g}s"
        try:
            data = json.loads(r.stdout)
        except ValueError:
            data = {}
        if not isinstance(data, dict):  # one process answers a list of rollbacks
            data = {"summary": "rolled back in process " + target[0]} if r.returncode == 0 else {}
        summary = str(data.get("summary") or data.get("error") or (r.stderr or r.stdout).strip()[-200:])
        if r.returncode == 0 or (quiet_if_absent and "nothing to roll back" in r.stdout):
            return True, summary.splitlines()[0] if summary else "rolled back"
        return False, f"exit {r.returncode}: {summary.splitlines()[0] if summary else 'no output'}"

    def _authorization(self, patch_id: str, directory: str) -> str | None:
        if not self.config.operator_key:
            return None
        from .authorization import make
        from .bundle import read
        from .signing import load_private
        try:
            entry = self.repository().entry(patch_id)
            if entry is None or entry.classification not in ("security", "critical"):
                return None
            bundle = read(self.repository().fetch(entry), self.repository().trusted)
            doc = make(bundle, load_private(self.config.operator_key), 3600)
        except Exception as exc:  # the rollback is still tried: root, or a bugfix, needs none
            self.decide(f"cannot sign the rollback authorisation for {patch_id}: {type(exc).__name__}: {exc}")
            return None
        path = os.path.join(directory, f"{patch_id}.rollback")
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600), "wb") as fh:
            fh.write(doc + b"\n")
        return path

    # ------------------------------------------------------------ history
    def _history(self, svc, patch, action, outcome, reason) -> None:
        """An entry in the service's own persisted history (history.jsonl)."""
        from .agent.state import State
        from .agent.state_dir import UnsafeState
        directory = next((m.status.get("state_dir") for m in svc.members if m.answering and m.status.get("state_dir")),
                         None)
        if directory is None:
            self.decide(f"{svc.name}: keeps no state directory; {action} of {patch} is recorded here only")
            return
        from .history import now_iso
        entry = {"time": now_iso(self.clock()), "pid": os.getpid(), "action": action, "patch": patch,
                 "classification": self._classification(patch), "outcome": outcome, "reason": reason,
                 "policy": f"updater {self.config.path}"}
        try:
            State(directory).append(entry)
        except (OSError, UnsafeState) as exc:
            self.decide(f"{svc.name}: cannot write its history in {directory}: {exc}")

    def _classification(self, patch_id):
        with contextlib.suppress(Exception):
            entry = self.repository().entry(patch_id)
            return entry.classification if entry else None
        return None

    # ------------------------------------------------------------ the loop
    def tick(self) -> float:
        """One cycle; returns how long to sleep before the next."""
        now = self.clock()
        if self.next_assessment is None or now >= self.next_assessment:
            self.assess_now()
        now = self.clock()
        schedule = self.config.schedule
        open_until = schedule.open_until(now)
        held = self.held()
        todo = {s: ids for s, ids in self.pending.items() if ids and s not in held}
        waiting_held = tuple(sorted((s, tuple(ids)) for s, ids in self.pending.items() if ids and s in held))
        if waiting_held and getattr(self, "_held_said", None) != waiting_held:  # once per change
            self._held_said = waiting_held
            for s, ids in waiting_held:
                self.decide(f"{s}: held since {held[s].get('since')} ({held[s].get('reason')}); not installing "
                            f"{', '.join(ids)} until `livepatch updater clear {s}`", service=s)
        if todo and open_until is not None:
            self.decide(f"window open until {iso(open_until)}: installing " +
                        "; ".join(f"{s}: {', '.join(ids)}" for s, ids in todo.items()))
            self.install_now(reason=f"classifications {', '.join(self.config.classifications)} "
                                    f"in window {', '.join(schedule.describe())}")
            self.pending = {}
            self.next_assessment = self.clock()  # see at once what is left
        elif todo:
            nxt = schedule.next_open(now)
            key = (tuple(sorted((s, tuple(i)) for s, i in todo.items())), nxt)
            if getattr(self, "_waiting", None) != key:  # said once per change, not every cycle
                self._waiting = key
                self.decide("outside the maintenance windows: waiting" + (f" until {iso(nxt)}" if nxt else
                            " (no window is configured: only `livepatch updater install-now` installs)")
                            + " to install " + "; ".join(f"{s}: {', '.join(ids)}" for s, ids in todo.items()))
        nxt = schedule.next_open(self.clock())
        with self.state.update() as s:
            s.update(next_window=iso(nxt), window_open_until=iso(schedule.open_until(self.clock())),
                     windows=schedule.describe(), pid=os.getpid(), config=self.config.path,
                     classifications=list(self.config.classifications), interval_s=self.config.interval)
        wake = self.next_assessment - self.clock()
        if todo and nxt is not None:
            wake = min(wake, nxt - self.clock())
        return max(0.0, min(wake, IDLE_WAKE))

    def run(self, stop: threading.Event) -> None:
        self.decide(f"started (config {self.config.path}, repository {self.config.repository}, every "
                    f"{self.config.interval:g}s, installs {', '.join(self.config.classifications)} in "
                    f"{', '.join(self.config.schedule.describe()) or 'no window'})")
        with self.state.update() as s:
            s["started_at"] = iso(self.clock())
        while not stop.is_set():
            try:
                wait = self.tick()
            except Exception as exc:  # one bad cycle must not stop the service
                logger.exception("livepatch updater: cycle failed")
                self.decide(f"cycle failed: {type(exc).__name__}: {exc}; trying again in {self.config.interval:g}s")
                self.next_assessment = self.clock() + self.config.interval
                wait = self.config.interval
            stop.wait(wait)
        self.decide("stopped")
