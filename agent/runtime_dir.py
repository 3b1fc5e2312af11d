"""Where control sockets live, and the checks both ends apply to them.

The candidate directories for uid U, in order:

1. `$XDG_RUNTIME_DIR/livepatch`, when that directory is U's;
2. `/run/user/U/livepatch`, when `/run/user/U` exists and is U's;
3. `<temp dir>/livepatch-U` (`$TMPDIR`, else `/tmp`);
4. `/run/livepatch`, for root;
5. `~/.cache/livepatch/run` (`$HOME`, else U's passwd entry).

The agent uses the first one it can create or find safe; the client looks
through the same list, computed from the target's environment, with the
same checks. A directory is safe when it is a real directory (not a
symlink), owned by U, with no group or other permission bits, and every
directory above it is owned by root or U and writable by nobody else
(unless sticky, like /tmp): then nobody else can plant, replace or reach a
socket in it. A directory in /tmp that someone else created first (or left
open) is refused, and the next candidate is used, so such a plant can
neither impersonate an agent nor stop a service from starting."""

from __future__ import annotations

import _socket
import errno
import os
import stat
import sys


class UnsafeDirectory(Exception):
    pass


_UCRED_SIZE = 12  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}, native byte order


def peer_credentials(conn) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket."""
    # read without the struct module: a `livepatch status` imports nothing it can do without
    data = conn.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, _UCRED_SIZE)
    return (int.from_bytes(data[0:4], sys.byteorder, signed=True), int.from_bytes(data[4:8], sys.byteorder),
            int.from_bytes(data[8:12], sys.byteorder))


def candidates(uid: int | None = None, env=None, every_temp: bool = False) -> list[str]:
    """Socket directories for `uid` in the order the agent tries them.
    `env` is the environment of the process concerned (default: ours when
    `uid` is ours, else none: only the fixed locations). `every_temp`
    (for clients) includes every temporary directory the agent might have
    chosen, since only it could tell which of them it may write."""
    uid = os.getuid() if uid is None else uid
    env = _env_of(uid, env)
    out = []
    xdg = env.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isabs(xdg):
        out.append(os.path.join(xdg, "livepatch"))
    out.append(f"/run/user/{uid}/livepatch")
    for root in (_temp_roots(env) if every_temp else [_temp_root(env)]):
        out.append(os.path.join(root, f"livepatch-{uid}"))
    if uid == 0:
        out.append("/run/livepatch")
    home = _home_fallback(uid, env)
    if home:
        out.append(home)
    return list(dict.fromkeys(os.path.normpath(p) for p in out))


def check(path: str, uid: int | None = None) -> None:
    """Raise UnsafeDirectory unless `path` is a real directory owned by
    `uid` with no group/other permissions."""
    uid = os.getuid() if uid is None else uid
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeDirectory(f"{path} is a symlink")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeDirectory(f"{path} is not a directory")
    if st.st_uid != uid:
        raise UnsafeDirectory(f"{path} is owned by uid {st.st_uid}, not {uid}")
    if st.st_mode & 0o077:
        raise UnsafeDirectory(f"{path} has mode {stat.S_IMODE(st.st_mode):o}, not 700")


def check_path(path: str, uid: int | None = None) -> None:
    """check(), and every directory above `path` (as written and as
    resolved) owned by root or `uid` and not writable by anyone else unless
    sticky: otherwise its owner could move ours away and put another in."""
    uid = os.getuid() if uid is None else uid
    path = os.path.abspath(path)
    check(path, uid)
    parent = os.path.dirname(path)
    for above in dict.fromkeys(_prefixes(parent) + _prefixes(os.path.realpath(parent))):
        st = os.stat(above)
        if st.st_uid not in (0, uid):
            raise UnsafeDirectory(f"{above} (above {path}) is owned by uid {st.st_uid}")
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise UnsafeDirectory(f"{above} (above {path}) is writable by others")


def check_socket(path: str, uid: int) -> None:
    """The socket file itself: a socket (not a symlink to one), owned by `uid`."""
    st = os.lstat(path)
    if not stat.S_ISSOCK(st.st_mode):
        raise UnsafeDirectory(f"{path} is not a socket")
    if st.st_uid != uid:
        raise UnsafeDirectory(f"{path} is owned by uid {st.st_uid}, not {uid}")


def usable(reasons: list, uid: int | None = None, env=None):
    """Yield, in order, each candidate directory that is safe, creating it
    (0700; as root for another uid, handed over to that uid) where its
    parent allows. Why each existing candidate was refused is appended to
    `reasons`; candidates that cannot be created are skipped quietly."""
    uid = os.getuid() if uid is None else uid
    home = _home_fallback(uid, _env_of(uid, env))
    for path in candidates(uid, env):
        try:
            _create(path, uid, path == home)
        except OSError:
            continue  # no such parent, read-only, not ours to create: not a place to use
        try:
            check_path(path, uid)
        except UnsafeDirectory as exc:
            reasons.append(str(exc))
            continue
        except OSError as exc:
            reasons.append(f"{path}: {exc.strerror or exc}")
            continue
        yield path


def ensure(path: str | None = None, uid: int | None = None, env=None) -> str:
    """The directory for a socket of `uid` (default ours): `path` if given,
    else the first safe candidate, created safely. Raises UnsafeDirectory."""
    uid = os.getuid() if uid is None else uid
    if path is not None:
        path = os.path.abspath(path)
        # atomic: either we create it (0700, ours) or it existed and is checked
        _mkdir_in(os.path.dirname(path), os.path.basename(path), uid)
        check_path(path, uid)
        return path
    reasons: list = []
    for found in usable(reasons, uid, env):
        return found
    raise UnsafeDirectory(nowhere(reasons))


def nowhere(reasons) -> str:
    return "no safe directory for the control socket" + (f" ({'; '.join(reasons)})" if reasons else "")


def socket_name(pid: int) -> str:
    return f"{pid}.sock"


def _create(path: str, uid: int, in_home: bool) -> None:
    """mkdir the candidate `path` unless it exists. The parents of
    /run/user/U and $XDG_RUNTIME_DIR are the login manager's to make; the
    home fallback gets its .cache levels created (0700) as needed."""
    if os.path.lexists(path):
        return
    parent = os.path.dirname(path)
    if in_home:
        cache = os.path.dirname(parent)
        _mkdir_in(os.path.dirname(cache), os.path.basename(cache), uid)
        _mkdir_in(cache, os.path.basename(parent), uid)
    elif parent.startswith("/run/user/"):
        st = os.lstat(parent)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid:
            raise FileNotFoundError(parent)  # not a login session directory of this user
    _mkdir_in(parent, os.path.basename(path), uid)


def _mkdir_in(parent: str, name: str, uid: int) -> None:
    """mkdir parent/name, 0700, for `uid`. It is done relative to the open
    parent, so the directory checked is the one written to; and root making
    it for another user (attach) does so only where that user could have
    made it (its own directory, or a world-writable one like /tmp), then
    hands it over: paths from that user's environment never lead root to
    create something of theirs anywhere else."""
    fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        other = uid != os.getuid()
        if other:
            st = os.fstat(fd)
            if st.st_uid != uid and not st.st_mode & 0o002:
                raise PermissionError(errno.EACCES, f"{parent} is not a directory uid {uid} may create in")
        try:
            os.mkdir(name, 0o700, dir_fd=fd)
        except FileExistsError:
            return
        if other:  # until now it is root's and 0700: nobody else could use it meanwhile
            os.chown(name, uid, -1, dir_fd=fd, follow_symlinks=False)
    finally:
        os.close(fd)


def open_checked(path: str, uid: int) -> int:
    """An open descriptor of the directory `path` after check_path(), itself
    checked again (not a symlink, `uid`'s, 0700): files made relative to it
    land in the directory that was checked, whatever happens to the path."""
    check_path(path, uid)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    st = os.fstat(fd)
    if st.st_uid != uid or st.st_mode & 0o077:
        os.close(fd)
        raise UnsafeDirectory(f"{path} changed while it was being checked")
    return fd


def _env_of(uid: int, env):
    """Our environment says where our own agent would go, not another user's."""
    if env is None:
        return os.environ if uid == os.getuid() else {}
    return env


def _prefixes(path: str) -> list[str]:
    out = []
    while True:
        out.append(path)
        up = os.path.dirname(path)
        if up == path:
            return out
        path = up


def _home_fallback(uid: int, env) -> str | None:
    home = env.get("HOME")
    if not (home and os.path.isabs(home)):
        try:
            import pwd  # a builtin module: cheap, and only when HOME is unset
            home = pwd.getpwuid(uid).pw_dir
        except (KeyError, ImportError):
            return None
    return os.path.normpath(os.path.join(home, ".cache", "livepatch", "run")) if home and os.path.isabs(home) else None


def _temp_root(env=None) -> str:
    """The directory tempfile.gettempdir() would choose, without importing
    tempfile into the service (it pulls in shutil, random, bz2 and lzma)."""
    env = os.environ if env is None else env
    for var in ("TMPDIR", "TEMP", "TMP"):
        path = env.get(var)
        if path and os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK):
            return os.path.abspath(path)
    return "/tmp"


def _temp_roots(env) -> list[str]:
    """Every directory _temp_root() could have chosen in a process with
    `env` (whether it may write there depends on that process's uid)."""
    out = [os.path.abspath(env[var]) for var in ("TMPDIR", "TEMP", "TMP")
           if env.get(var) and os.path.isabs(env[var]) and os.path.isdir(env[var])]
    return list(dict.fromkeys(out + ["/tmp"]))


# ---------------------------------------------------------------- files read through a path

def resolve_checked(path: str, uid: int | None = None, limit: int = 40) -> tuple[str, os.stat_result]:
    """Follow `path` one component at a time, as the kernel does, checking
    every lookup on the way (symlinks included, so a Kubernetes secret's
    `key.pub -> ..data/key.pub -> ..2026_.../key.pub` works when each hop
    is safe): each directory a name is looked up in must be owned by root
    or `uid` and writable by nobody else, unless it is sticky and the entry
    is root's or `uid`'s, or it sits on a read-only mount; every symlink
    must be root's or `uid`'s. Returns the resolved path and its lstat.
    Raises UnsafeDirectory naming the place and the problem (a link loop
    too), or OSError (a missing component)."""
    uid = os.getuid() if uid is None else uid
    path = os.path.abspath(path)
    todo = path.split("/")[::-1]
    here, st, hops = "/", os.lstat("/"), 0
    while todo:
        name = todo.pop()
        if name in ("", "."):
            continue
        if name == "..":
            here = os.path.dirname(here)
            st = os.lstat(here)
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise UnsafeDirectory(f"{here} (on the way to {path}) is not a directory")
        where = os.path.join(here, name)
        entry = os.lstat(where)
        _check_lookup(here, st, where, entry, uid, path)
        if stat.S_ISLNK(entry.st_mode):
            hops += 1
            if hops > limit:
                raise UnsafeDirectory(f"too many levels of symbolic links on the way to {path} (a loop at {where})")
            target = os.readlink(where)
            if target.startswith("/"):
                here, st = "/", os.lstat("/")
            todo.extend(target.split("/")[::-1])
            continue
        here, st = where, entry
    return here, st


def check_owned(path: str, st: os.stat_result, uid: int | None = None) -> None:
    """What `path` (its lstat `st`) itself must be to be relied on: root's
    or `uid`'s, and writable by nobody else (a sticky directory may be, its
    entries are checked one by one; a read-only mount may be)."""
    uid = os.getuid() if uid is None else uid
    if st.st_uid not in (0, uid):
        raise UnsafeDirectory(f"{path} is owned by uid {st.st_uid}, not {uid} or root")
    if _others_may_write(path, st) and not (stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX):
        raise UnsafeDirectory(f"{path} is writable by others (mode {stat.S_IMODE(st.st_mode):o})")


def _check_lookup(directory: str, dir_st, where: str, entry, uid: int, path: str) -> None:
    place = "above" if path.startswith(directory.rstrip("/") + "/") else "on the way to"
    if dir_st.st_uid not in (0, uid):
        raise UnsafeDirectory(f"{directory} ({place} {path}) is owned by uid {dir_st.st_uid}")
    # sticky: others may add entries, not replace ours
    if _others_may_write(directory, dir_st) and not (dir_st.st_mode & stat.S_ISVTX and entry.st_uid in (0, uid)):
        raise UnsafeDirectory(f"{directory} ({place} {path}) is writable by others "
                              f"(mode {stat.S_IMODE(dir_st.st_mode):o})"
                              + (f" and {where} is uid {entry.st_uid}'s" if dir_st.st_mode & stat.S_ISVTX else ""))
    if stat.S_ISLNK(entry.st_mode) and entry.st_uid not in (0, uid):
        raise UnsafeDirectory(f"{where} ({place} {path}) is a symlink owned by uid {entry.st_uid}")


def _others_may_write(path: str, st) -> bool:
    if not st.st_mode & 0o022:
        return False
    try:
        return not os.statvfs(path).f_flag & os.ST_RDONLY  # a read-only mount: nobody writes, whatever the bits
    except OSError:
        return True
