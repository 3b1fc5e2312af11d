"""Reading the builder's source trees without trusting them.

A tree handed to the builder may come from anyone who can write a patch, so
nothing in it is followed or opened blindly: only regular files inside the
tree are read; a symbolic link that leaves the tree, and a FIFO, device or
socket where a module should be, is refused with its path; links to
directories are never followed (one inside the tree is skipped and
reported, one leading out is refused), with one exception: a baseline tree
may be made of links, at its top, to package directories (a baseline that
links to the deployed release), and each such package is then a tree of its
own for every check; sizes, file counts and directory entries are bounded. Sources are decoded exactly as the import system
decodes them (PEP 263 cookie or BOM, then universal newlines), so the code
compiled from them is the code a process compiles at import."""

from __future__ import annotations

import errno
import io
import os
import stat
import tokenize

MAX_FILE_BYTES = 16 << 20  # one source file (a bundle payload is at most this too)
MAX_TREE_BYTES = 512 << 20  # everything read from one tree
MAX_TREE_FILES = 100_000  # module files in one tree
MAX_TREE_ENTRIES = 1_000_000  # directory entries looked at in one tree
MAX_METADATA_BYTES = 1 << 20

_SKIP_DIRS = {"__pycache__", ".git", ".hg", ".svn", ".tox", ".venv"}
_SKIP_SUFFIXES = (".dist-info", ".data", ".egg-info")
# O_NONBLOCK: opening a FIFO must never wait for a writer; O_NOCTTY: a
# terminal device never becomes ours. Both are refused after fstat anyway.
_OPEN_FLAGS = (os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
               | getattr(os, "O_NOCTTY", 0))


class UnsafeEntry(Exception):
    """An entry the builder refuses to read (the message names its path)."""


class Unreadable(Exception):
    """A tree or file that cannot be read at all (missing, permissions, I/O)."""


class DecodeFailed(Exception):
    """A source whose bytes Python would not decode; `line` where known."""

    def __init__(self, message: str, line: int | None = None):
        super().__init__(message)
        self.line = line


def kind_of(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "not a regular file"


def decode_source(data: bytes) -> str:
    """Text of a Python source as import decodes it (importlib's
    decode_source, with errors a person can act on)."""
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
    except SyntaxError as exc:
        raise DecodeFailed(f"bad encoding declaration: {exc.msg if hasattr(exc, 'msg') else exc}") from None
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        declared = "" if encoding == "utf-8" else f" (declared {encoding})"
        raise DecodeFailed(f"not valid {encoding}{declared}: {exc.reason} at byte {exc.start}"
                           + ("; declare the file's encoding (PEP 263)" if not declared else ""), line) from None
    except LookupError as exc:  # a cookie naming a bytes-to-bytes codec such as hex
        raise DecodeFailed(f"bad encoding declaration: {exc}") from None
    return io.IncrementalNewlineDecoder(None, translate=True).decode(text, final=True)


class SourceTree:
    """One tree: its modules (name -> path relative to the tree) found
    without following links, and bounded, type-checked reads of them."""

    def __init__(self, path: str, label: str, *, follow_top_packages: bool = False):
        self.path, self.label, self._follow_top = path, label, follow_top_packages
        if not os.path.lexists(path):
            raise Unreadable(f"{label} directory {path} does not exist")
        if not os.path.isdir(path):
            raise Unreadable(f"{label} {path} is not a directory")
        # the operator may name the tree through a link (a "current" release
        # link): containment is judged against where it really is
        self.abs = os.path.abspath(path)
        self.real = os.path.realpath(path)
        self.bytes_read = 0
        self.skipped: list[str] = []  # one line per entry not followed
        self.refused: list[str] = []  # one line per entry refused
        self._read_path: dict[str, tuple[str, str]] = {}  # rel -> (path opened, real dir it must stay in)
        self.modules = self._discover()

    def shown(self, rel: str) -> str:
        return os.path.join(self.path, rel)

    def _inside(self, real: str, base: str | None = None) -> bool:
        base = base or self.real
        return real == base or real.startswith(base.rstrip(os.sep) + os.sep)

    # ------------------------------------------------------------ discovery

    def _discover(self) -> dict[str, str]:
        """module name -> path relative to the tree, for a package directory
        (has __init__.py: its name prefixes every module) or a directory of
        modules and packages such as an unpacked wheel (dist-info and data
        dirs skipped)."""
        is_package = os.path.isfile(os.path.join(self.abs, "__init__.py"))  # a stat, nothing opened
        prefix = [os.path.basename(self.abs)] if is_package else []
        out: dict[str, str] = {}
        entries = 0
        stack = [("", self.real)]
        while stack:
            rel_dir, base = stack.pop()
            listing = []
            try:
                with os.scandir(os.path.join(self.abs, rel_dir)) as it:
                    for entry in it:  # counted as they come: a huge directory is never held whole
                        entries += 1
                        if entries > MAX_TREE_ENTRIES:
                            raise UnsafeEntry(f"{self.path}: more than {MAX_TREE_ENTRIES} directory entries; "
                                              f"give the builder the application's tree, not a whole filesystem")
                        listing.append(entry)
            except OSError as exc:
                raise Unreadable(f"cannot read {self.shown(rel_dir) if rel_dir else self.path}: "
                                 f"{exc.strerror}") from None
            listing.sort(key=lambda e: e.name)
            subdirs = []
            for entry in listing:
                name, rel = entry.name, os.path.join(rel_dir, entry.name)
                if name in _SKIP_DIRS or name.endswith(_SKIP_SUFFIXES):
                    continue
                is_module = name.endswith(".py") and name[:-3].isidentifier()
                if not is_module and not name.isidentifier():
                    continue  # cannot be part of an importable name: never looked into
                try:
                    mode = entry.stat(follow_symlinks=False).st_mode
                except OSError as exc:
                    raise Unreadable(f"cannot read {self.shown(rel)}: {exc.strerror}") from None
                if stat.S_ISLNK(mode):
                    package = self._linked_package(rel) if not rel_dir and not is_module else None
                    if package is not None:
                        subdirs.append((rel, package))
                        continue
                    read_path = self._follow_link(rel, is_module, base)
                    if read_path is None:
                        continue
                elif stat.S_ISDIR(mode):
                    subdirs.append((rel, base))
                    continue
                elif not is_module:
                    continue
                elif not stat.S_ISREG(mode):
                    self.refused.append(f"{self.shown(rel)}: {kind_of(mode)}, not a regular file")
                    continue
                else:
                    read_path = os.path.join(self.abs, rel)
                parts = prefix + rel[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts.pop()
                if parts:
                    out[".".join(parts)] = rel
                    self._read_path[rel] = (read_path, base)
                    if len(out) > MAX_TREE_FILES:
                        raise UnsafeEntry(f"{self.path}: more than {MAX_TREE_FILES} module files")
            stack.extend(reversed(subdirs))
        return out

    def _linked_package(self, rel: str) -> str | None:
        """The real directory of a baseline's top-level link to a package
        outside the tree, when it may be walked as a tree of its own."""
        if not self._follow_top:
            return None
        target = os.path.realpath(os.path.join(self.abs, rel))
        if self._inside(target) or self._inside(self.real, target):
            return None  # inside the tree (skipped), or an ancestor of it (refused): never walked
        try:
            is_dir = stat.S_ISDIR(os.lstat(target).st_mode)
            has_init = is_dir and stat.S_ISREG(os.lstat(os.path.join(target, "__init__.py")).st_mode)
        except OSError:
            return None
        return target if has_init else None

    def _follow_link(self, rel: str, is_module: bool, base: str) -> str | None:
        """Where a link inside the tree may be read from, or None when it
        is skipped; a link leaving the tree is refused."""
        shown = self.shown(rel)
        target = os.path.realpath(os.path.join(self.abs, rel))
        if not self._inside(target, base):
            self.refused.append(f"{shown}: a symbolic link to {target}, outside the tree")
            return None
        try:
            mode = os.lstat(target).st_mode
        except OSError:
            self.refused.append(f"{shown}: a symbolic link to {target}, which does not exist")
            return None
        if stat.S_ISDIR(mode):
            self.skipped.append(f"{shown}: a link to a directory (not followed)")
            return None
        if not is_module:
            return None
        if not stat.S_ISREG(mode):
            self.refused.append(f"{shown}: a symbolic link to {kind_of(mode)}, not a regular file")
            return None
        return target

    # ------------------------------------------------------------ reading

    def read_bytes(self, rel: str, limit: int = MAX_FILE_BYTES) -> bytes:
        """The bytes of a file found by discovery (or of `rel` itself, with
        the same checks), refusing anything but a regular file in the tree."""
        shown = self.shown(rel)
        path, base = self._read_path.get(rel) or (os.path.join(self.abs, rel), self.real)
        try:
            fd = os.open(path, _OPEN_FLAGS)
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # replaced by a link since it was looked at
                raise UnsafeEntry(f"{shown}: a symbolic link, not a regular file") from None
            if exc.errno == errno.ENXIO:  # a socket
                raise UnsafeEntry(f"{shown}: a socket, not a regular file") from None
            raise Unreadable(f"cannot read {shown}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise UnsafeEntry(f"{shown}: {kind_of(st.st_mode)}, not a regular file")
            self._check_opened(fd, shown, base)
            if st.st_size > limit:
                raise UnsafeEntry(f"{shown}: {st.st_size} bytes, over the limit of {limit} for one file")
            if self.bytes_read + st.st_size > MAX_TREE_BYTES:
                raise UnsafeEntry(f"{self.path}: more than {MAX_TREE_BYTES} bytes of sources")
            chunks, size = [], 0
            while size <= limit:  # the file may grow while it is read
                chunk = os.read(fd, min(1 << 20, limit + 1 - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            if size > limit:
                raise UnsafeEntry(f"{shown}: over the limit of {limit} bytes for one file")
            self.bytes_read += size
            return b"".join(chunks)
        except OSError as exc:
            raise Unreadable(f"cannot read {shown}: {exc.strerror}") from None
        finally:
            os.close(fd)

    def _check_opened(self, fd: int, shown: str, base: str) -> None:
        # a directory on the way swapped for a link after discovery: the
        # kernel's name for the open file says where it really is
        try:
            where = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return  # no /proc: the checks made during discovery stand
        if where.startswith("/") and not self._inside(where, base):
            raise UnsafeEntry(f"{shown}: resolves to {where}, outside the tree")

    def read_source(self, rel: str) -> str:
        return decode_source(self.read_bytes(rel))

    def distribution_info(self) -> tuple[str, str] | None:
        """(name, version) from an unpacked wheel's *.dist-info/METADATA."""
        try:
            names = sorted(os.listdir(self.abs))
        except OSError as exc:
            raise Unreadable(f"cannot read {self.path}: {exc.strerror}") from None
        for entry in names:
            dist = os.path.join(self.abs, entry)
            if not entry.endswith(".dist-info") or os.path.islink(dist) or not os.path.isdir(dist):
                continue
            rel = os.path.join(entry, "METADATA")
            if not os.path.lexists(os.path.join(self.abs, rel)):
                continue
            meta = os.path.join(self.abs, rel)
            if os.path.islink(meta):
                target = os.path.realpath(meta)
                if not self._inside(target):
                    raise UnsafeEntry(f"{self.shown(rel)}: a symbolic link to {target}, outside the tree")
                self._read_path[rel] = (target, self.real)
            fields = {}
            for line in self.read_bytes(rel, MAX_METADATA_BYTES).decode("utf-8", "replace").splitlines():
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.strip()
            if "name" in fields and "version" in fields:
                return fields["name"], fields["version"]
        return None
