"""`livepatch` commands that act on live processes through their agents:
ps, status, history, assess, apply, rollback, attach, run."""

from __future__ import annotations

import os
import sys
import time

from .cli import (EXIT_ERROR, EXIT_NO_AGENT, EXIT_REFUSED, EXIT_USAGE, EXIT_VERIFY, CliError, _emit, _problems_text, patch_id,
                  read_bundle_bytes, seconds, service_name, table, trust_path)


class Progress:
    """A one-line elapsed-time display on a terminal for waits longer than a
    moment; silent when stderr is not a terminal (or with --json)."""

    def __init__(self, message: str, enabled: bool = True, after: float = 0.5):
        self.message, self.after = message, after
        self.enabled = enabled and sys.stderr.isatty()
        self._shown = False
        if self.enabled:  # a thread only with a terminal to draw on
            import threading
            self._stop, self._thread = threading.Event(), threading.Thread(target=self._run, daemon=True)

    def note(self, text: str) -> None:
        if self.enabled:
            sys.stderr.write(f"\r\033[K{text}\n")

    def _run(self):
        start = time.monotonic()
        while not self._stop.wait(0.2):
            elapsed = time.monotonic() - start
            if elapsed >= self.after:
                sys.stderr.write(f"\r\033[K{self.message} {elapsed:.1f}s")
                sys.stderr.flush()
                self._shown = True

    def __enter__(self):
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self._stop.set()
            self._thread.join()
            if self._shown:
                sys.stderr.write("\r\033[K")
                sys.stderr.flush()


EXIT_INTERRUPTED = 130


def _call(pid: int, op: str, wait: float = 60.0, cancellable: bool = False, **fields):
    """One request; with `cancellable`, Ctrl-C cancels it in the agent
    (livepatch/cancel.py) and this says what became of it."""
    from .client import AgentUnavailable, request
    if cancellable:
        from .cancel import Interrupted, request
    else:
        Interrupted = ()  # only a cancellable request is interrupted: nothing to catch
    try:
        response = request(pid, op, wait=wait, **fields)
    except Interrupted as exc:
        raise interrupted(op, pid, exc.response) from None
    except AgentUnavailable as exc:
        raise CliError(str(exc), EXIT_NO_AGENT) from None
    except TimeoutError:
        raise CliError(f"the agent of process {pid} did not answer within {wait:g}s", EXIT_ERROR) from None
    if not response.get("ok"):
        error = response.get("error", {})
        kind = error.get("error", "")
        raise CliError(f"{kind}: {error.get('message', '')}", exit_code_of(kind, error.get("problems")), error)
    return response["result"]


def verification_failed(kind: str, problems=()) -> bool:
    """An agent's error that says the bundle is not intact or not trusted
    (exit 4). A valid bundle with no code for the process's Python version
    is a refusal (exit 3), like a baseline that does not match."""
    if kind not in ("BundleError", "SignatureError"):
        return False
    return not problems or any(p.get("category") != "python-version" for p in problems)


def exit_code_of(kind: str, problems=()) -> int:
    if kind in ("BundleError", "SignatureError"):
        return EXIT_VERIFY if verification_failed(kind, problems) else EXIT_REFUSED
    return EXIT_NO_AGENT if kind == "PermissionDenied" else EXIT_REFUSED if kind in _REFUSALS else EXIT_ERROR


def interrupted(op: str, pid: int, response) -> CliError:
    """What to say after Ctrl-C, from the agent's answer to the hang-up."""
    from .cancel import CONFIRM_WAIT, was_cancelled
    if response is None:
        text = (f"interrupted; process {pid} did not confirm the cancel within {CONFIRM_WAIT:g}s: "
                f"see `livepatch status {pid}` and `livepatch history {pid}`")
    elif was_cancelled(response):
        text = f"cancelled; nothing was changed in process {pid}"
    elif response.get("ok") and isinstance(response.get("result"), dict) and response["result"].get("dry_run"):
        text = f"interrupted; a dry run changes nothing (process {pid})"
    elif response.get("ok"):
        done = "applied" if op == "apply" else "rolled back"
        text = f"interrupted too late: the {op} was {done} in process {pid} before the cancel arrived"
    else:
        error = response.get("error") or {}
        text = f"interrupted; process {pid} answered {error.get('error')}: {error.get('message', '')}; nothing was changed"
    return CliError(text, EXIT_INTERRUPTED, {"interrupted": True, "response": response})


_REFUSALS = {"BaselineMismatch", "IncompatibleChange", "TargetBusy", "TargetNotFound", "RollbackRefused",
             "PatchError", "UnsupportedRuntime", "CommitFailed", "Busy", "Downgrade", "RollbackUnauthorized"}


def order_fields(args) -> dict:
    """The request fields of --allow-downgrade and --authorization FILE
    (each file read here: the agent gets the documents, never a path)."""
    fields = {"allow_downgrade": True} if getattr(args, "allow_downgrade", False) else {}
    docs = []
    for path in getattr(args, "authorization", None) or ():
        try:
            with open(path, "rb") as fh:
                data = fh.read(4097)
        except OSError as exc:
            raise CliError(f"cannot read {path}: {exc.strerror}") from None
        if len(data) > 4096:
            raise CliError(f"{path} is not a rollback authorisation (larger than 4096 bytes)", EXIT_VERIFY)
        docs.append(data.decode("utf-8", "replace"))
    if docs:
        fields["authorizations"] = docs
    return fields


def _ns(ns) -> str:
    return f"{ns / 1000:.1f} µs" if ns < 10_000_000 else f"{ns / 1e6:.1f} ms"


# ---------------------------------------------------------------- commands

def cmd_ps(args):
    from . import cli_tree
    cli_tree.ps(args)


def _one_process(args) -> bool:
    """A bare PID is one process (as it always was); a name, or a PID with
    --tree, is a service (livepatch/cli_tree.py)."""
    # tree.is_pid, without importing the tree module (and dataclasses) for one process
    if args.target.isdigit() and 0 < int(args.target) <= 2**31 and not args.tree:
        args.pid = int(args.target)
        return True
    return False


def cmd_status(args):
    if not _one_process(args):
        from . import cli_tree
        return cli_tree.status(args)
    status = _call(args.pid, "status")

    def human(s):
        a = s["agent"]
        base = s.get("baseline") or {}
        lines = [f"process {a['pid']} ({a['name']}), Python {s['python']['version']}, agent {a['version']} on {a['socket']}",
                 f"runs {base.get('name') or a['name']} {base.get('version') or '(version unknown)'}"
                 + (f" ({base['source']})" if base.get("version") else ""),
                 _trust_line(a)
                 + ("; DEVELOPMENT MODE: unsigned bundles accepted" if a["development_mode_unsigned_bundles"] else ""),
                 f"state: {'FORCED' if s['forced'] else 'normal'}"]
        doing = a.get("in_progress") or s.get("in_progress")
        if doing:
            lines.append(f"in progress: {doing.get('action')} of {doing.get('patch')} since {doing.get('since')}, "
                         f"waiting for a safe point (up to {doing.get('timeout', 0):g}s)"
                         + (f", for process {doing['client_pid']}" if doing.get("client_pid") else ""))
        lines.append("")
        rows = [{"id": p["id"], "applied": p["applied_at"], "targets": len(p["targets"]), "pause": _ns(p["pause_ns"]),
                 "attempts": p["attempts"], "forced": p["forced"], "old frames": p["frames_on_old_code"],
                 "class": p["metadata"].get("classification", "-")} for p in s["applied"]]
        lines.append("applied patches:\n" + table(rows, ["id", "class", "applied", "targets", "pause", "attempts", "forced", "old frames"]))
        for w in s["warnings"]:
            lines.append(f"WARNING: {w}")
        return "\n".join(lines)
    _emit(args, status, human)


def cmd_history(args):
    from . import hotfixes
    if hotfixes.wants_persisted(args):  # the state directories: across restarts and services
        return hotfixes.history(args)
    if not _one_process(args):
        from . import cli_tree
        return cli_tree.history(args)
    history = _call(args.pid, "history")

    def human(h):
        rows = [{"time": e.get("time", ""), "action": e.get("action", ""), "patch": e.get("patch", ""),
                 "outcome": e.get("outcome", ""), "pause": _ns(e["pause_ns"]) if e.get("pause_ns") else "-",
                 "reason": (e.get("reason") or "").splitlines()[0][:70] if e.get("reason") else ""} for e in h]
        return table(rows, ["time", "action", "patch", "outcome", "pause", "reason"])
    _emit(args, history, human)


def cmd_assess(args):
    if args.repo or args.all:
        from .cli_repo import cmd_assess_repo
        return cmd_assess_repo(args)
    if not (args.target or "").isdigit() or not args.bundles:
        from .cli import EXIT_USAGE
        raise CliError("give PID BUNDLE... (one process, these bundles) or SERVICE|--all --repo URL", EXIT_USAGE)
    args.pid = int(args.target)
    from .client import encode_bundle
    blobs = [encode_bundle(read_bundle_bytes(path)) for path in args.bundles]
    results = _call(args.pid, "assess", bundles=blobs)
    for path, r in zip(args.bundles, results):
        r["bundle"] = path

    def human(rs):
        lines = [table([{"bundle": r["bundle"], "patch": r.get("patch_id") or "?", "verdict": r["verdict"],
                         "detail": r.get("message", "") or (", ".join(r.get("targets", []))[:60])} for r in rs],
                       ["bundle", "patch", "verdict", "detail"])]
        for r in rs:
            if r.get("problems"):
                lines.append(f"{r['bundle']}:\n{_problems_text(r['problems'])}")
            held = busy_sentence(r)
            if held:
                lines.append(f"{r['bundle']}: " + (f"blocked: {held}" if r["verdict"] == "blocked" else
                                                  f"{r['verdict']}, but {held}"))
        return "\n".join(lines)
    _emit(args, results, human)
    if any(r["verdict"] in ("refused", "blocked") for r in results):
        raise SystemExit(EXIT_REFUSED)


def busy_sentence(r: dict, timeout: float | None = None) -> str:
    from .busynow import sentence
    return sentence(r.get("patch_id") or "?", r.get("busy_now"), timeout)


def cmd_apply(args):
    if not _one_process(args):
        from . import cli_tree
        return cli_tree.apply(args)
    from .client import encode_bundle
    blob = encode_bundle(read_bundle_bytes(args.bundle))
    started = time.perf_counter()
    with Progress(f"waiting for a safe point in process {args.pid} (up to {args.timeout:g}s)...", not args.json):
        result = _call(args.pid, "apply", wait=args.timeout + 60, cancellable=True, bundle=blob, timeout=args.timeout,
                       force=args.force, dry_run=args.dry_run, **order_fields(args))
    result["wall_ms"] = round((time.perf_counter() - started) * 1000, 1)

    def human(r):
        if r.get("dry_run"):
            held = busy_sentence(r, args.timeout)
            if r["verdict"] == "applies":
                return (f"dry run: {r['patch_id']} would apply now ({len(r['targets'])} targets, {r['functions']} functions)"
                        + (f"\nbut {held}" if held else ""))
            if r["verdict"] == "blocked":
                return f"dry run: {r['patch_id']} is blocked: {held}"
            return f"dry run: {r['patch_id']} {r['verdict']}\n{_problems_text(r.get('problems', []))}"
        lines = [f"applied {r['patch_id']} to process {args.pid}: {len(r['targets'])} targets, {r['functions']} functions",
                 f"commit pause {_ns(r['pause_ns'])} after {r['attempts']} attempt(s); whole apply {r['wall_ms']} ms"
                 + (" (FORCED)" if r["forced"] else "")]
        lines += [f"  {t}" for t in r["targets"]]
        if r.get("interrupted_by"):
            lines.append(f"WARNING: other threads ran during the commit: {r['interrupted_by']}")
        return "\n".join(lines)
    _emit(args, result, human)
    if result.get("dry_run") and result["verdict"] in ("refused", "blocked"):
        raise SystemExit(EXIT_REFUSED)


def cmd_rollback(args):
    if args.all and args.patch_id:
        raise CliError(f"give {args.patch_id} or --all, not both", EXIT_USAGE)
    if not _one_process(args):
        from . import cli_tree
        return cli_tree.rollback(args)
    fields = {"timeout": args.timeout, "force": args.force}
    if args.all:
        fields["all"] = True
    elif args.patch_id:
        fields["patch_id"] = args.patch_id
    fields.update(order_fields(args))
    with Progress(f"waiting for a safe point in process {args.pid}...", not args.json):
        results = _call(args.pid, "rollback", wait=args.timeout + 60, cancellable=True, **fields)
    _emit(args, results, lambda rs: "\n".join(
        f"rolled back {r['patch_id']} in process {args.pid}: {r['functions']} functions, pause {_ns(r['pause_ns'])}, "
        f"{r['attempts']} attempt(s)" for r in rs) or "nothing to roll back")


def cmd_attach(args):
    from .attach import AttachError, attach
    if args.trust:
        trust_path("--trust", args.trust)
        _check_trust_for(args.pid, args.trust)
    progress = Progress(f"attaching to process {args.pid}...", not args.json)
    try:
        with progress:
            info = attach(args.pid, trust=args.trust, allow_unsigned=args.allow_unsigned, name=args.name,
                          version=args.app_version,
                          method=args.method, timeout=args.timeout, progress=progress.note)
    except AttachError as exc:
        code = EXIT_NO_AGENT if "no process" in str(exc) or "not a CPython" in str(exc) else EXIT_ERROR
        raise CliError(str(exc), code) from None
    if info["method"] == "already attached":
        return _already_attached(args, info)
    _emit(args, info, lambda i: f"agent listening in process {args.pid} on {i['socket']} "
          f"(via {i['method']}; target stopped {i['stop_ms']} ms; attach took {i['elapsed_ms']} ms)")


def _check_trust_for(pid: int, trust: str) -> None:
    """The store as the target's agent would check it (its uid's), before
    anything is attached: a bad one is one line and nothing changes."""
    from .client import AgentUnavailable, owner
    from .signing import load_trusted
    try:
        uid = owner(pid)
    except AgentUnavailable:
        return  # no such process: attach says so
    try:
        load_trusted(os.path.abspath(trust), uid)
    except Exception as exc:
        raise CliError(f"--trust {trust}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; "
                       "nothing was attached or changed") from None


def _trust_line(a: dict) -> str:
    where = f" from {a['trust']}" if a.get("trust") else ""
    if a["trusted_keys"]:
        return f"trusted keys{where}: {', '.join(a['trusted_keys'])}"
    why = f" ({a['trust_problem']})" if a.get("trust_problem") else ""
    return "no trusted keys" + why + ("" if a["development_mode_unsigned_bundles"] else ": every signed bundle is refused")


def _already_attached(args, info):
    """An agent runs there already: the options it started with stay, except
    the trusted keys, which are reloaded from --trust when it is given."""
    kept = [o for o, given in (("--name", args.name), ("--allow-unsigned", args.allow_unsigned)) if given]
    note = f"; {' and '.join(kept)} apply only when an agent starts: unchanged" if kept else ""
    if not args.trust:
        _emit(args, info, lambda i: f"process {args.pid} already has an agent on {i['socket']}: nothing changed"
              + (note or " (to change its trusted keys: --trust KEYFILE_OR_DIR)"))
        return
    result = _call(args.pid, "reload-trust", trust=os.path.abspath(args.trust))
    _emit(args, {**info, "reloaded": result}, lambda i: f"process {args.pid} already has an agent on {i['socket']}: "
          + _reloaded_line(result) + note)


def _reloaded_line(r: dict) -> str:
    keys = r["trusted_keys"]
    shown = f" ({', '.join(k[:4] + '...' for k in keys)})" if keys else ": no trusted keys, every signed bundle will be refused"
    changes = [f"{len(r[k])} {k}" for k in ("added", "removed") if r.get(k)]
    return (f"trusted keys reloaded from {r['trust']}: {len(keys)} key{'s' * (len(keys) != 1)}{shown}"
            + (f" [{', '.join(changes)}]" if changes else " [unchanged]"))


def cmd_trust_reload(args):
    """Reload the trusted keys of one process, or of every process of a service."""
    from .tree import NoSuchService, find, is_pid
    if args.trust:
        trust_path("--trust", args.trust)
    fields = {"trust": os.path.abspath(args.trust)} if args.trust else {}
    if is_pid(args.target) and not args.tree:
        pids = [int(args.target)]
    else:
        try:
            pids = find(args.target, args.tree).pids
        except NoSuchService as exc:
            raise CliError(str(exc), EXIT_NO_AGENT) from None
    results, failed = {}, []
    for pid in pids:
        try:
            results[pid] = _call(pid, "reload-trust", **fields)
        except CliError as exc:
            if len(pids) == 1:
                raise
            failed.append((pid, exc))
    _emit(args, {"reloaded": {str(p): r for p, r in results.items()},
                 "failed": {str(p): e.to_json()["error"] for p, e in failed}},
          lambda d: "\n".join([f"process {p}: {_reloaded_line(r)}" for p, r in results.items()]
                              + [f"process {p}: not reloaded: {e}" for p, e in failed]))
    if failed:
        raise CliError(f"trusted keys not reloaded in {len(failed)} of {len(pids)} processes", failed[0][1].code)


def add_commands(command) -> None:
    def target(p):
        p.add_argument("target", metavar="SERVICE|PID", help="a PID (one process), or a service: its name, or a PID with --tree")
        p.add_argument("--tree", action="store_true", help="the PID and all its descendants that have an agent")

    p = command("ps", cmd_ps, "list processes with a live agent, grouped by service (masters, and the workers under them)")
    p = command("status", cmd_status, "show the agent status and applied patches of a process or of every process of a service")
    target(p)
    p = command("history", cmd_history, "show every apply, rollback, refusal and failure in a process or a service")
    p.add_argument("target", nargs="?", metavar="SERVICE|PID",
                   help="a PID (one process), or a service: its name, or a PID with --tree")
    p.add_argument("--tree", action="store_true", help="the PID and all its descendants that have an agent")
    if p:  # not left out of the parser (cli.parser(only=...)): the module is a command's own
        from .hotfixes import add_history_arguments
        add_history_arguments(p)
    p = command("assess", cmd_assess, "check which bundles would apply to a process now (PID BUNDLE...), or what a "
                "repository holds for each process of a service (SERVICE|--all --repo URL), changing nothing")
    p.add_argument("target", nargs="?", metavar="PID|SERVICE")
    p.add_argument("bundles", nargs="*", metavar="BUNDLE")
    p.add_argument("--all", action="store_true", help="with --repo: every service on this machine")
    if p:
        from .cli_repo import repo_arguments
        repo_arguments(p)
    p = command("apply", cmd_apply, "apply a bundle to a live process, or to every process of a service (all or nothing)")
    target(p)
    p.add_argument("bundle")
    p.add_argument("--continue", dest="keep_going", action="store_true",
                   help="service: patch the processes that can be, even if others refuse (exit 6 if some are left)")
    p.add_argument("--timeout", type=seconds, default=5.0, help="seconds to wait for a safe point (default 5)")
    p.add_argument("--force", action="store_true", help="patch even targets that are running (they finish on old code)")
    p.add_argument("--dry-run", action="store_true", help="verify and check only; change nothing")
    p.add_argument("--allow-downgrade", action="store_true",
                   help="apply a bundle older than what is applied (recorded with your uid and pid)")
    p.add_argument("--authorization", action="append", metavar="FILE",
                   help="a rollback authorisation (livepatch authorize-rollback) for a security or critical patch "
                        "that an allowed downgrade removes; repeatable")
    p = command("rollback", cmd_rollback, "roll back the latest patch, a named one, or all, in a process or a service")
    target(p)
    p.add_argument("patch_id", nargs="?", type=patch_id)
    p.add_argument("--all", action="store_true", help="every applied patch, newest first")
    p.add_argument("--timeout", type=seconds, default=5.0, help="seconds to wait for a safe point (default 5)")
    p.add_argument("--force", action="store_true")
    p.add_argument("--authorization", action="append", metavar="FILE",
                   help="a rollback authorisation (livepatch authorize-rollback) for a security or critical patch; repeatable")
    p = command("attach", cmd_attach, "start an agent inside a running Python process")
    p.add_argument("pid", type=int)
    p.add_argument("--trust", metavar="KEYFILE_OR_DIR", help="keys the agent accepts bundles from")
    p.add_argument("--allow-unsigned", action="store_true", help="development only: accept unsigned bundles")
    p.add_argument("--name", type=service_name, help="a name for the service in `livepatch ps`")
    p.add_argument("--version", dest="app_version", metavar="VERSION",
                   help="the release the program is (status, ps and assess show NAME VERSION as its baseline)")
    p.add_argument("--method", choices=["auto", "pyinjector", "gdb"], default="auto")
    p.add_argument("--timeout", type=seconds, default=15.0, help="seconds to wait for the agent (default 15)")
    p = command("trust", None, "the trusted keys of running agents")
    sub = p.add_subparsers(dest="trust_command", required=True)
    p = sub.add_parser("reload", help="reload the trusted keys of a process or of every process of a service, "
                                      "without a restart", description="reload the trusted keys of a process or of "
                                      "every process of a service, without a restart (checked as at start; a store "
                                      "that fails the checks changes nothing)")
    p.add_argument("target", metavar="SERVICE|PID", help="a PID (one process), or a service: its name, or a PID with --tree")
    p.add_argument("--tree", action="store_true", help="the PID and all its descendants that have an agent")
    p.add_argument("--trust", metavar="KEYFILE_OR_DIR", help="load from here from now on (default: the store in use)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_trust_reload)
    p = command("run", cmd_run, "run a Python program (any command line) with the agent in it")
    if p:  # not left out of the parser (cli.parser(only=...))
        from .cli_run import add_arguments
        add_arguments(p)


def cmd_run(args):
    from .cli_run import cmd_run as run
    return run(args)
