"""Maintaining a repository directory: adding bundles (and fixes that exist
only as a release) to it and re-signing its catalog (livepatch/catalog.py).
Any static web server can then serve the directory.

A bundle is added only if its signature verifies (against --trust, else
the catalog's own key) and its id is new, or already listed with the same
bytes; the catalog already there must verify with the signing key. Files
are written through temporary files and renamed, the catalog last, under
a lock, so that a client never sees a catalog naming a missing bundle."""

from __future__ import annotations

import contextlib
import os

from . import catalog as fmt
from .catalog import CatalogEntry, CatalogError


class PublishError(Exception):
    def __init__(self, message: str, verification: bool = False):
        super().__init__(message)
        self.verification = verification


@contextlib.contextmanager
def _locked(directory: str):
    import fcntl
    fd = os.open(os.path.join(directory, ".lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _own_keys(private_key) -> dict:
    from .signing import _public_raw, key_id
    public = private_key.public_key()
    return {key_id(_public_raw(public)): public}


def existing(directory: str, private_key) -> list[CatalogEntry]:
    path = os.path.join(directory, fmt.FILENAME)
    if not os.path.exists(path):
        return []
    from .repository import _read_limited
    from .signing import SignatureError
    try:
        entries, _ = fmt.parse(_read_limited(path, fmt.MAX_CATALOG_BYTES), _own_keys(private_key), source=path)
    except SignatureError as exc:
        raise PublishError(f"{str(exc).splitlines()[0]}: sign with the key the catalog was made with", True) from None
    except CatalogError as exc:
        raise PublishError(str(exc).splitlines()[0], True) from None
    return entries


def add(directory: str, private_key, *, bundles=(), releases=(), trusted=None) -> list[CatalogEntry]:
    """Add `bundles` (file paths) and `releases` (baseline CatalogEntry
    objects) to the repository in `directory`; returns the entries added
    (an identical re-add adds nothing). Raises PublishError with one line;
    nothing is changed then."""
    from .bundle import read
    from .errors import PatchError
    from .repository import _write_atomic
    if not os.path.isdir(directory):
        raise PublishError(f"repository {directory} is not a directory (create it first)")
    trusted = trusted or _own_keys(private_key)
    existing(directory, private_key)  # the catalog's own key first: a wrong --key is named as such
    staged = []
    for path in bundles:
        try:
            from .bundlefile import read_file
            data = read_file(path)
        except OSError as exc:
            raise PublishError(f"cannot read {path}: {exc.strerror}") from None
        try:
            bundle = read(data, trusted, allow_unsigned=False)
        except PatchError as exc:
            raise PublishError(f"{path}: {str(exc).splitlines()[0]}; not added", True) from None
        staged.append((fmt.entry_for_bundle(bundle, data), data))
    with _locked(directory):
        entries = existing(directory, private_key)
        by_id = {e.id: e for e in entries}
        added = []
        for entry, data in staged:
            old = by_id.get(entry.id)
            if old is not None:
                if old.sha256 == entry.sha256:
                    continue
                raise PublishError(f"{entry.id} is already in the catalog with other content: a changed fix needs "
                                   "a new id (or a higher --sequence in its lineage)")
            by_id[entry.id] = entry
            added.append((entry, data))
        new_releases = []
        for entry in releases:
            if entry.id in by_id:
                if by_id[entry.id].kind == "baseline":
                    continue
                raise PublishError(f"{entry.id} is already in the catalog as a hotpatch")
            by_id[entry.id] = entry
            new_releases.append(entry)
        if not added and not new_releases:
            return []
        try:
            text = fmt.render(list(by_id.values()), private_key)
        except CatalogError as exc:
            raise PublishError(str(exc).splitlines()[0]) from None
        os.makedirs(os.path.join(directory, fmt.BUNDLE_DIR), mode=0o755, exist_ok=True)
        for entry, data in added:  # bundles first: the catalog never names a missing file
            _write_atomic(os.path.join(directory, entry.path), data)
            os.chmod(os.path.join(directory, entry.path), 0o644)
        _write_atomic(os.path.join(directory, fmt.FILENAME), text)
        os.chmod(os.path.join(directory, fmt.FILENAME), 0o644)
        return [e for e, _ in added] + new_releases
