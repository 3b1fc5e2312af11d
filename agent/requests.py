"""What the agent does for each request of the control protocol. Bundles
are verified against the agent's trusted keys before anything in them is
unmarshalled; apply and rollback run one at a time."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

# ordering (errors, hmac, secrets), base64 and platform are imported by the
# requests that use them: an agent waiting for its first request has none
from . import hangup, protocol
from . import trust as trust_module

# An apply or rollback waits this long for another one to finish, then the
# client gets a clear "busy" answer.
EXCLUSIVE_WAIT = 30.0


class Agent:
    def __init__(self, *, name: str, trust, allow_unsigned: bool, socket_path: str):
        self.name = name
        self.trust_source = trust
        self.allow_unsigned = allow_unsigned
        trust_module.initial(self)  # sets self.trusted; a bad store is logged, never fatal
        self.socket_path = socket_path
        self.started = time.time()
        self._exclusive = threading.Lock()
        self._doing = None  # the apply or rollback under way, for status

    # ------------------------------------------------------------ dispatch
    def handle(self, request: dict, peer) -> dict:
        op = request.get("op")
        if request.get("v") != protocol.VERSION:
            return self._error("ProtocolError", f"unsupported protocol version {request.get('v')!r} (agent speaks {protocol.VERSION})")
        if op not in protocol.OPS:
            return self._error("ProtocolError", f"unknown request {str(op)[:40]!r}; known: {', '.join(protocol.OPS)}")
        _served.peer = peer
        try:
            from . import ordering
            with ordering.request_context(peer):
                return {"v": protocol.VERSION, "ok": True, "result": getattr(self, "op_" + op.replace("-", "_"))(request)}
        except _RequestError as exc:
            return self._error(exc.kind, str(exc), exc.details)
        except Exception as exc:  # a PatchError, or a bug: reported, never fatal to the agent
            from livepatch.errors import PatchError
            if isinstance(exc, PatchError):
                d = exc.to_dict()
                return self._error(d.pop("error"), d.pop("message").splitlines()[0], d)
            return self._error(type(exc).__name__, str(exc))

    @staticmethod
    def _error(kind: str, message: str, details=None) -> dict:
        return {"v": protocol.VERSION, "ok": False, "error": {"error": kind, "message": message, **(details or {})}}

    # ------------------------------------------------------------ requests
    def op_ping(self, request):
        import platform
        return {"pid": os.getpid(), "python": platform.python_version(), "agent": _version()}

    def op_status(self, request):
        import livepatch
        status = livepatch.status()
        status["agent"] = {
            "pid": os.getpid(), "name": self.name, "version": _version(), "socket": self.socket_path,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
            "argv": sys.argv[:8], "trusted_keys": sorted(self.trusted), "trust": self.trust_source,
            "trust_problem": self.trust_problem,
            "development_mode_unsigned_bundles": self.allow_unsigned,
            "busy": self._exclusive.locked(),
            "in_progress": dict(self._doing) if self._doing else None,
        }
        from .baseline import runs  # what the process runs, never what a bundle claims
        status.update(runs(self, request))
        from .state import status_fields
        status.update(status_fields(self))
        return status

    def op_history(self, request):
        import livepatch
        from .state import history
        persisted = history(self)
        return persisted if persisted is not None else livepatch.engine.history()

    def op_assess(self, request):
        import livepatch
        from . import ordering
        from livepatch.busynow import verdict
        out = []
        for i, blob in enumerate(_list(request, "bundles")):
            try:
                patch = self._patch(blob, f"bundles[{i}]", action="assess")
            except Exception as exc:
                out.append(_refusal(exc))
                continue
            out.append(verdict(ordering.assess(patch, request, livepatch.engine.assess(patch), agent=self)))
        return out

    def op_apply(self, request):
        import livepatch
        from . import ordering
        from livepatch.busynow import verdict
        patch, data, bundle = self._patch(request.get("bundle"), "bundle", raw=True,
                                          action="assess" if request.get("dry_run") else "apply")
        timeout, force = _timeout(request), bool(request.get("force", False))
        if request.get("dry_run"):
            return {"dry_run": True, **verdict(ordering.assess(patch, request, livepatch.engine.assess(patch), agent=self),
                                               force)}
        cancelled = hangup.cancelled()
        with self._exclusively("apply", patch.id, timeout, cancelled), ordering.recorded(livepatch.engine, "apply"):
            ordering.check_apply(self, patch, request)
            started = time.perf_counter_ns()
            result = livepatch.engine.apply(patch, timeout=timeout, force=force, cancelled=cancelled)
            from .state import on_applied
            on_applied(self, data, bundle)
        return {"patch_id": result.patch_id, "pause_ns": result.pause_ns, "attempts": result.attempts,
                "functions": result.functions, "targets": result.targets, "forced": result.forced,
                "interrupted_by": result.interrupted_by, "engine_ns": time.perf_counter_ns() - started,
                "signed_by": patch.metadata.get("signed_by"), "undo_token": ordering.undo_token(result.patch_id)}

    def op_rollback(self, request):
        import livepatch
        from . import ordering
        timeout, force = _timeout(request), bool(request.get("force", False))
        cancelled = hangup.cancelled()
        patch_id = request.get("patch_id")
        from livepatch.bundle import valid_id
        if patch_id is not None and not valid_id(patch_id):
            # never stored or echoed: what is refused here could be escapes or lone surrogates
            raise _RequestError("BadRequest", "patch_id must be a patch id (letters, digits, '.', '_', '-'; "
                                              "at most 128 characters)")
        what = "every patch" if request.get("all") else patch_id or "the latest patch"
        with self._exclusively("rollback", what, timeout, cancelled), ordering.recorded(livepatch.engine, "rollback"):
            ordering.check_rollback(self, request)
            if request.get("all"):
                results = livepatch.engine.rollback_all(timeout=timeout, force=force, cancelled=cancelled)
            else:
                results = [livepatch.engine.rollback(patch_id, timeout=timeout, force=force, cancelled=cancelled)]
            from .state import on_rolled_back
            on_rolled_back(self, [r.patch_id for r in results])
        return [{"patch_id": r.patch_id, "pause_ns": r.pause_ns, "attempts": r.attempts,
                 "functions": r.functions, "targets": r.targets} for r in results]

    def op_patched_errors(self, request):
        import livepatch
        from . import patched_errors
        return patched_errors.handle(livepatch.engine, request)

    def op_reload_trust(self, request):
        try:
            return trust_module.reload(self, request)
        except trust_module.Refused as exc:
            raise _RequestError(exc.kind, str(exc)) from None

    # ------------------------------------------------------------ helpers
    def _patch(self, blob, field, raw=False, action="apply"):
        """The verified Patch; with `raw`, (patch, bundle bytes, verified
        Bundle). A bundle refused here is recorded in the history."""
        import base64
        import binascii

        from livepatch.bundle import read, to_patch
        data = bundle = None
        try:
            if not isinstance(blob, str):
                raise _RequestError("BadRequest", f"{field} must be a base64 string")
            try:
                data = base64.b64decode(blob, validate=True)
            except (binascii.Error, ValueError):
                raise _RequestError("BadRequest", f"{field} is not valid base64") from None
            bundle = read(data, self.trusted, allow_unsigned=self.allow_unsigned)
            patch = to_patch(bundle)
        except Exception as exc:
            _record_rejection(action, field, data, bundle, exc)
            raise
        return (patch, data, bundle) if raw else patch

    @contextlib.contextmanager
    def _exclusively(self, action: str, what: str, timeout: float, cancelled=None):
        """One apply or rollback at a time; waiting for another one ends
        early if this request's client goes away (see agent/hangup.py)."""
        deadline = time.monotonic() + EXCLUSIVE_WAIT
        while not self._exclusive.acquire(timeout=min(0.2, max(0.0, deadline - time.monotonic()))):
            if cancelled is not None and cancelled():
                from livepatch.errors import Cancelled
                raise Cancelled(f"{action} of {what!r} cancelled by its client while another one ran; nothing was changed")
            if time.monotonic() >= deadline:
                raise _RequestError("Busy", f"another apply or rollback has been running for over {EXCLUSIVE_WAIT:g}s; retry later")
        peer = getattr(_served, "peer", None)
        self._doing = {"action": action, "patch": what, "timeout": timeout, "client_pid": peer[0] if peer else None,
                       "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        try:
            yield
        finally:
            self._doing = None
            self._exclusive.release()


_served = threading.local()  # the peer (pid, uid, gid) of the request this thread serves


class _RequestError(Exception):
    def __init__(self, kind, message, details=None):
        super().__init__(message)
        self.kind, self.details = kind, details or {}


def _record_rejection(action, field, data, bundle, exc) -> None:
    """What identifies a rejected bundle, never its contents: its digest and
    size, and its id only once its signature has vouched for it."""
    import hashlib

    import livepatch
    from . import ordering
    extra = {"field": field, "peer": ordering.record_fields().get("peer")}
    if data is not None:
        extra.update(bundle_sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    if isinstance(exc, _RequestError):
        extra["error"] = exc.kind
    livepatch.engine.record_rejection(action, bundle.id if bundle is not None else "", exc, **extra)


def _list(request, key):
    value = request.get(key)
    if not isinstance(value, list) or len(value) > 64:
        raise _RequestError("BadRequest", f"{key} must be a list of at most 64 items")
    return value


def _timeout(request) -> float:
    value = request.get("timeout", 5.0)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 600:
        raise _RequestError("BadRequest", "timeout must be a number of seconds between 0 and 600")
    return float(value)


def _refusal(exc) -> dict:
    from livepatch.errors import PatchError
    if isinstance(exc, PatchError):
        d = exc.to_dict()
        return {"patch_id": None, "verdict": "refused", "error": d["error"], "message": d["message"].splitlines()[0],
                "problems": d["problems"]}
    if isinstance(exc, _RequestError):
        return {"patch_id": None, "verdict": "refused", "error": exc.kind, "message": str(exc), "problems": []}
    return {"patch_id": None, "verdict": "refused", "error": type(exc).__name__, "message": str(exc), "problems": []}


def _version() -> str:
    import livepatch
    return livepatch.__version__
