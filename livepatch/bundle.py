"""The bundle file (`*.lpb`): a signed, versioned manifest plus payloads.

Layout (all integers big-endian; docs/bundle-format.md has the full text):

    magic      8 bytes  b"\\x89LPB\\r\\n\\x1a\\n"
    manifest   u32 length + canonical JSON (sorted keys, no spaces, UTF-8)
    signature  u32 length + JSON {"algorithm", "key_id", "signature"}; length 0 = unsigned
    payloads   u32 count, then per payload: u16 name length + name, u32 length + bytes

The manifest pins every payload by SHA-256 and size, and the signature
covers the manifest bytes exactly, so one signature check vouches for every
byte. Reading is strict and bounded: the signature is checked before the
manifest is even parsed, payload digests before anything is unmarshalled,
and any violation is a BundleError naming the field. Nothing is loaded into
the process until every check passed."""

from __future__ import annotations

import ast
import hashlib
import json
import marshal
import re
import struct
import sys
import types
from dataclasses import dataclass

from .bundlefile import MAX_BUNDLE_BYTES, read_file  # noqa: F401  (both still importable from here)
from .errors import PatchError, Problem
from .locate import loaded_module
from .patch import PYTHON_TAG, UNCHANGED, Change, Patch
from .pending import UNBOUND, AtImport, imported, value_for

MAGIC = b"\x89LPB\r\n\x1a\n"
FORMAT = 1
MAX_MANIFEST_BYTES = 4 << 20
MAX_PAYLOADS = 4096
MAX_PAYLOAD_BYTES = 16 << 20
MAX_TARGETS = 10_000
MAX_TEXT = 8192
MAX_LITERAL = 65536
CLASSIFICATIONS = ("security", "critical", "bugfix", "other")
MAX_SEQUENCE = 2**31 - 1
KINDS = ("function", "generator", "coroutine", "async generator")

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_QUALNAME = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*|<locals>|<lambda>)(\.([A-Za-z_][A-Za-z0-9_]*|<locals>|<lambda>))*$")
_TAG = re.compile(r"^[a-z]+-3[0-9]{1,2}$")
_PAYLOAD = re.compile(r"^(code/[a-z]+-3[0-9]{1,2}|source|baseline|hooks)/[A-Za-z_][A-Za-z0-9_.]*$")
HOOKS_PAYLOAD = "hooks/module"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEXFP = re.compile(r"^[0-9a-f]{16,128}$")
_REF = re.compile(r"^((defaults|kwdefaults):[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z0-9_]+|alias:[A-Za-z_][A-Za-z0-9_.]*)$")


class BundleError(PatchError):
    """The file is not a valid bundle; nothing was loaded."""

    category = "bundle"


def valid_id(value) -> bool:
    """Whether `value` may name a patch (the rule for a manifest's id):
    what passes is safe to print, store and use in a file name."""
    return isinstance(value, str) and _ID.fullmatch(value) is not None


def _fail(field: str, message: str):
    raise BundleError(f"invalid bundle: {field}: {message}", [Problem("bundle", field, message)])


def canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


# ---------------------------------------------------------------- writing

def code_payload(tag: str, module: str) -> str:
    return f"code/{tag}/{module}"


def source_payload(module: str) -> str:
    return f"source/{module}"


def baseline_payload(module: str) -> str:
    return f"baseline/{module}"


def write(manifest: dict, payloads: dict[str, bytes], private_key=None) -> bytes:
    """Serialise a bundle; fills manifest["payloads"] and every per-target
    digest from `payloads`, signs the canonical manifest if a key is given."""
    manifest = dict(manifest, format=FORMAT)
    manifest["payloads"] = {name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
                            for name, data in payloads.items()}
    for entry in manifest.get("targets", []) + manifest.get("globals", []):
        for code in entry.get("code", {}).values():
            code["sha256"] = manifest["payloads"][code["payload"]]["sha256"]
    body = canonical(manifest)
    signature = b""
    if private_key is not None:
        from .signing import sign
        signature = canonical(sign(private_key, body))
    out = [MAGIC, struct.pack(">I", len(body)), body, struct.pack(">I", len(signature)), signature,
           struct.pack(">I", len(payloads))]
    for name, data in sorted(payloads.items()):
        raw = name.encode()
        out += [struct.pack(">H", len(raw)), raw, struct.pack(">I", len(data)), data]
    return b"".join(out)


# ---------------------------------------------------------------- reading

class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, n: int, field: str) -> bytes:
        if n > len(self.data) - self.pos:
            _fail(field, f"truncated: needs {n} bytes, {len(self.data) - self.pos} left")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def u(self, fmt: str, field: str) -> int:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), field))[0]


@dataclass
class Bundle:
    manifest: dict
    payloads: dict  # name -> bytes, every digest already checked
    signed_by: str | None  # key id that verified it, or None when unsigned or not checked
    manifest_bytes: bytes
    signature: dict | None = None  # the signature block as found, checked or not

    @property
    def id(self) -> str:
        return self.manifest["id"]


def read(data: bytes, trusted_keys=None, *, allow_unsigned: bool = False) -> Bundle:
    """Parse and verify a bundle. `trusted_keys` is {key id: public key}
    (see signing.load_trusted) or a path accepted by load_trusted."""
    if not isinstance(data, (bytes, bytearray)):
        _fail("file", "expected bytes")
    if len(data) > MAX_BUNDLE_BYTES:
        _fail("file", f"{len(data)} bytes is over the limit of {MAX_BUNDLE_BYTES}")
    r = _Reader(bytes(data))
    if r.take(len(MAGIC), "magic") != MAGIC:
        _fail("magic", "not a livepatch bundle (wrong magic bytes)")
    n = r.u(">I", "manifest length")
    if n > MAX_MANIFEST_BYTES:
        _fail("manifest length", f"{n} is over the limit of {MAX_MANIFEST_BYTES}")
    body = r.take(n, "manifest")
    n = r.u(">I", "signature length")
    if n > 1024:
        _fail("signature length", f"{n} is over the limit of 1024")
    sig_raw = r.take(n, "signature")
    count = r.u(">I", "payload count")
    if count > MAX_PAYLOADS:
        _fail("payload count", f"{count} is over the limit of {MAX_PAYLOADS}")
    payloads = {}
    for i in range(count):
        raw = r.take(r.u(">H", f"payload[{i}] name length"), f"payload[{i}] name")
        try:
            name = raw.decode()
        except UnicodeDecodeError:
            _fail(f"payload[{i}] name", "not UTF-8")
        if not _PAYLOAD.fullmatch(name):
            _fail(f"payload[{i}] name", f"{name!r} is not a valid payload name")
        if name in payloads:
            _fail(f"payload[{i}] name", f"duplicate payload {name!r}")
        size = r.u(">I", f"payload {name} length")
        if size > MAX_PAYLOAD_BYTES:
            _fail(f"payload {name} length", f"{size} is over the limit of {MAX_PAYLOAD_BYTES}")
        payloads[name] = r.take(size, f"payload {name}")
    if r.pos != len(r.data):
        _fail("file", f"{len(r.data) - r.pos} unexpected bytes after the last payload")

    signed_by, signature = _check_signature(body, sig_raw, trusted_keys, allow_unsigned)
    manifest = _parse_manifest(body)
    validate(manifest)
    listed = manifest["payloads"]
    for name in sorted(listed.keys() | payloads.keys()):
        if name not in payloads:
            _fail(f"payloads.{name}", "listed in the manifest but missing from the file")
        if name not in listed:
            _fail(f"payloads.{name}", "present in the file but not listed in the manifest")
        if len(payloads[name]) != listed[name]["size"] or hashlib.sha256(payloads[name]).hexdigest() != listed[name]["sha256"]:
            _fail(f"payloads.{name}", "content does not match its digest in the manifest (tampered or corrupted)")
    return Bundle(manifest, payloads, signed_by, body, signature)


def _check_signature(body: bytes, sig_raw: bytes, trusted_keys, allow_unsigned: bool):
    """(key id that verified it or None, the parsed signature block or None)."""
    from .signing import SignatureError, load_trusted, verify
    if not sig_raw:
        if allow_unsigned:
            return None, None
        raise SignatureError("bundle is not signed; refused (unsigned bundles load only when explicitly allowed)",
                             [Problem("signature", "", "unsigned")])
    try:
        sig = json.loads(sig_raw)
    except (ValueError, UnicodeDecodeError):
        _fail("signature", "not JSON")
    if not isinstance(sig, dict) or set(sig) != {"algorithm", "key_id", "signature"} \
            or sig["algorithm"] != "ed25519" or not all(isinstance(v, str) for v in sig.values()):
        _fail("signature", "expected {algorithm: ed25519, key_id, signature}")
    from .signing import form_problem
    problem = form_problem(sig)
    if problem is not None:  # checked even where the signature is not (development mode)
        _fail("signature", problem)
    if not isinstance(trusted_keys, dict):
        trusted_keys = load_trusted(trusted_keys)
    if not trusted_keys:
        if allow_unsigned:
            return None, sig  # development mode: the signature is not checked
        raise SignatureError("no trusted keys configured: cannot verify the bundle's signature",
                             [Problem("signature", "", f"signed by key {sig['key_id']}")])
    return verify(sig, body, trusted_keys), sig


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _parse_manifest(body: bytes) -> dict:
    try:
        manifest = json.loads(body.decode(), object_pairs_hook=_no_duplicates,
                              parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        _fail("manifest", f"not valid JSON ({exc})")
    if not isinstance(manifest, dict):
        _fail("manifest", "must be a JSON object")
    fmt = manifest.get("format")
    if type(fmt) is not int:
        _fail("format", "missing or not an integer")
    if fmt != FORMAT:
        _fail("format", f"bundle format {fmt} is not supported by this livepatch (it reads format {FORMAT})")
    if canonical(manifest) != body:
        _fail("manifest", "not in canonical form (sorted keys, no whitespace)")
    return manifest


# ---------------------------------------------------------------- schema

def _text(limit=MAX_TEXT, pattern=None, optional=False):
    def check(value, field):
        if value is None and optional:
            return
        if not isinstance(value, str):
            _fail(field, f"expected a string, got {type(value).__name__}")
        if len(value) > limit:
            _fail(field, f"longer than {limit} characters")
        if pattern is not None and not pattern.fullmatch(value):  # whole: "$" alone lets a final newline by
            _fail(field, f"{value[:80]!r} is not valid here")
    return check


def _int(lo, hi):
    def check(value, field):
        if type(value) is not int or not lo <= value <= hi:
            _fail(field, f"expected an integer in [{lo}, {hi}]")
    return check


def _bool(value, field):
    if type(value) is not bool:
        _fail(field, "expected true or false")


def _choice(options):
    def check(value, field):
        if value not in options:
            _fail(field, f"{str(value)[:40]!r} is not one of {', '.join(options)}")
    return check


def _list(item, limit, unique=False):
    def check(value, field):
        if not isinstance(value, list):
            _fail(field, "expected a list")
        if len(value) > limit:
            _fail(field, f"more than {limit} entries")
        for i, v in enumerate(value):
            item(v, f"{field}[{i}]")
        if unique and len({json.dumps(v, sort_keys=True) for v in value}) != len(value):
            _fail(field, "duplicate entries")
    return check


def _mapping(key, item, limit):
    def check(value, field):
        if not isinstance(value, dict):
            _fail(field, "expected an object")
        if len(value) > limit:
            _fail(field, f"more than {limit} entries")
        for k, v in value.items():
            key(k, f"{field} key {k[:40]!r}")
            item(v, f"{field}.{k}")
    return check


def _object(spec: dict, optional=()):
    def check(value, field):
        if not isinstance(value, dict):
            _fail(field, "expected an object")
        for k in value:
            if k not in spec:
                name = k if re.fullmatch(r"[A-Za-z0-9_-]{1,40}", k) else repr(k[:40])
                _fail(f"{field}.{name}" if field else name, "unknown field")
        for k, sub in spec.items():
            if k not in value:
                if k in optional:
                    continue
                _fail(f"{field}.{k}" if field else k, "missing")
            sub(value[k], f"{field}.{k}" if field else k)
    return check


def _target_name(value, field):
    _text(512)(value, field)
    module, sep, qualname = value.partition(":")
    if not sep or not _MODULE.fullmatch(module) or not _QUALNAME.fullmatch(qualname):
        _fail(field, f"{value[:80]!r} is not module:qualname")


_code_entry = _object({"baseline": _text(128, _HEXFP), "patched": _text(128, _HEXFP),
                       "payload": _text(300, _PAYLOAD), "sha256": _text(64, _HEX64)}, optional=("baseline",))
_codes = _mapping(_text(16, _TAG), _code_entry, 8)

_SCHEMA = _object({
    "format": _int(FORMAT, FORMAT),
    "id": _text(128, _ID),
    "title": _text(300),
    "description": _text(),
    "references": _list(_text(200), 64, unique=True),
    "classification": _choice(CLASSIFICATIONS),
    "created": _text(64),
    "baseline": _object({"name": _text(200), "version": _text(100)}),
    "requires": _list(_text(128, _ID), 64, unique=True),
    "cumulative": _bool,
    "pythons": _list(_text(16, _TAG), 8, unique=True),
    "targets": _list(_object({
        "target": _target_name, "kind": _choice(KINDS), "allow_active": _bool,
        "defaults": _text(MAX_LITERAL, optional=True), "kwdefaults": _text(MAX_LITERAL, optional=True),
        "file": _text(1024), "line": _int(0, 10**7), "code": _codes,
    }), MAX_TARGETS),
    "globals": _list(_object({
        "name": _target_name, "kind": _choice(("function", "import", "constant", "value", "definition", "statement")),
        "code": _codes, "statement": _text(2000), "value": _text(MAX_LITERAL),
        "defaults": _text(MAX_LITERAL, optional=True), "kwdefaults": _text(MAX_LITERAL, optional=True),
        # values and definitions made at apply time (docs/bundle-format.md#values-and-definitions)
        "expression": _text(MAX_LITERAL), "source": _text(MAX_LITERAL), "line": _int(0, 10**7), "replaces": _bool,
        "refs": _list(_text(600, _REF), 1024, unique=True), "stale": _list(_text(), 1024),
        # a module-level statement run at apply time, and every name it binds (#statements)
        "binds": _list(_text(200, _MODULE), 1024, unique=True), "keeps": _list(_text(200, _MODULE), 1024, unique=True),
        # a value an unchanged statement built at import, made anew with the patch's construction (#recomputed)
        "built": _object({"call": _text(200, _MODULE), "function": _text(600, _MODULE), "reason": _text(),
                          "reads": _list(_text(600, _MODULE), 1024, unique=True),
                          "slots": _mapping(_text(600, _REF), _text(600, _MODULE), 1024),
                          "source": _text(MAX_LITERAL), "line": _int(0, 10**7)}, optional=("source", "line")),
    }, optional=("code", "statement", "value", "defaults", "kwdefaults", "expression", "source", "line",
                 "replaces", "refs", "stale", "binds", "keeps", "built")), MAX_TARGETS),
    "modules": _mapping(_text(200, _MODULE), _object({"file": _text(1024), "source": _text(300, _PAYLOAD),
                                                      "baseline": _text(300, _PAYLOAD)}), 1024),
    "payloads": _mapping(_text(300, _PAYLOAD), _object({"sha256": _text(64, _HEX64),
                                                        "size": _int(0, MAX_PAYLOAD_BYTES)}), MAX_PAYLOADS),
    "overrides": _list(_object({"category": _text(64), "target": _text(600), "message": _text()}), MAX_TARGETS),
    "builder": _object({"livepatch": _text(40)}),
    # Ordering (see docs/bundle-format.md#ordering): absent in bundles made
    # before it existed, which then order below every sequenced bundle.
    "sequence": _int(1, MAX_SEQUENCE),
    "lineage": _text(128, _ID),
    # what the release changed that never runs (docs/bundle-format.md#ignored)
    "ignored": _list(_object({"category": _text(64), "target": _text(600), "message": _text()}), MAX_TARGETS),
    # what the patch leaves in the state the old code built (docs/bundle-format.md#recomputed)
    "warnings": _list(_object({"category": _text(64), "target": _text(600), "message": _text()}), MAX_TARGETS),
    # migration hooks run around apply and rollback (docs/bundle-format.md#hooks)
    "hooks": _object({"file": _text(1024), "payload": _choice((HOOKS_PAYLOAD,)),
                      "functions": _list(_choice(("pre_apply", "post_apply", "pre_rollback", "post_rollback")), 4, unique=True)}),
    # the --only patterns a build selected with, and what they left out
    "selection": _object({"only": _list(_text(512), 64, unique=True), "left_out": _list(_text(600), MAX_TARGETS)}),
    # modules the release adds, importable while the patch is in (docs/bundle-format.md#new-modules)
    "new_modules": _mapping(_text(200, _MODULE), _object({
        "file": _text(1024), "source": _text(300, _PAYLOAD),
        "code": _mapping(_text(16, _TAG), _object({"payload": _text(300, _PAYLOAD), "sha256": _text(64, _HEX64)}), 8),
    }), 1024),
}, optional=("sequence", "lineage", "ignored", "warnings", "hooks", "selection", "new_modules"))


def validate(manifest: dict) -> None:
    """Types, limits, names; cross-references between sections."""
    _SCHEMA(manifest, "")
    if manifest["cumulative"] and manifest["requires"]:
        _fail("requires", "a cumulative bundle cannot also require other patches")
    seen = set()
    for section in ("targets", "globals"):
        for i, entry in enumerate(manifest[section]):
            name = entry["target"] if section == "targets" else entry["name"]
            if name in seen:
                _fail(f"{section}[{i}]", f"duplicate target {name!r}")
            seen.add(name)
            for tag, code in entry.get("code", {}).items():
                if tag not in manifest["pythons"]:
                    _fail(f"{section}[{i}].code.{tag}", "Python not listed in pythons")
                if code["payload"] not in manifest["payloads"]:
                    _fail(f"{section}[{i}].code.{tag}.payload", "not listed in payloads")
                if code["sha256"] != manifest["payloads"][code["payload"]]["sha256"]:
                    _fail(f"{section}[{i}].code.{tag}.sha256", "differs from the payload's digest")
            if section == "targets" and set(entry["code"]) != set(manifest["pythons"]):
                _fail(f"targets[{i}].code", "must carry code for every Python in pythons")
            if section == "targets" and not all("baseline" in c for c in entry["code"].values()):
                _fail(f"targets[{i}].code", "every target needs its baseline fingerprint")
            if section == "globals":
                needed = {"function": "code", "import": "statement", "constant": "value", "value": "expression",
                          "definition": "source", "statement": "source"}[entry["kind"]]
                if needed not in entry:
                    _fail(f"globals[{i}]", f"a {entry['kind']} global needs {needed!r}")
                if entry["kind"] == "statement" and "binds" not in entry:
                    _fail(f"globals[{i}]", "a statement global needs 'binds'")
    for name, module in manifest["modules"].items():
        for key in ("source", "baseline"):
            if module[key] not in manifest["payloads"]:
                _fail(f"modules.{name}.{key}", "not listed in payloads")
    if "hooks" in manifest and manifest["hooks"]["payload"] not in manifest["payloads"]:
        _fail("hooks.payload", "not listed in payloads")
    for name, module in manifest.get("new_modules", {}).items():
        if name in manifest["modules"]:
            _fail(f"new_modules.{name}", "also listed in modules (a module the baseline has)")
        if module["source"] not in manifest["payloads"]:
            _fail(f"new_modules.{name}.source", "not listed in payloads")
        if set(module["code"]) != set(manifest["pythons"]):
            _fail(f"new_modules.{name}.code", "must carry code for every Python in pythons")
        for tag, code in module["code"].items():
            listed = manifest["payloads"].get(code["payload"])
            if listed is None or listed["sha256"] != code["sha256"]:
                _fail(f"new_modules.{name}.code.{tag}", "not a payload of the bundle with that digest")


# ---------------------------------------------------------------- loading

def _literal(text, field):
    if text is None:
        return UNCHANGED
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        _fail(field, "not a Python literal")


def _with_filename(code: types.CodeType, filename: str) -> types.CodeType:
    consts = tuple(_with_filename(c, filename) if isinstance(c, types.CodeType) else c for c in code.co_consts)
    return code.replace(co_filename=filename, co_consts=consts)


def _patched_file(bundle: Bundle, module: str) -> str:
    """The filename code of the bundle for `module` carries (see _module_codes)."""
    from .build import patched_filename
    live = loaded_module(module)
    base_file = getattr(live, "__file__", None) or bundle.manifest["modules"].get(module, {}).get("file", module)
    return patched_filename(base_file, bundle.id)


def _module_codes(bundle: Bundle, tag: str, module: str, cache: dict) -> dict:
    """Unmarshal one module's code (digest already verified) -> qualname map."""
    name = code_payload(tag, module)
    if name not in cache:
        from .build import code_tree, patched_filename
        try:
            code = marshal.loads(bundle.payloads[name])
        except (ValueError, EOFError, TypeError):
            _fail(f"payloads.{name}", "not a marshalled code object for this Python")
        if not isinstance(code, types.CodeType):
            _fail(f"payloads.{name}", "not a code object")
        live = loaded_module(module)
        base_file = getattr(live, "__file__", None) or bundle.manifest["modules"].get(module, {}).get("file", module)
        filename = patched_filename(base_file, bundle.id)
        cache[name] = (code_tree(_with_filename(code, filename)), filename)
    return cache[name]


def ordering(manifest: dict) -> dict:
    """{"sequence", "lineage"} of a validated manifest; 0 and None for a
    bundle made before bundles were ordered."""
    return {"sequence": manifest.get("sequence", 0), "lineage": manifest.get("lineage")}


def digest(bundle: Bundle) -> str:
    """The bundle's identity: SHA-256 of the manifest bytes, which pin every
    payload. Rollback authorisations are bound to it."""
    return hashlib.sha256(bundle.manifest_bytes).hexdigest()


def supported_python(bundle: Bundle, tag: str = PYTHON_TAG) -> None:
    carried = bundle.manifest["pythons"]
    if tag not in carried:
        raise BundleError(f"bundle {bundle.id} carries code for {', '.join(carried)}; this process runs {tag}",
                          [Problem("python-version", "", f"no code for {tag} (carries {', '.join(carried)})")])


def to_patch(bundle: Bundle, tag: str = PYTHON_TAG) -> Patch:
    """The Patch for this interpreter. Runs nothing from the bundle: new
    functions are created in their modules' namespaces now for a module
    that is imported, when its part commits for one that is not (the part
    is then pending); import statements are only checked here and run when
    an apply prepares its commit (pending.AtCommit)."""
    from .fingerprint import fingerprint
    supported_python(bundle, tag)
    m = bundle.manifest
    cache: dict = {}
    sources = {}

    def code_for(entry, field):
        module, _, qualname = (entry.get("target") or entry["name"]).partition(":")
        spec = entry["code"].get(tag)
        if spec is None:
            _fail(f"{field}.code", f"no code for {tag}")
        tree, filename = _module_codes(bundle, tag, module, cache)
        if module in m["modules"]:
            sources[filename] = bundle.payloads[m["modules"][module]["source"]].decode("utf-8", "replace")
        found = tree.get(qualname) or []
        matches = [c for c in found if fingerprint(c) == spec["patched"]]
        if not matches:
            _fail(f"{field}.code.{tag}", f"payload has no code for {qualname} with fingerprint {spec['patched'][:16]}")
        return matches[0]

    changes = []
    for i, t in enumerate(m["targets"]):
        changes.append(Change(t["target"], code_for(t, f"targets[{i}]"), t["code"][tag]["baseline"],
                              allow_active=t["allow_active"],
                              defaults=_literal(t["defaults"], f"targets[{i}].defaults"),
                              kwdefaults=_literal(t["kwdefaults"], f"targets[{i}].kwdefaults"), python=tag))
    new_globals = {}
    for i, g in enumerate(m["globals"]):
        module_name, _, name = g["name"].partition(":")
        # a value that needs its module is built when the module's part
        # commits if the module is not imported yet (the part is pending)
        if g["kind"] == "constant" and not g.get("refs"):
            new_globals[g["name"]] = _literal(g["value"], f"globals[{i}].value")
        elif g["kind"] in ("constant", "value", "definition", "statement"):
            from .values import manifest_value
            filename = _patched_file(bundle, module_name)
            new_globals[g["name"]] = manifest_value(g, f"globals[{i}]", filename, _fail,
                                                    _literal(g.get("value"), f"globals[{i}].value"), new_globals)
            if module_name in m["modules"]:  # tracebacks show the patched lines
                sources[filename] = bundle.payloads[m["modules"][module_name]["source"]].decode("utf-8", "replace")
        elif g["kind"] == "import":
            # checked now, run only on the way to a commit (assess runs nothing)
            tree = _import_tree(g["statement"], name, f"globals[{i}].statement")
            new_globals[g["name"]] = value_for(
                module_name, lambda module, t=tree, n=name: _import_value(t, n, module, new_globals),
                runs_code=g["statement"].strip()[:200])
        else:
            code = code_for(g, f"globals[{i}]")
            defaults = _literal(g.get("defaults"), f"globals[{i}].defaults")
            kw = _literal(g.get("kwdefaults"), f"globals[{i}].kwdefaults")
            new_globals[g["name"]] = value_for(
                module_name, lambda module, c=code, n=name, d=defaults, k=kw: _new_function(c, module, n, d, k))
    metadata = {k: m[k] for k in ("title", "classification", "references", "baseline", "created")}
    metadata.update(signed_by=bundle.signed_by, **ordering(m), bundle_sha256=digest(bundle))
    return Patch(m["id"], changes, cumulative=m["cumulative"], new_globals=new_globals,
                 requires=tuple(m["requires"]), sources=sources, metadata=metadata, hooks=_hooks(bundle, tag))


def _hooks(bundle: Bundle, tag: str = PYTHON_TAG):
    """What runs around the commit: the bundle's migration hooks (compiled,
    not run) and its new modules (unmarshalled, not run); None if neither."""
    entry, added = bundle.manifest.get("hooks"), bundle.manifest.get("new_modules")
    if entry is None and not added:
        return None
    from .hooks import BundleHooks
    modules = None
    if added:
        from .build import patched_filename
        from .newmodules import BundleModules
        carried = {}
        for name, item in added.items():
            try:
                code = marshal.loads(bundle.payloads[item["code"][tag]["payload"]]) if tag in item["code"] else None
            except (ValueError, EOFError, TypeError):
                code = None
            if not isinstance(code, types.CodeType):
                _fail(f"new_modules.{name}.code", f"no code object for {tag}")
            filename = patched_filename(item["file"], bundle.id)
            source = bundle.payloads[item["source"]].decode("utf-8", "replace")
            carried[name] = (_with_filename(code, filename), filename, source, item["file"].endswith("__init__.py"))
        modules = BundleModules(carried)
    try:
        source = None if entry is None else bundle.payloads[entry["payload"]].decode("utf-8")
        return BundleHooks(bundle.id, source, entry["functions"] if entry else (), modules)
    except (UnicodeDecodeError, SyntaxError, ValueError, RecursionError, MemoryError):
        _fail("hooks.payload", "not a Python module this interpreter compiles")


_ABSENT = object()


def _new_function(code, module: types.ModuleType, name: str, defaults, kwdefaults):
    fn = types.FunctionType(code, module.__dict__, name.rpartition(".")[2], None if defaults is UNCHANGED else defaults)
    fn.__kwdefaults__ = None if kwdefaults is UNCHANGED else kwdefaults
    fn.__qualname__ = name
    return fn


def _import_tree(statement: str, name: str, field: str) -> ast.Module:
    """The parsed statement: one import that binds `name` (checked without
    running it)."""
    try:
        tree = ast.parse(statement)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        _fail(field, "not a Python statement")
    if len(tree.body) != 1 or not isinstance(tree.body[0], (ast.Import, ast.ImportFrom)):
        _fail(field, "must be a single import statement")
    node = tree.body[0]
    bound = {(a.asname or (a.name.partition(".")[0] if isinstance(node, ast.Import) else a.name)) for a in node.names}
    if name not in bound:
        _fail(field, f"does not bind {name!r}")
    return tree


def _import_value(tree: ast.Module, name: str, module: types.ModuleType, bundled: dict):
    """What the import statement binds to `name`. A name the same bundle
    adds to the module imported from (a new function imported by another
    patched module) is that new value: the module does not have it until
    the commit."""
    node = tree.body[0]
    if isinstance(node, ast.ImportFrom):
        from importlib.util import resolve_name
        source = resolve_name("." * node.level + (node.module or ""), module.__package__ or module.__name__)
        alias = next(a for a in node.names if (a.asname or a.name) == name)
        value = bundled.get(f"{source}:{alias.name}", _ABSENT)
        if isinstance(value, AtImport) and imported(source) is not None:
            from .values import Recomputed
            value = value.make(imported(source))  # made once: the very object its own module gets
            value = value.value if isinstance(value, Recomputed) else value
        if value is not _ABSENT and value is not UNBOUND and not isinstance(value, AtImport):
            return value
        # only this name: another one of the statement may be such a new value
        tree = ast.Module(body=[ast.ImportFrom(module=node.module, names=[alias], level=node.level)], type_ignores=[])
        ast.fix_missing_locations(tree)
    namespace = {"__name__": module.__name__, "__package__": module.__package__}
    exec(compile(tree, f"<livepatch import in {module.__name__}>", "exec"), namespace)
    return namespace[name]


def load_bundle(source, trusted_keys=None, *, allow_unsigned: bool = False) -> Patch:
    """Read, verify and convert a bundle (a path or bytes) into a Patch for
    the running interpreter. Raises BundleError/SignatureError, never
    partially loads."""
    data = bytes(source) if isinstance(source, (bytes, bytearray)) else read_file(source)
    return to_patch(read(data, trusted_keys, allow_unsigned=allow_unsigned))


def source_diffs(bundle: Bundle) -> dict:
    """module -> unified diff of its baseline and patched source."""
    import difflib
    out = {}
    for module, entry in bundle.manifest["modules"].items():
        old = bundle.payloads[entry["baseline"]].decode("utf-8", "replace").splitlines(keepends=True)
        new = bundle.payloads[entry["source"]].decode("utf-8", "replace").splitlines(keepends=True)
        out[module] = "".join(difflib.unified_diff(old, new, f"a/{entry['file']}", f"b/{entry['file']}"))
    return out
