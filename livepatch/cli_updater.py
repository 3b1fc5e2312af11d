"""`livepatch updater run|assess-now|install-now|status|clear`: the
updater service (livepatch/updater.py) and the commands that drive it on
demand or show its state. Every subcommand reads the same configuration
file (--config, default $LIVEPATCH_UPDATER_CONFIG or
/etc/livepatch/updater.toml)."""

from __future__ import annotations

import os

from .cli import EXIT_ERROR, EXIT_PARTIAL, EXIT_REFUSED, CliError, _emit, table

DEFAULT_CONFIG = "/etc/livepatch/updater.toml"


def _config(args):
    from .updater_config import ConfigError, load
    try:
        return load(args.config or os.environ.get("LIVEPATCH_UPDATER_CONFIG") or DEFAULT_CONFIG)
    except ConfigError as exc:
        raise CliError(str(exc)) from None


def _updater(args):
    from .updater import Updater
    return Updater(_config(args))


def cmd_run(args):
    import logging
    import signal
    import sys
    import threading
    config = _config(args)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log = logging.getLogger("livepatch.updater")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    from .updater import Updater
    Updater(config).run(stop)


def cmd_assess_now(args):
    result = _updater(args).assess_now()

    def human(r):
        if not r["ok"]:
            return f"assessment failed at {r['at']}: {r['error']}"
        rows = [{"service": name, "processes": s["processes"], "installed": ",".join(s["installed"]) or "-",
                 "to install": ",".join(s["to_install"]) or "-", "pending": ",".join(s["pending"]) or "-",
                 "needs baseline": ",".join(s["needs-baseline"]) or "-"} for name, s in r["services"].items()]
        return (f"assessed at {r['at']}" + (" from the cache: the repository cannot be reached" if r.get("offline") else "")
                + "\n" + table(rows, ["service", "processes", "installed", "to install", "pending", "needs baseline"]))
    _emit(args, result, human)
    if not result["ok"]:
        raise SystemExit(EXIT_ERROR)


def cmd_install_now(args):
    updater = _updater(args)
    classes = [c for c in (args.classification or "").split(",") if c] or None
    from .updater_config import CLASSIFICATIONS
    for c in classes or ():
        if c not in CLASSIFICATIONS:
            raise CliError(f"--classification {c!r} is not one of {', '.join(CLASSIFICATIONS)}", 2)
    results = updater.install_now(classifications=classes, include=args.include or (), exclude=args.exclude or ())
    code = (EXIT_PARTIAL if any(r["outcome"] == "rollback failed" for r in results) else
            EXIT_REFUSED if any(r["outcome"] != "installed" for r in results) else 0)
    out = {"results": results, "exit_code": code}

    def human(o):
        rows = [{"service": r["service"], "patch": r["patch"], "outcome": r["outcome"],
                 "reason": (r.get("reason") or "")[:90]} for r in o["results"]]
        return table(rows, ["service", "patch", "outcome", "reason"]) if rows else "nothing to install"
    _emit(args, out, human)
    if code:
        raise SystemExit(code)


def cmd_status(args):
    from .updater import StateFile
    config = _config(args)
    try:
        state = StateFile(config.state_file).read()
    except OSError as exc:
        raise CliError(str(exc)) from None
    state.setdefault("held", {})
    state["state_file"] = config.state_file

    def human(s):
        last = s.get("last_assessment") or {}
        lines = [f"state {s['state_file']}" + (f" (updater pid {s['pid']})" if s.get("pid") else " (never ran)"),
                 "last assessment: " + (f"{last.get('at')}" + ("" if last.get("ok") else f", FAILED: {last.get('error')}")
                                        + (" (from the cache)" if last.get("offline") else "") if last else "never"),
                 f"next assessment: {s.get('next_assessment') or '-'}",
                 f"windows: {', '.join(s.get('windows') or []) or 'none'}; "
                 + (f"open until {s['window_open_until']}" if s.get("window_open_until")
                    else f"next opens {s.get('next_window') or 'never'}")]
        for name, h in sorted(s["held"].items()):
            lines.append(f"HELD {name} since {h.get('since')}: {h.get('patch')} {h.get('rollback')}: {h.get('reason')}")
        rows = [{"at": r.get("at"), "service": r.get("service"), "patch": r.get("patch"), "outcome": r.get("outcome"),
                 "reason": (r.get("reason") or "")[:70]} for r in (s.get("results") or [])[-10:]]
        if rows:
            lines += ["", table(rows, ["at", "service", "patch", "outcome", "reason"])]
        lines += ["", *[f"{d.get('at')} {d.get('message')}" for d in (s.get("decisions") or [])[-10:]]]
        return "\n".join(lines)
    _emit(args, state, human)


def cmd_clear(args):
    from .updater import StateFile
    config = _config(args)
    with StateFile(config.state_file).update() as s:
        held = s.get("held") or {}
        if args.service not in held:
            raise CliError(f"service {args.service} is not held (held: {', '.join(sorted(held)) or 'none'})")
        was = held.pop(args.service)
        s["held"] = held
    _emit(args, {"cleared": args.service, "was": was},
          lambda d: f"{d['cleared']} is no longer held (it was since {was.get('since')} for {was.get('patch')}); "
                    "the updater installs there again")


def add_commands(command) -> None:
    p = command("updater", None, "the automatic patching service: assess on schedule, install in maintenance windows, "
                                 "roll back on failed health checks")
    sub = p.add_subparsers(dest="updater_command", required=True)

    def updater(name, func, text):
        q = sub.add_parser(name, help=text, description=text)
        q.add_argument("--config", metavar="FILE", help=f"the configuration (default $LIVEPATCH_UPDATER_CONFIG or {DEFAULT_CONFIG})")
        q.add_argument("--json", action="store_true", help="machine-readable output")
        q.set_defaults(func=func)
        return q

    updater("run", cmd_run, "run the updater until SIGTERM (the systemd unit runs this)")
    updater("assess-now", cmd_assess_now, "assess every service against the repository now")
    q = updater("install-now", cmd_install_now, "install the pending bundles now, whatever the windows, with health "
                                                "checks and automatic rollback")
    q.add_argument("--classification", metavar="LIST", help="comma-separated (default: the configured classifications)")
    q.add_argument("--include", action="append", metavar="ID", help="only these patch ids; repeatable")
    q.add_argument("--exclude", action="append", metavar="ID", help="never these patch ids; repeatable")
    updater("status", cmd_status, "the last assessment, next window, results and held services")
    q = updater("clear", cmd_clear, "let the updater install into a service it holds after a failed health check")
    q.add_argument("service")
