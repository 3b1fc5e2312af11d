"""Health checks of a service after an install: each configured HTTP URL
must answer 2xx, each command must exit 0, and the agents' own signal
(exceptions propagating out of the patched functions, agent/patched_errors.py)
must stay within the allowed count, for the whole observation time.

`observe` runs the checks in rounds until the observation time is over or
one fails; the first failure ends it with one line saying which check and
why, which the updater records in the service's history."""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from . import fanout

ROUND_SECONDS = 1.0
AGENT_WAIT = 10.0


@dataclass
class Verdict:
    healthy: bool
    reason: str = ""
    checks: list = field(default_factory=list)   # one dict per check run
    patched_errors: dict = field(default_factory=dict)  # pid -> count (absent: no signal there)
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"healthy": self.healthy, "reason": self.reason, "checks": self.checks[-20:],
                "patched_errors": {str(k): v for k, v in self.patched_errors.items()}, "seconds": round(self.seconds, 3)}


def check_http(url: str, timeout: float) -> str | None:
    """None when `url` answers 2xx, else why not (one line)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "livepatch-updater"}),
                                    timeout=timeout) as reply:
            reply.read(1 << 16)
            status = reply.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return f"GET {url} failed: {reason}"
    return None if 200 <= status < 300 else f"GET {url} answered {status}, not 2xx"


def check_command(argv: list[str], timeout: float) -> str | None:
    """None when the command exits 0, else why not (one line, with the end of its output)."""
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, errors="replace")
    except FileNotFoundError:
        return f"check command {argv[0]} not found"
    except PermissionError:
        return f"check command {argv[0]} is not executable"
    except subprocess.TimeoutExpired:
        return f"check command {' '.join(argv)[:80]} did not finish within {timeout:g}s"
    if r.returncode == 0:
        return None
    tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or [""]
    return f"check command {' '.join(argv)[:80]} exited {r.returncode}" + (f": {tail[0][:120]}" if tail[0] else "")


class AgentSignal:
    """Exceptions through the patched code of one patch in some processes."""

    def __init__(self, pids, patch_id: str, seconds: float):
        self.pids = list(pids)
        self.patch_id = patch_id
        started = fanout.request_all(self.pids, "patched-errors", wait=AGENT_WAIT, action="start",
                                     patch_id=patch_id, seconds=max(1.0, seconds * 2 + 30))
        # where the interpreter gives no signal (3.11) or the request failed, it is not counted
        self.watching = [pid for pid, o in started.items() if o.ok and o.result.get("supported")
                         and o.result.get("observing")]

    def counts(self, action="read") -> tuple[dict, list]:
        out, samples = {}, []
        for pid, o in fanout.request_all(self.watching, "patched-errors", wait=AGENT_WAIT, action=action).items():
            if o.ok and o.result.get("observing"):
                out[pid] = o.result.get("count", 0)
                samples += [{**s, "pid": pid} for s in o.result.get("samples", ())]
        return out, samples

    def stop(self) -> None:
        if self.watching:
            self.counts("stop")


def _describe_errors(counts: dict, samples: list, allowed: int) -> str:
    total = sum(counts.values())
    first = samples[0] if samples else {}
    where = (f"; first: {first['error']} in {first['function']} ({first['file']}) in process {first['pid']}"
             + (f": {first['message']}" if first.get("message") else "")) if first else ""
    return f"{total} exception{'s' if total != 1 else ''} raised through the patched code (allowed {allowed}){where}"


def observe(pids, patch_id: str, health, *, clock=time.monotonic, sleep=time.sleep, log=None) -> Verdict:
    """Watch `pids` after `patch_id` was installed in them, as `health`
    (updater_config.HealthConfig) says, for `health.observe` seconds."""
    started = clock()
    signal = AgentSignal(pids, patch_id, health.observe) if health.patched_errors is not None else None
    verdict = Verdict(True)
    try:
        while True:
            for url in health.http:
                problem = check_http(url, health.timeout)
                verdict.checks.append({"check": f"http {url}", "ok": problem is None, "problem": problem})
                if problem:
                    return _failed(verdict, problem, started, clock)
            for argv in health.commands:
                problem = check_command(argv, health.timeout)
                verdict.checks.append({"check": "command " + " ".join(argv)[:80], "ok": problem is None,
                                       "problem": problem})
                if problem:
                    return _failed(verdict, problem, started, clock)
            if signal is not None:
                counts, samples = signal.counts()
                verdict.patched_errors = counts
                if sum(counts.values()) > health.patched_errors:
                    return _failed(verdict, _describe_errors(counts, samples, health.patched_errors), started, clock)
            left = health.observe - (clock() - started)
            if left <= 0:
                break
            sleep(min(ROUND_SECONDS, left))
    finally:
        if signal is not None:
            signal.stop()
    verdict.seconds = clock() - started
    if signal is not None and not signal.watching and log:
        log("no agent signal in these processes (Python 3.11, or no answer): HTTP and command checks only")
    return verdict


def _failed(verdict: Verdict, reason: str, started: float, clock) -> Verdict:
    verdict.healthy, verdict.reason, verdict.seconds = False, reason, clock() - started
    return verdict
