"""Getting the agent into a process that never heard of livepatch.

Python 3.14+: `sys.remote_exec(pid, script)`. Python 3.11-3.13: a tiny
shared library (attach_shim.c, compiled when the package was built; on
first use where that build had no compiler) is loaded into the
target; its constructor starts a native thread that runs the bootstrap
script through PyGILState_Ensure. Loading uses `pyinjector` (ptrace,
hijacks one thread for the dlopen: a few milliseconds) and falls back to
gdb (stops every thread for a few hundred milliseconds) when pyinjector is
unavailable or fails. Both report the measured stop time.

The bootstrap and library are written to a 0700 runtime directory of the
target's uid (created safely, see agent/runtime_dir.py; root attaching to
another user's process makes it that user's), with O_EXCL|O_NOFOLLOW, and
removed once the agent answers. The agent chooses its own socket
directory, and the client verifies it like any other."""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import subprocess
import sys
import time

from livepatch.agent import runtime_dir

SUPPORTED = ((3, 11), (3, 12), (3, 13))
SHIM_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "attach_shim.c")


class AttachError(Exception):
    pass


def target_python(pid: int) -> tuple[str, tuple[int, int]]:
    """('cpython', (major, minor)) of the process, from its mapped files."""
    try:
        with open(f"/proc/{pid}/maps") as fh:
            maps = fh.read()
        exe = os.readlink(f"/proc/{pid}/exe")
    except FileNotFoundError:
        raise AttachError(f"no process with PID {pid}") from None
    except PermissionError:
        raise AttachError(f"not allowed to inspect process {pid} (run as its owner or root)") from None
    m = re.search(r"libpython(3)\.(\d+)", maps)
    if m is None:
        m = re.search(r"python(3)\.(\d+)", os.path.basename(exe))
    if m is None:
        try:
            out = subprocess.run([exe, "-c", "import sys;print(sys.implementation.name, *sys.version_info[:2])"],
                                 capture_output=True, text=True, timeout=10).stdout.split()
            if len(out) == 3 and out[0] == "cpython":
                return "cpython", (int(out[1]), int(out[2]))
        except (OSError, subprocess.TimeoutExpired):
            pass
        raise AttachError(f"process {pid} ({exe}) is not a CPython interpreter")
    return "cpython", (int(m.group(1)), int(m.group(2)))


def prebuilt_shim() -> str | None:
    """The shim compiled with the package (an optional extension: absent
    where the build host had no compiler)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_attach_shim.so")
    return path if os.path.isfile(path) else None


def _shim_library(directory: str, use_prebuilt: bool = True) -> str:
    """The prebuilt shim, else attach_shim.c compiled once per content into
    the private directory."""
    prebuilt = prebuilt_shim() if use_prebuilt else None
    if prebuilt is not None:
        return prebuilt
    with open(SHIM_SOURCE, "rb") as fh:
        source = fh.read()
    path = os.path.join(directory, f"shim-{hashlib.sha256(source).hexdigest()[:16]}.so")
    if os.path.exists(path):
        return path
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        raise AttachError("attaching needs a C compiler (cc/gcc) to build the 1 KB loader shim once")
    tmp = f"{path}.{os.getpid()}.tmp"
    proc = subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", tmp, SHIM_SOURCE, "-lpthread", "-ldl"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise AttachError(f"compiling the loader shim failed: {proc.stderr.strip()[:500]}")
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return path


def _write_private(path: str, data: bytes, uid: int | None = None, dir_fd: int | None = None) -> None:
    """A new file (never through a link or over an existing one), readable
    by `uid` alone: root writing for another user's process hands it over."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dir_fd)
    if uid is not None and uid != os.getuid():
        os.fchown(fd, uid, -1)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _bootstrap_text(result_path: str, options: dict, needed: str) -> str:
    # The agent picks its socket directory itself, from its own uid and
    # environment: the one the client then looks in.
    return f'''\
def _livepatch_bootstrap():
    import json, os, sys
    try:
        import livepatch.agent as agent
    except ImportError as exc:
        message = {{"ok": False, "error": "livepatch is not importable in process %d (%s); it needs %s on its sys.path "
                    "(for example start it with PYTHONPATH=%s)" % (os.getpid(), exc, {needed!r}, {needed!r})}}
    else:
        try:
            path = agent.start(**{options!r})
            message = {{"ok": True, "socket": path, "python": sys.version.split()[0]}}
        except BaseException as exc:
            message = {{"ok": False, "error": "the agent did not start: %s: %s" % (type(exc).__name__, exc)}}
    fd = os.open({result_path!r}, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(message, fh)
_livepatch_bootstrap()
'''


def attach(pid: int, *, trust=None, allow_unsigned: bool = False, name: str | None = None,
           version: str | None = None, method: str = "auto", timeout: float = 10.0, progress=None) -> dict:
    """Start an agent inside process `pid`. Returns {"socket", "method",
    "stop_ms", "elapsed_ms", "python"}; raises AttachError with the reason."""
    from livepatch.client import AgentUnavailable, agent_socket, environment, owner
    declared = version  # `version` names the target's Python below
    if not os.path.exists(f"/proc/{pid}"):
        raise AttachError(f"no process with PID {pid}")
    try:
        return {"socket": agent_socket(pid), "method": "already attached", "stop_ms": 0.0, "elapsed_ms": 0.0}
    except AgentUnavailable:
        pass  # none, a stale socket, or one that is not this process's: attach a real agent
    impl, version = target_python(pid)
    if version not in SUPPORTED and version < (3, 14):
        raise AttachError(f"process {pid} runs Python {version[0]}.{version[1]}; livepatch supports 3.11 to 3.13 (3.14+ via sys.remote_exec)")
    try:
        uid = owner(pid)
    except AgentUnavailable:
        raise AttachError(f"no process with PID {pid}") from None
    if uid != os.getuid() and os.getuid() != 0:
        raise AttachError(f"process {pid} belongs to another user; attach as its owner or root")
    # The target reads the bootstrap and the library and writes its answer:
    # they go in a private directory of the target's uid (root attaching to
    # another user's process makes it that user's), never in ours.
    # Everything in it is made, read and removed relative to the directory
    # as checked, whatever its owner does to the path meanwhile.
    try:
        directory = runtime_dir.ensure(uid=uid, env=environment(pid))
        dir_fd = runtime_dir.open_checked(directory, uid)
        shim = _shim_library(runtime_dir.ensure())
    except (runtime_dir.UnsafeDirectory, OSError) as exc:
        raise AttachError(f"cannot attach to process {pid}: {exc}") from None
    token = f"attach-{pid}-{secrets.token_hex(6)}"
    names = {"lib": token + ".so", "script": token + ".so.py", "result": token + ".so.result"}  # the shim runs LIB.py
    lib, script, result = (os.path.join(directory, names[k]) for k in ("lib", "script", "result"))
    needed = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    options = {"trust": os.path.abspath(trust) if trust else None, "allow_unsigned": allow_unsigned, "name": name,
               **({"version": declared} if declared else {})}
    started = time.perf_counter()
    try:
        _write_private(names["script"], _bootstrap_text(result, options, needed).encode(), uid, dir_fd)
        if version >= (3, 14):
            stop_ms, used = _remote_exec(pid, script), "sys.remote_exec"
        else:
            with open(shim, "rb") as fh:  # a new inode per attach: dlopen runs its constructor
                _write_private(names["lib"], fh.read(), uid, dir_fd)
            stop_ms, used = _load_library(pid, lib, method, progress)
        deadline = time.monotonic() + timeout
        while not _exists(names["result"], dir_fd):
            if time.monotonic() > deadline:
                raise AttachError(f"the bootstrap did not run in process {pid} within {timeout:g}s "
                                  "(is the interpreter stuck, or finalizing?)")
            if not os.path.exists(f"/proc/{pid}"):
                raise AttachError(f"process {pid} exited during the attach")
            time.sleep(0.005)
        time.sleep(0.01)
        outcome = _read_result(names["result"], dir_fd, result)
    finally:
        for entry in names.values():
            try:
                os.unlink(entry, dir_fd=dir_fd)
            except FileNotFoundError:
                pass
        os.close(dir_fd)
    if not outcome.get("ok"):
        raise AttachError(outcome.get("error", "the bootstrap failed"))
    if outcome.get("socket") is None:
        raise AttachError(f"the agent started in process {pid} without a control socket: no safe socket "
                          "directory (the service's log says why)")
    return {"socket": outcome["socket"], "method": used, "stop_ms": round(stop_ms, 3),
            "elapsed_ms": round((time.perf_counter() - started) * 1000, 1), "python": outcome.get("python")}


def _exists(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False


def _read_result(name: str, dir_fd: int, path: str) -> dict:
    """The bootstrap's answer, written by the target: a small regular file
    (the target's user owns the directory, so nothing here is followed)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
    except OSError as exc:
        raise AttachError(f"cannot read the bootstrap's answer {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise AttachError(f"the bootstrap's answer {path} is not a regular file")
        data = fh.read(1 << 16)
    try:
        outcome = json.loads(data)
    except ValueError:
        raise AttachError(f"the bootstrap's answer {path} is not JSON") from None
    return outcome if isinstance(outcome, dict) else {}


def _load_library(pid: int, lib: str, method: str, progress) -> tuple[float, str]:
    errors = []
    if method in ("auto", "pyinjector"):
        try:
            import pyinjector
        except ImportError:
            errors.append("pyinjector is not installed")
        else:
            t0 = time.perf_counter()
            try:
                pyinjector.inject(pid, lib)
                # inject() returns after the hijacked thread resumed: an upper bound on its stop
                return (time.perf_counter() - t0) * 1000, "pyinjector"
            except Exception as exc:  # pyinjector raises its own InjectorError
                errors.append(f"pyinjector: {exc}")
        if method == "pyinjector":
            raise AttachError("; ".join(errors) + _ptrace_hint())
    if progress:
        progress(f"falling back to gdb ({'; '.join(errors) or 'requested'}); the target stops for a few hundred ms")
    gdb = shutil.which("gdb")
    if gdb is None:
        raise AttachError("; ".join(errors + ["gdb is not installed"]) + _ptrace_hint())
    t0 = time.perf_counter()
    proc = subprocess.run([gdb, "-p", str(pid), "-batch", "-nx", "-ex", f'call (void*)dlopen("{lib}", 2)'],
                          capture_output=True, text=True, timeout=60)
    elapsed = (time.perf_counter() - t0) * 1000
    if proc.returncode != 0 or "$1 = (void *) 0x0" in proc.stdout or "ptrace" in proc.stderr.lower() and "not permitted" in proc.stderr.lower():
        raise AttachError(f"gdb could not load the shim: {(proc.stderr or proc.stdout).strip()[-300:]}" + _ptrace_hint())
    # gdb stops every thread from attach to detach; the whole run bounds it
    return elapsed, "gdb"


def _remote_exec(pid: int, script: str) -> float:
    if sys.version_info < (3, 14):
        raise AttachError(f"process {pid} runs Python 3.14+: attach to it with livepatch running on Python 3.14+ (sys.remote_exec)")
    t0 = time.perf_counter()
    sys.remote_exec(pid, script)
    return (time.perf_counter() - t0) * 1000


def _ptrace_hint() -> str:
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as fh:
            scope = fh.read().strip()
    except OSError:
        return ""
    if scope != "0":
        return f" (kernel.yama.ptrace_scope is {scope}: injection needs root or CAP_SYS_PTRACE)"
    return ""
