"""The signed catalog of a patch repository: what fixes exist, for which
baseline, in which order, and the digest of each bundle file.

`catalog.json` is one JSON object: {"format": FORMAT, "catalog": BODY,
"signature": {...}}, the signature an Ed25519 signature (livepatch/signing.py)
over the canonical JSON of BODY. BODY holds "generated" (UTC time) and
"entries", one per fix. A "hotpatch" entry names a bundle file by path,
size and SHA-256; a "baseline" entry is a fix that exists only as a new
release (nothing to apply: the process must be upgraded and restarted).
Everything is checked (types, sizes, ids, paths) before any entry is used."""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass

from .errors import PatchError, Problem

FORMAT = "livepatch-catalog/1"
FILENAME = "catalog.json"
BUNDLE_DIR = "bundles"
KINDS = ("hotpatch", "baseline")
CLASSIFICATIONS = ("security", "critical", "bugfix", "other")
MAX_CATALOG_BYTES = 8 << 20
MAX_ENTRIES = 10_000
MAX_BUNDLE_BYTES = 64 << 20

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class CatalogError(PatchError):
    """A catalog that is not valid, or whose signature does not verify."""

    category = "catalog"


@dataclass(frozen=True)
class CatalogEntry:
    id: str
    kind: str                      # "hotpatch" or "baseline"
    classification: str
    baseline: dict                 # {"name": distribution, "version": version it fixes}
    title: str = ""
    references: tuple = ()
    sequence: int = 1
    lineage: str | None = None
    requires: tuple = ()
    cumulative: bool = False
    released: str = ""             # UTC date and time the fix entered the repository
    size: int = 0                  # hotpatch: bytes of the bundle file
    sha256: str = ""               # hotpatch: digest of the bundle file
    path: str = ""                 # hotpatch: bundles/ID.lpb, relative to the repository
    fixed_in: str | None = None    # baseline: the release that has the fix

    @property
    def distribution(self) -> str:
        return self.baseline["name"]

    @property
    def version(self) -> str:
        return self.baseline["version"]

    def to_json(self) -> dict:
        out = asdict(self)
        out["references"], out["requires"] = list(self.references), list(self.requires)
        return out


def canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def bundle_path(patch_id: str) -> str:
    return f"{BUNDLE_DIR}/{patch_id}.lpb"


def _fail(where: str, message: str):
    raise CatalogError(f"invalid catalog: {where}: {message}", [Problem("catalog", where, message)])


def _text(value, where, limit=512, optional=False):
    if value is None and optional:
        return None
    if not isinstance(value, str) or len(value) > limit or not value.isprintable():
        _fail(where, f"must be printable text of at most {limit} characters")
    return value


def _entry(raw, i: int) -> CatalogEntry:
    where = f"entries[{i}]"
    if not isinstance(raw, dict):
        _fail(where, "must be an object")
    known = {"id", "kind", "classification", "baseline", "title", "references", "sequence", "lineage", "requires",
             "cumulative", "released", "size", "sha256", "path", "fixed_in"}
    unknown = sorted(set(raw) - known)
    if unknown:
        _fail(where, f"unknown field {unknown[0][:40]!r}")
    pid = raw.get("id")
    if not isinstance(pid, str) or not _ID.fullmatch(pid):
        _fail(f"{where}.id", "must be a patch id (letters, digits, '.', '_', '-'; at most 128 characters)")
    where = f"entry {pid}"
    kind = raw.get("kind")
    if kind not in KINDS:
        _fail(f"{where}.kind", f"must be one of {', '.join(KINDS)}")
    if raw.get("classification") not in CLASSIFICATIONS:
        _fail(f"{where}.classification", f"must be one of {', '.join(CLASSIFICATIONS)}")
    base = raw.get("baseline")
    if not isinstance(base, dict) or set(base) != {"name", "version"}:
        _fail(f"{where}.baseline", "must be {\"name\": ..., \"version\": ...}")
    base = {"name": _text(base["name"], f"{where}.baseline.name", 200),
            "version": _text(base["version"], f"{where}.baseline.version", 100)}
    refs = raw.get("references", [])
    requires = raw.get("requires", [])
    for name, items in (("references", refs), ("requires", requires)):
        if not isinstance(items, list) or len(items) > 64:
            _fail(f"{where}.{name}", "must be a list of at most 64 items")
        for j, item in enumerate(items):
            _text(item, f"{where}.{name}[{j}]", 200)
    if any(not _ID.fullmatch(r) for r in requires):
        _fail(f"{where}.requires", "must name patch ids")
    sequence = raw.get("sequence", 1)
    if not isinstance(sequence, int) or isinstance(sequence, bool) or not 0 <= sequence < 2**31:
        _fail(f"{where}.sequence", "must be an integer from 0 to 2**31-1")
    lineage = raw.get("lineage")
    if lineage is not None and (not isinstance(lineage, str) or not _ID.fullmatch(lineage)):
        _fail(f"{where}.lineage", "must be an id")
    cumulative = raw.get("cumulative", False)
    if not isinstance(cumulative, bool):
        _fail(f"{where}.cumulative", "must be true or false")
    size, sha, path = raw.get("size", 0), raw.get("sha256", ""), raw.get("path", "")
    if kind == "hotpatch":
        if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= MAX_BUNDLE_BYTES:
            _fail(f"{where}.size", f"must be a byte count from 1 to {MAX_BUNDLE_BYTES}")
        if not isinstance(sha, str) or not _HEX64.fullmatch(sha):
            _fail(f"{where}.sha256", "must be 64 lower-case hex digits")
        if path != bundle_path(pid):  # the one path an entry may name: nothing outside bundles/
            _fail(f"{where}.path", f"must be {bundle_path(pid)}")
    elif size or sha or path:
        _fail(where, "a baseline entry names no bundle (no size, sha256 or path)")
    return CatalogEntry(id=pid, kind=kind, classification=raw["classification"], baseline=base,
                        title=_text(raw.get("title", ""), f"{where}.title"), references=tuple(refs),
                        sequence=sequence, lineage=lineage, requires=tuple(requires), cumulative=cumulative,
                        released=_text(raw.get("released", ""), f"{where}.released", 64), size=size, sha256=sha,
                        path=path, fixed_in=_text(raw.get("fixed_in"), f"{where}.fixed_in", 100, optional=True))


def parse(data: bytes, trusted_keys: dict, *, source: str = "catalog") -> tuple[list[CatalogEntry], dict]:
    """The entries of a catalog file whose signature verifies with one of
    `trusted_keys` ({key id: public key}); returns (entries, {"generated",
    "signed_by"}). Raises CatalogError (SignatureError for the signature)
    naming what is wrong; nothing of an invalid catalog is returned."""
    from .signing import SignatureError, verify
    if len(data) > MAX_CATALOG_BYTES:
        raise CatalogError(f"{source} is larger than a catalog may be ({MAX_CATALOG_BYTES} bytes)")
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise CatalogError(f"{source} is not a livepatch catalog (not JSON)") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or set(doc) != {"format", "catalog", "signature"}:
        raise CatalogError(f"{source} is not a livepatch catalog (expected format {FORMAT} with a signature)")
    body, signature = doc["catalog"], doc["signature"]
    if not isinstance(body, dict) or not isinstance(signature, dict):
        raise CatalogError(f"{source} is not a livepatch catalog (catalog and signature must be objects)")
    try:
        signed_by = verify(signature, canonical(body), trusted_keys)
    except SignatureError as exc:
        first = str(exc).splitlines()[0].replace("bundle", "catalog")
        raise SignatureError(f"{source}: {first}", exc.problems) from None
    entries = body.get("entries")
    if not isinstance(entries, list) or len(entries) > MAX_ENTRIES:
        _fail("entries", f"must be a list of at most {MAX_ENTRIES} entries")
    out = [_entry(raw, i) for i, raw in enumerate(entries)]
    ids = [e.id for e in out]
    if len(set(ids)) != len(ids):
        _fail("entries", f"patch id {next(i for i in ids if ids.count(i) > 1)} appears twice")
    return out, {"generated": _text(body.get("generated", ""), "generated", 64), "signed_by": signed_by}


def render(entries, private_key) -> bytes:
    """A signed catalog file holding `entries` (CatalogEntry or dicts), in
    release order then id."""
    rows = [e.to_json() if isinstance(e, CatalogEntry) else dict(e) for e in entries]
    for row in rows:  # the file carries only what the entry's kind has
        for key in ("size", "sha256", "path") if row["kind"] == "baseline" else ("fixed_in",):
            row.pop(key, None)
        if row.get("lineage") is None:
            row.pop("lineage", None)
        if row.get("fixed_in") is None:
            row.pop("fixed_in", None)
    rows.sort(key=lambda r: (r.get("released", ""), r["id"]))
    for i, row in enumerate(rows):
        _entry(row, i)  # never write what the reader refuses
    from .signing import sign
    body = {"generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "entries": rows}
    doc = {"format": FORMAT, "catalog": body, "signature": sign(private_key, canonical(body))}
    return json.dumps(doc, indent=1, sort_keys=True, ensure_ascii=False).encode() + b"\n"


def entry_for_bundle(bundle, data: bytes, released: str | None = None) -> CatalogEntry:
    """The catalog entry of a verified bundle (livepatch.bundle.Bundle) whose
    file bytes are `data`."""
    import hashlib
    m = bundle.manifest
    return CatalogEntry(id=m["id"], kind="hotpatch", classification=m["classification"],
                        baseline=dict(m["baseline"]), title=m.get("title", ""), references=tuple(m["references"]),
                        sequence=m.get("sequence", 0), lineage=m.get("lineage"), requires=tuple(m["requires"]),
                        cumulative=bool(m["cumulative"]),
                        released=released or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        size=len(data), sha256=hashlib.sha256(data).hexdigest(), path=bundle_path(m["id"]))
