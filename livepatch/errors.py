"""Errors as data: every refusal is a Problem (category, target, message) and
every exception carries the full list, so the CLI can render and the agent can
serialise them without parsing strings."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Problem:
    category: str  # e.g. "baseline-mismatch", "free-vars", "busy"
    target: str  # "module:qualname", or "" when not about one target
    message: str

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.target}: {self.message}" if self.target else self.message


class PatchError(Exception):
    """Base of every refusal. Nothing has changed when one is raised."""

    category = "error"

    def __init__(self, message: str, problems: list[Problem] | None = None):
        self.problems = list(problems or [])
        if self.problems:
            message = message + "\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(message)

    def to_dict(self) -> dict:
        return {
            "error": type(self).__name__,
            "message": str(self),
            "problems": [p.to_dict() for p in self.problems],
        }


class TargetNotFound(PatchError):
    category = "not-found"


class BaselineMismatch(PatchError):
    category = "baseline-mismatch"


class IncompatibleChange(PatchError):
    category = "incompatible"


class TargetBusy(PatchError):
    category = "busy"

    def __init__(self, message: str, problems=None, blockers=None):
        self.blockers = list(blockers or [])
        super().__init__(message, problems)

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["blockers"] = self.blockers
        return d


class RollbackRefused(PatchError):
    category = "rollback-refused"


class Cancelled(PatchError):
    """The client of an apply or rollback went away (Ctrl-C, killed) while
    it waited for a safe point; it was abandoned before any store."""

    category = "cancelled"


class UnsupportedRuntime(PatchError):
    category = "unsupported-runtime"


class CommitFailed(PatchError):
    """A store failed inside the commit; every earlier store was undone."""

    category = "commit-failed"


def raise_for(problems: list[Problem]) -> None:
    """Raise the exception that fits a list of problems, listing all of them.

    Mixed lists raise the class of the first problem's kind in a fixed order
    of precedence (a missing target explains the rest best)."""
    if not problems:
        return
    order = [
        ("not-found", TargetNotFound, "target not found"),
        ("baseline-mismatch", BaselineMismatch, "baseline does not match the running code"),
        ("incompatible", IncompatibleChange, "change cannot be applied safely"),
    ]
    kinds = {p.category.split(":")[0] for p in problems}
    for kind, cls, title in order:
        if kind in kinds:
            raise cls(f"{title} ({len(problems)} problem{'s' * (len(problems) != 1)})", problems)
    raise PatchError(f"{len(problems)} problems", problems)
