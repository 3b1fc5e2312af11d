"""The bundles applied to a service, kept so that a fix survives a
restart: `applied.json` (their ordered records) and `bundles/` (their bytes)
in its state directory; a record that no longer applies here is retired
to `retired/` with a history entry."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re

# hashlib is imported where used: an agent that records nothing never needs it
from .history_file import History, now_iso
from .state_dir import UnsafeState

MAX_RECORDS = 256
_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}\.lpb")
_HEX64 = re.compile(r"[0-9a-f]{64}")


class Records(History):
    """The applied records of a state directory, and their bundles.
    Retiring one writes its history entry under the same lock."""

    def records(self) -> list[dict]:
        raw = self._read_or_warn("applied.json", "applied")
        if raw is None:
            return []
        try:
            value = json.loads(raw)
            if not isinstance(value, list):
                raise ValueError("not a list")
        except (ValueError, UnicodeDecodeError) as exc:
            self._warn_once("applied", f"{self.path}/applied.json is corrupt ({str(exc)[:80]}); treating it as empty")
            return []
        out = []
        for rec in value[:MAX_RECORDS]:
            if (isinstance(rec, dict) and isinstance(rec.get("id"), str) and isinstance(rec.get("file"), str)
                    and _FILE.fullmatch(rec["file"]) and isinstance(rec.get("sha256"), str) and _HEX64.fullmatch(rec["sha256"])):
                out.append(rec)
            else:
                self._warn_once("applied-entry", f"{self.path}/applied.json has an invalid record; ignoring it")
        return out

    def _store_records(self, records: list[dict]) -> None:
        self._write("applied.json", json.dumps(records, indent=1).encode() + b"\n")

    def record(self, data: bytes, manifest: dict, signed_by=None) -> dict:
        """Keep the bundle bytes and append its record (idempotent: the same
        bytes are recorded once; a new build of the same id replaces the
        older one in place)."""
        import hashlib
        digest = hashlib.sha256(data).hexdigest()
        patch_id = manifest["id"]
        rec = {"id": patch_id, "file": f"{patch_id}-{digest[:16]}.lpb", "sha256": digest,
               "classification": manifest.get("classification"), "title": manifest.get("title"),
               "baseline": dict(manifest.get("baseline") or {}), "cumulative": bool(manifest.get("cumulative")),
               "signed_by": signed_by, "applied_at": now_iso(), "pid": os.getpid()}
        with self.locked():
            records = self.records()
            for old in records:
                if old["sha256"] == digest and old["id"] == patch_id:
                    return old
            path = os.path.join("bundles", rec["file"])
            existing = self._read(path)
            if existing is None or hashlib.sha256(existing).hexdigest() != digest:
                self._write(path, data)
            replaced = [r for r in records if r["id"] == patch_id]
            if replaced:
                records = [rec if r["id"] == patch_id else r for r in records]
                for r in replaced:
                    if r["file"] != rec["file"]:
                        with contextlib.suppress(OSError):
                            os.unlink(os.path.join(self.path, "bundles", r["file"]))
            else:
                records.append(rec)
            self._store_records(records)
        return rec

    def remove(self, ids) -> list[str]:
        """Forget the records of rolled-back patches (idempotent)."""
        ids = set(ids)
        with self.locked():
            records = self.records()
            gone = [r for r in records if r["id"] in ids]
            if not gone:
                return []
            self._store_records([r for r in records if r["id"] not in ids])
            for r in gone:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.path, "bundles", r["file"]))
        return [r["id"] for r in gone]

    def retire(self, patch_id: str, reason: str, sha256: str | None = None) -> dict | None:
        """Move a record out of the applied list (its bundle to retired/)
        and write the history entry; None when it was not recorded (another
        process retired it first)."""
        with self.locked():
            records = self.records()
            gone = [r for r in records if r["id"] == patch_id and (sha256 is None or r["sha256"] == sha256)]
            if not gone:
                return None
            self._store_records([r for r in records if r not in gone])
            for r in gone:
                with contextlib.suppress(OSError):
                    dest = os.path.join(self.path, "retired", r["file"])
                    os.replace(os.path.join(self.path, "bundles", r["file"]), dest)
                    os.utime(dest)  # kept as long as the history that names it
            entry = {"time": now_iso(), "pid": os.getpid(), "action": "retire", "patch": patch_id,
                     "classification": gone[0].get("classification"), "outcome": "ok", "reason": reason,
                     "file": os.path.join("retired", gone[0]["file"])}
            self._append_locked(entry)
        return entry

    def read_bundle(self, rec: dict) -> bytes:
        """The recorded bytes, checked against the recorded digest."""
        import hashlib

        from livepatch.bundlefile import MAX_BUNDLE_BYTES
        name = os.path.join("bundles", rec["file"])
        try:
            data = self._read(name)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafeState(f"{name} is a symlink") from None
            raise UnsafeState(f"cannot read {name}: {exc.strerror}") from None
        if data is None:
            raise UnsafeState(f"{name} is missing")
        if len(data) > MAX_BUNDLE_BYTES:
            raise UnsafeState(f"{name} is over the bundle size limit")
        if hashlib.sha256(data).hexdigest() != rec["sha256"]:
            raise UnsafeState(f"{name} does not match its recorded SHA-256 (tampered or corrupted)")
        return data
