"""What the agent adds to the engine before a bundle may change a service:
ordering and rollback authority, and who is recorded as having done it.

* Ordering. Bundles carry a sequence per baseline (name and version) and an
  optional lineage (the family of successive versions of one fix). A bundle
  is a *downgrade* when a patch in effect for the same baseline and lineage
  has a higher sequence, or, for a cumulative bundle (which replaces every
  applied patch), when any patch it would remove has a sequence as high or
  higher, or belongs to another baseline. A downgrade is refused unless the request
  says `allow_downgrade`. Bundles made before ordering existed count as
  sequence 0. Only patches in effect count: a patch rolled back is gone.
* Rollback authority. Taking a `security` or `critical` patch out of effect
  (a rollback, or an allowed downgrade whose cumulative bundle removes it)
  needs a rollback authorisation signed by a trusted key for that patch id
  and bundle digest (livepatch/authorization.py), unless the peer is root,
  or the patch was applied unsigned in development mode.
* Undo. A successful apply answers an `undo_token`: for ten minutes it lets
  the client that applied a patch roll that same application back without
  an authorisation (a service-wide apply undoing its partial commits). No
  other client has seen the token.
* Records. Every apply and rollback made through the socket carries the
  peer's uid and pid in its history entries, with any downgrade allowed and
  the key that authorised a rollback.

Refusals here happen before the engine is called, so nothing has changed."""

from __future__ import annotations

import contextlib
import hmac
import logging
import secrets
import threading
import time

from livepatch.errors import PatchError, Problem

SENSITIVE = ("security", "critical")
MAX_AUTHORIZATIONS = 16
_local = threading.local()
# Metadata of patches seen in effect, by id: a rollback of everything also
# removes the patches a cumulative one replaced, which status lists by id only.
_known: dict = {}
_MAX_KNOWN = 1024
UNDO_SECONDS = 600.0
_undo: dict = {}  # patch id -> (token, monotonic deadline), for the application that answered it
_log = logging.getLogger("livepatch")


class Downgrade(PatchError):
    """The bundle is older than what is in effect; nothing changed."""

    category = "downgrade"


# ---------------------------------------------------------------- request context

@contextlib.contextmanager
def request_context(peer):
    """Around one request: `peer` is (pid, uid, gid) from SO_PEERCRED."""
    _local.peer, _local.fields = peer, {}
    try:
        yield
    finally:
        _local.peer = _local.fields = None


def _record_fields() -> dict:
    peer = getattr(_local, "peer", None)
    out = {"peer": {"uid": peer[1], "pid": peer[0]}} if peer else {}
    out.update(getattr(_local, "fields", None) or {})
    return out


def record_fields() -> dict:
    """What the history entries of the current request's apply or rollback
    carry besides the engine's own keys: `peer` {uid, pid}, and where they
    apply `allow_downgrade`, `downgrade` (what was overridden) and
    `authorization` {patch id: key id, or "root"}. Engine listeners run on
    the request's thread, so a listener that persists history can add them."""
    return _record_fields() if getattr(_local, "peer", None) else {}


@contextlib.contextmanager
def recorded(engine, action: str):
    """Around the engine call of an apply or rollback: its entries in the
    engine's history get the request's record fields."""
    earlier = engine.history()  # held: the ids of its entries stay theirs (the history is bounded)
    before = set(map(id, earlier))
    try:
        yield
    finally:
        fields = record_fields()
        for entry in engine.history():
            if id(entry) not in before and entry.get("action") == action:
                for key, value in fields.items():
                    entry.setdefault(key, value)


def _peer_uid():
    peer = getattr(_local, "peer", None)
    return peer[1] if peer else None


# ---------------------------------------------------------------- ordering

def _order(metadata: dict):
    base = metadata.get("baseline")
    if not isinstance(base, dict):
        return None  # not from a bundle (made in-process): nothing to order against
    return (base.get("name"), base.get("version")), metadata.get("lineage"), int(metadata.get("sequence") or 0)


def _describe(pid: str, metadata: dict) -> str:
    return f"{pid} (sequence {int(metadata.get('sequence') or 0)})"


def _remember(applied: list, patch=None) -> None:
    for p in applied:
        _known[p["id"]] = p["metadata"]
    if patch is not None:
        _known[patch.id] = dict(patch.metadata or {})
    while len(_known) > _MAX_KNOWN:
        del _known[next(iter(_known))]


def conflicts(patch, applied: list) -> list[tuple[dict, Problem]]:
    """(applied patch status, problem) for every patch in effect that makes
    `patch` a downgrade; `applied` is engine.status()["applied"]."""
    mine = _order(patch.metadata or {})
    if mine is None:
        return []
    base, lineage, seq = mine
    me = _describe(patch.id, patch.metadata)
    out = []
    for p in applied:
        theirs = _order(p["metadata"])
        if theirs is None or p["id"] == patch.id:
            continue
        their_base, their_lineage, their_seq = theirs
        if their_base != base:
            if patch.cumulative:
                out.append((p, Problem("downgrade", p["id"], (
                    f"cumulative {patch.id} for {_base(base)} would remove applied {p['id']} "
                    f"(for {_base(their_base)}), which it is not ordered against"))))
        elif their_seq > seq and (patch.cumulative or their_lineage == lineage):
            out.append((p, Problem("downgrade", p["id"], (
                f"{me} is older than applied {_describe(p['id'], p['metadata'])} for {_base(base)}"
                + (" and would remove it" if patch.cumulative else "")))))
        elif their_seq == seq and patch.cumulative:
            # same number: nothing says it was built knowing that patch
            out.append((p, Problem("downgrade", p["id"], (
                f"cumulative {me} is not newer than applied {_describe(p['id'], p['metadata'])} for {_base(base)} "
                f"and would remove it"))))
    return out


def _base(base) -> str:
    return f"{base[0]} {base[1]}"


def _applied() -> list:
    import livepatch
    return livepatch.engine.status()["applied"]


def check_apply(agent, patch, request, applied: list | None = None) -> None:
    """Raise Downgrade, or RollbackUnauthorized for an allowed downgrade that
    removes a security or critical patch; notes what is allowed for the
    record."""
    applied = _applied() if applied is None else applied
    _remember(applied, patch)
    found = conflicts(patch, applied)
    if not found:
        return
    problems = [problem for _, problem in found]
    if request.get("allow_downgrade") is not True:
        _log.warning("livepatch: refused %s: %s", patch.id, problems[0].message)
        raise Downgrade(f"{problems[0].message}; pass --allow-downgrade to apply it anyway", problems)
    removed = [p for p, _ in found] if patch.cumulative else []
    authorized = _authorize(agent, request, removed, "removing it", "removal")
    _local.fields = dict(getattr(_local, "fields", None) or {}, allow_downgrade=True,
                         downgrade=[p.message for p in problems], **authorized)
    _log.warning("livepatch: downgrade allowed for %s by uid %s: %s", patch.id, _peer_uid(), problems[0].message)


def assess(patch, request, verdict: dict, applied: list | None = None, agent=None) -> dict:
    """An assess verdict with the ordering decision folded in."""
    if verdict.get("verdict") != "applies":
        return verdict
    applied = _applied() if applied is None else applied
    found = conflicts(patch, applied)
    if not found:
        return verdict
    problems = [problem.to_dict() for _, problem in found]
    if request.get("allow_downgrade") is True:
        try:  # the apply would also need the removal of a security or critical patch authorised
            _authorize(agent, request, [p for p, _ in found] if patch.cumulative else [], "removing it", "removal",
                       quiet=True)
        except PatchError as exc:
            d = exc.to_dict()
            return {"patch_id": patch.id, "verdict": "refused", "error": d["error"],
                    "message": d["message"].splitlines()[0], "problems": problems + d["problems"]}
        return dict(verdict, downgrade=problems)
    return {"patch_id": patch.id, "verdict": "refused", "error": "Downgrade",
            "message": f"{found[0][1].message}; pass --allow-downgrade to apply it anyway", "problems": problems}


# ---------------------------------------------------------------- rollback authority

def undo_token(patch_id: str) -> str:
    """Issued to the client whose apply of `patch_id` just succeeded."""
    token = secrets.token_hex(16)
    _undo[patch_id] = (token, time.monotonic() + UNDO_SECONDS)
    return token


def _undoes(patch_id: str, request) -> bool:
    given, held = request.get("undo_token"), _undo.get(patch_id)
    return (isinstance(given, str) and held is not None and time.monotonic() < held[1]
            and hmac.compare_digest(given.encode("utf-8", "replace"), held[0].encode()))


def check_rollback(agent, request, applied: list | None = None) -> None:
    """Raise RollbackUnauthorized unless every security or critical patch the
    rollback removes is authorised; notes the authorisations for the record."""
    applied = _applied() if applied is None else applied
    _remember(applied)
    if request.get("all"):
        # each cumulative patch rolled back brings back what it replaced, which is rolled back next
        removed, queue, seen = [], list(applied), set()
        while queue:
            p = queue.pop()
            if p["id"] in seen:
                continue
            seen.add(p["id"])
            removed.append(p)
            queue += [{"id": r, "metadata": _known.get(r, {}), "replaces": []} for r in p.get("replaces", ())]
    else:
        wanted = request.get("patch_id")
        removed = [p for p in applied if p["id"] == wanted] if wanted is not None else applied[-1:]
    for pid in [pid for pid in _undo if pid not in {p["id"] for p in applied}]:
        del _undo[pid]  # that application is gone: a later one gets its own token
    _local.fields = dict(getattr(_local, "fields", None) or {},
                         **_authorize(agent, request, removed, "rolling it back", "rollback", undo=True))


def _authorize(agent, request, removed: list, doing: str, what: str, undo: bool = False, quiet: bool = False) -> dict:
    from livepatch.authorization import RollbackUnauthorized, verify
    needed = [p for p in removed if p["metadata"].get("classification") in SENSITIVE
              and p["metadata"].get("signed_by") and p["metadata"].get("bundle_sha256")]
    if not needed:
        return {}
    if _peer_uid() == 0:
        return {"authorization": {p["id"]: "root" for p in needed}}
    docs = request.get("authorizations") or []
    if not isinstance(docs, list) or len(docs) > MAX_AUTHORIZATIONS or not all(isinstance(d, str) for d in docs):
        raise RollbackUnauthorized(f"authorizations must be a list of at most {MAX_AUTHORIZATIONS} documents")
    out = {}
    for p in needed:
        meta = p["metadata"]
        if undo and _undoes(p["id"], request):
            out[p["id"]] = "undo of this client's apply"
            continue
        errors = []
        for doc in docs:
            try:
                out[p["id"]] = verify(doc, agent.trusted, patch_id=p["id"], bundle_sha256=meta["bundle_sha256"])
                break
            except PatchError as exc:
                errors.append(exc)
        else:
            if errors:
                # the one closest to this patch explains best: a forged one for it beats one for another patch
                errors.sort(key=lambda e: "is for" in str(e))
                if not quiet:
                    _log.warning("livepatch: refused %s of %s: %s", what, p["id"], str(errors[0]).splitlines()[0])
                raise errors[0]
            message = (f"{p['id']} is a {meta['classification']} patch: {doing} needs a rollback authorisation "
                       f"signed by a trusted key (livepatch authorize-rollback BUNDLE --key KEY -o FILE, "
                       f"then --authorization FILE)")
            if not quiet:
                _log.warning("livepatch: refused %s of %s by uid %s: no authorisation", what, p["id"], _peer_uid())
            raise RollbackUnauthorized(message, [Problem("unauthorized", p["id"], "no authorisation given")])
    return {"authorization": out}
