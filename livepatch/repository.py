"""A patch repository as a client sees it: a directory or an http(s) base
URL holding `catalog.json` (livepatch/catalog.py) and `bundles/ID.lpb`.

Nothing from a repository is used before it is verified: the catalog's
signature against the trusted keys; each bundle's size and SHA-256 against
its catalog entry, then its own signature and manifest (id, baseline,
ordering) against the entry. Verified files are kept in a private cache
directory (0700, ours), so that a repository that cannot be reached is
served from the last verified catalog and the bundles fetched before; a
catalog older than the cached one (a replayed file) is refused."""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass

from . import catalog as fmt
from .catalog import CatalogEntry, CatalogError

HTTP_TIMEOUT = 15.0


class RepositoryError(Exception):
    """One line saying what is wrong with the repository and what to do.
    `verification`: the repository served something that did not verify
    (a bad signature or digest), as opposed to being unreachable or invalid."""

    def __init__(self, message: str, verification: bool = False):
        super().__init__(message)
        self.verification = verification


@dataclass
class CatalogInfo:
    generated: str
    signed_by: str
    offline: bool                  # served from the cache: the repository could not be reached
    problem: str = ""              # why it could not be reached


def default_cache_root() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "livepatch", "repositories")


def _private_dir(path: str) -> str:
    """`path`, created 0700 if missing; refused unless it is a real
    directory of ours that nobody else can write to."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise RepositoryError(f"cache directory {path} is not a private directory of this user "
                              f"(mode {stat.S_IMODE(st.st_mode):o}): remove it or give another --cache-dir")
    return path


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise


def _read_limited(path: str, limit: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise OSError(f"{path} is not a regular file")
        return fh.read(limit + 1)


class Repository:
    def __init__(self, location: str, *, trusted_keys, cache_dir: str | None = None):
        self.location = location.rstrip("/") if "://" in location else os.path.abspath(location)
        self.remote = self.location.startswith(("http://", "https://"))
        if "://" in location and not self.remote:
            raise RepositoryError(f"repository {location}: only a directory or an http:// or https:// URL")
        if isinstance(trusted_keys, dict):
            self.trusted = trusted_keys
        else:
            from .signing import SignatureError, load_trusted
            try:
                self.trusted = load_trusted(trusted_keys)
            except SignatureError as exc:
                raise RepositoryError(str(exc).splitlines()[0]) from None
        if not self.trusted:
            raise RepositoryError("no trusted keys: give the public key the repository's catalog is signed with (--trust)")
        key = hashlib.sha256(self.location.encode()).hexdigest()[:16]
        self.cache_dir = cache_dir or os.path.join(default_cache_root(), key)
        self.info: CatalogInfo | None = None
        self._entries: list[CatalogEntry] | None = None
        self._verified: dict[str, bytes] = {}  # sha256 -> bundle bytes verified by this object

    def __repr__(self):
        return f"Repository({self.location!r})"

    # ------------------------------------------------------------ transport
    def _get(self, relative: str, limit: int) -> bytes:
        """The bytes of `relative` in the repository (at most limit + 1 read);
        OSError when it cannot be reached or read."""
        if not self.remote:
            return _read_limited(os.path.join(self.location, relative), limit)
        import urllib.error
        import urllib.request
        url = f"{self.location}/{relative}"
        try:
            with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as response:
                return response.read(limit + 1)
        except urllib.error.HTTPError as exc:
            raise OSError(f"{url}: HTTP {exc.code} {exc.reason}") from None
        except urllib.error.URLError as exc:
            raise OSError(f"{url}: {exc.reason}") from None
        except (OSError, ValueError) as exc:  # timeouts, resets, malformed URLs
            raise OSError(f"{url}: {exc}") from None

    def _cache(self, *parts) -> str:
        path = _private_dir(self.cache_dir)
        if len(parts) > 1:
            path = _private_dir(os.path.join(path, *parts[:-1]))
        return os.path.join(path, parts[-1])

    # ------------------------------------------------------------ catalog
    def catalog(self, refresh: bool = False) -> list[CatalogEntry]:
        """The verified entries, read from the repository (once per object
        unless `refresh`: assess refreshes), else from the cache when it
        cannot be reached."""
        if self._entries is not None and not refresh:
            return self._entries
        from .signing import SignatureError
        cached_path = self._cache(fmt.FILENAME)
        cached = None
        if os.path.exists(cached_path):
            try:
                cached = fmt.parse(_read_limited(cached_path, fmt.MAX_CATALOG_BYTES), self.trusted,
                                   source=f"cached catalog {cached_path}")
            except (OSError, CatalogError):
                cached = None  # made with a key no longer trusted, or damaged: the repository decides
        try:
            data = self._get(fmt.FILENAME, fmt.MAX_CATALOG_BYTES)
        except OSError as exc:
            if cached is None:
                raise RepositoryError(f"repository {self.location} cannot be reached ({exc}) and nothing "
                                      "of it is cached: check the URL or path") from None
            entries, meta = cached
            self.info = CatalogInfo(meta["generated"], meta["signed_by"], offline=True, problem=str(exc))
            self._entries = entries
            return entries
        try:
            entries, meta = fmt.parse(data, self.trusted, source=f"catalog of {self.location}")
        except SignatureError as exc:
            raise RepositoryError(f"{str(exc).splitlines()[0]}; nothing from this repository is used",
                                  verification=True) from None
        except CatalogError as exc:
            raise RepositoryError(f"{str(exc).splitlines()[0]}; nothing from this repository is used",
                                  verification=True) from None
        if cached is not None and meta["generated"] < cached[1]["generated"]:
            raise RepositoryError(f"catalog of {self.location} was generated at {meta['generated']}, before the "
                                  f"one already seen ({cached[1]['generated']}): an old catalog is being served; "
                                  "nothing from this repository is used", verification=True)
        _write_atomic(cached_path, data)
        self.info = CatalogInfo(meta["generated"], meta["signed_by"], offline=False)
        self._entries = entries
        return entries

    def entry(self, patch_id: str) -> CatalogEntry | None:
        return next((e for e in self.catalog() if e.id == patch_id), None)

    # ------------------------------------------------------------ bundles
    def fetch(self, entry: CatalogEntry) -> bytes:
        """The bytes of `entry`'s bundle, verified (digest, size, signature,
        manifest against the entry): from the cache, else downloaded."""
        if entry.kind != "hotpatch":
            raise RepositoryError(f"{entry.id} exists only as a release ({entry.distribution} "
                                  f"{entry.fixed_in or 'a later version'}): upgrade and restart the service")
        if entry.sha256 in self._verified:
            return self._verified[entry.sha256]
        cached_path = self._cache("bundles", f"{entry.sha256}.lpb")
        try:
            data = _read_limited(cached_path, entry.size)
            if hashlib.sha256(data).hexdigest() == entry.sha256:
                self._check_bundle(entry, data)
                self._verified[entry.sha256] = data
                return data
        except (OSError, RepositoryError):
            pass  # not cached, or damaged: fetched again
        try:
            data = self._get(entry.path, entry.size)
        except OSError as exc:
            raise RepositoryError(f"cannot fetch {entry.id} from {self.location} ({exc}) and it is not cached") from None
        if len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.sha256:
            raise RepositoryError(f"bundle {entry.id} from {self.location} does not match its catalog entry "
                                  f"({len(data)} bytes, SHA-256 {hashlib.sha256(data).hexdigest()[:16]}..., expected "
                                  f"{entry.size} bytes, {entry.sha256[:16]}...): tampered or damaged; not used",
                                  verification=True)
        self._check_bundle(entry, data)
        _write_atomic(cached_path, data)
        self._verified[entry.sha256] = data
        return data

    def _check_bundle(self, entry: CatalogEntry, data: bytes) -> None:
        from .bundle import read
        from .errors import PatchError
        try:
            bundle = read(data, self.trusted, allow_unsigned=False)
        except PatchError as exc:
            raise RepositoryError(f"bundle {entry.id} from {self.location}: {str(exc).splitlines()[0]}; not used",
                                  verification=True) from None
        m = bundle.manifest
        said = {"id": m["id"], "baseline": m["baseline"], "sequence": m.get("sequence", 0),
                "lineage": m.get("lineage"), "cumulative": m["cumulative"], "requires": list(m["requires"]),
                "classification": m["classification"]}
        listed = {"id": entry.id, "baseline": entry.baseline, "sequence": entry.sequence, "lineage": entry.lineage,
                  "cumulative": entry.cumulative, "requires": list(entry.requires),
                  "classification": entry.classification}
        differ = [k for k in said if said[k] != listed[k]]
        if differ:
            raise RepositoryError(f"bundle {entry.id} from {self.location} says other {', '.join(differ)} than its "
                                  "catalog entry; not used", verification=True)
