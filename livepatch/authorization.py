"""Signed rollback authorisations.

Taking a `security` or `critical` patch out of a running service (a
rollback, or an older bundle applied over it with --allow-downgrade) needs
more than access to the service's socket: a small document signed by a key
the agent trusts, made with `livepatch authorize-rollback BUNDLE --key KEY`.
It names the patch id and the bundle's digest (SHA-256 of its manifest), so
it authorises removing exactly that build of that patch, and it expires.

The signature is Ed25519 over a domain tag plus the canonical JSON of the
authorisation, so a bundle signature can never pass for an authorisation or
the other way round (a manifest's bytes never start with the tag)."""

from __future__ import annotations

import json
import re
import time

from .errors import PatchError, Problem

DOMAIN = b"livepatch rollback authorization v1\n"
MAX_DOCUMENT = 4096
MAX_VALID_SECONDS = 30 * 86400
DEFAULT_VALID_SECONDS = 86400
CLOCK_SKEW = 300  # an authorisation made on a machine whose clock runs a little ahead still works
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEX16 = re.compile(r"^[0-9a-f]{16}$")
_HEXSIG = re.compile(r"^[0-9a-f]{128}$")


class RollbackUnauthorized(PatchError):
    """A security or critical patch would be taken out of effect without a
    valid authorisation for it; nothing changed."""

    category = "unauthorized"


def make(bundle, private_key, valid_seconds: float = DEFAULT_VALID_SECONDS, now: float | None = None) -> bytes:
    """The authorisation document (canonical JSON bytes) for rolling back
    `bundle` (a verified bundle.Bundle) anywhere it is applied."""
    from .bundle import canonical, digest
    from .signing import sign
    if not 0 < valid_seconds <= MAX_VALID_SECONDS:
        raise RollbackUnauthorized(f"an authorisation is valid for more than 0 and at most {MAX_VALID_SECONDS // 86400} days")
    now = int(time.time() if now is None else now)
    body = {"action": "rollback", "patch": bundle.id, "bundle_sha256": digest(bundle),
            "baseline": bundle.manifest["baseline"], "issued": now, "expires": now + int(valid_seconds)}
    return canonical({"authorization": body, "signature": sign(private_key, DOMAIN + canonical(body))})


def parse(data) -> dict:
    """The authorisation body of a document, checked for shape only (the
    signature is checked by verify)."""
    if isinstance(data, str):
        data = data.encode("utf-8", "replace")
    if not isinstance(data, (bytes, bytearray)) or len(data) > MAX_DOCUMENT:
        raise _bad(f"not a rollback authorisation (at most {MAX_DOCUMENT} bytes of JSON)")
    try:
        doc = json.loads(bytes(data))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise _bad("not a rollback authorisation (not JSON)") from None
    ok = isinstance(doc, dict) and set(doc) == {"authorization", "signature"}
    body, sig = (doc.get("authorization"), doc.get("signature")) if ok else (None, None)
    ok = ok and isinstance(body, dict) and set(body) == {"action", "patch", "bundle_sha256", "baseline", "issued", "expires"}
    ok = ok and body["action"] == "rollback" and isinstance(body["patch"], str) and len(body["patch"]) <= 128 \
        and isinstance(body["bundle_sha256"], str) and bool(_HEX64.fullmatch(body["bundle_sha256"])) \
        and all(type(body[k]) is int and 0 <= body[k] < 2**40 for k in ("issued", "expires")) \
        and isinstance(body["baseline"], dict)
    ok = ok and isinstance(sig, dict) and set(sig) == {"algorithm", "key_id", "signature"} \
        and sig["algorithm"] == "ed25519" and isinstance(sig["key_id"], str) and bool(_HEX16.match(sig["key_id"])) \
        and isinstance(sig["signature"], str) and bool(_HEXSIG.fullmatch(sig["signature"]))
    if not ok:
        raise _bad("not a rollback authorisation (expected {authorization: {action, patch, bundle_sha256, "
                   "baseline, issued, expires}, signature: {algorithm, key_id, signature}})")
    return doc


def verify(data, trusted: dict, *, patch_id: str, bundle_sha256: str, now: float | None = None) -> str:
    """The key id that signed a valid authorisation to roll back exactly
    this build of this patch; raises SignatureError (forged, untrusted key)
    or RollbackUnauthorized (another patch or build, expired)."""
    from .bundle import canonical
    from .signing import SignatureError, verify as verify_signature
    doc = parse(data)
    body = doc["authorization"]
    try:
        key = verify_signature(doc["signature"], DOMAIN + canonical(body), trusted)
    except SignatureError as exc:
        # the same checks as for a bundle, worded for the document at hand
        what = "is signed by an untrusted key" if "untrusted" in str(exc) else "does not verify (altered or forged)"
        raise SignatureError(f"the rollback authorisation for {_printable(body['patch'])} {what}", exc.problems) from None
    if body["patch"] != patch_id:
        raise _bad(f"the authorisation is for {_printable(body['patch'])}, not {patch_id}")
    if body["bundle_sha256"] != bundle_sha256:
        raise _bad(f"the authorisation is for another build of {patch_id} (bundle {body['bundle_sha256'][:12]}, "
                   f"applied {bundle_sha256[:12]})")
    now = time.time() if now is None else now
    if body["expires"] <= now:
        raise _bad(f"the authorisation for {patch_id} expired at {_iso(body['expires'])}")
    if body["issued"] > now + CLOCK_SKEW:
        raise _bad(f"the authorisation for {patch_id} is issued in the future ({_iso(body['issued'])})")
    return key


def _bad(message: str) -> RollbackUnauthorized:
    return RollbackUnauthorized(message, [Problem("unauthorized", "", message)])


def _printable(text: str) -> str:
    return repr(text[:60]) if not re.fullmatch(r"[A-Za-z0-9._-]{1,128}", text) else text


def _iso(ts: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
