"""The repository commands: `livepatch repo add|add-release|list`, `livepatch
assess SERVICE|--all --repo URL` and `livepatch install SERVICE|--all --repo
URL` (presentation only: livepatch/publish.py, repository.py, assess.py and
install.py do the work)."""

from __future__ import annotations

import os

from .cli import EXIT_ERROR, EXIT_NO_AGENT, EXIT_USAGE, EXIT_VERIFY, CliError, _emit, table

CLASSES = ("security", "critical", "bugfix", "other")


def repo_arguments(p, required: bool = False) -> None:
    """--repo, --trust and --cache-dir, shared by assess and install."""
    p.add_argument("--repo", required=required, metavar="DIR_OR_URL",
                   help="the patch repository: a directory or an http(s) base URL")
    p.add_argument("--trust", metavar="KEYFILE_OR_DIR",
                   help="keys the repository's catalog and bundles are signed with (default: LIVEPATCH_TRUST)")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="where verified downloads are kept (default: ~/.cache/livepatch/repositories)")


def open_repository(args):
    from .repository import Repository, RepositoryError
    trust = args.trust or os.environ.get("LIVEPATCH_TRUST")
    if not trust:
        raise CliError("--trust is needed: the public key the repository's catalog is signed with", EXIT_USAGE)
    try:
        return Repository(args.repo, trusted_keys=trust, cache_dir=args.cache_dir)
    except RepositoryError as exc:
        raise CliError(str(exc)) from None


def _repo_error(exc) -> CliError:
    return CliError(str(exc), EXIT_VERIFY if exc.verification else EXIT_ERROR)


def _services(args):
    from . import tree
    if args.all:
        if args.target:
            raise CliError("give a SERVICE or --all, not both", EXIT_USAGE)
        # processes that did not answer and have no named ancestor form no service
        return [s for s in tree.everything() if s.name is not None and s.name != "(not answering)"]
    if not args.target:
        raise CliError("give a SERVICE (a name, or a PID with --tree) or --all", EXIT_USAGE)
    try:
        return [tree.by_tree(int(args.target)) if args.target.isdigit() else tree.by_name(args.target)]
    except tree.NoSuchService as exc:
        raise CliError(str(exc), EXIT_NO_AGENT) from None


def _offline_note(repo) -> str:
    info = repo.info
    if info is not None and info.offline:
        return (f"\nrepository not reachable ({info.problem}): used the cached catalog of {info.generated}")
    return ""


# ---------------------------------------------------------------- assess

def _runs(runs: dict) -> str:
    base = (runs or {}).get("baseline") or {}
    if not base.get("name"):
        return "-"
    return f"{base['name']} {base.get('version') or '(version unknown)'}"


def cmd_assess_repo(args):
    from .assess import assess
    from .repository import RepositoryError
    if args.bundles:
        raise CliError("give bundles (PID BUNDLE...) or --repo, not both", EXIT_USAGE)
    repo = open_repository(args)
    services = _services(args)
    try:
        results = assess(repo, services)
    except RepositoryError as exc:
        raise _repo_error(exc) from None
    info = repo.info
    data = {"repository": repo.location, "offline": bool(info and info.offline),
            "catalog_generated": info.generated if info else None,
            "assessed_at": results[0].assessed_at if results else None,
            "services": [r.to_json() for r in results]}

    def human(d):
        lines = []
        for sa in results:
            lines.append(f"service {sa.service} (assessed {sa.assessed_at}):")
            rows = []
            for pid, states in sa.processes.items():
                for e in sa.entries:
                    rows.append({"pid": pid, "role": sa.roles.get(pid, ""), "runs": _runs(sa.runs.get(pid)),
                                 "patch": e.id, "class": e.classification, "state": states[e.id],
                                 "detail": sa.reasons[pid].get(e.id, "")[:80]})
            lines += ["  " + x for x in table(rows, ["pid", "role", "runs", "patch", "class", "state", "detail"]).splitlines()]
            lines += [f"  process {pid}: not assessed: {why}" for pid, why in sa.errors.items()]
        if not results:
            lines.append("no service on this machine has a livepatch agent")
        return "\n".join(lines) + _offline_note(repo)
    _emit(args, data, human)


# ---------------------------------------------------------------- install

def _classifications(text: str) -> tuple:
    import argparse
    items = tuple(c.strip() for c in text.split(",") if c.strip())
    bad = [c for c in items if c not in CLASSES]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"classifications are {', '.join(CLASSES)} (comma-separated), got {text[:40]!r}")
    return items


def cmd_install(args):
    from .install import install
    from .repository import RepositoryError
    repo = open_repository(args)
    services = _services(args)
    try:
        result = install(repo, services, classifications=args.classification, include=args.include or (),
                         exclude=args.exclude or (), canary=args.canary)
    except RepositoryError as exc:
        raise _repo_error(exc) from None
    data = {"repository": repo.location, "offline": bool(repo.info and repo.info.offline), **result.to_json()}

    def human(d):
        lines = []
        for s in result.services:
            lines.append(f"service {s.service}:")
            rows = [{"patch": o.patch_id, "outcome": o.outcome, "detail": o.reason[:100]} for o in s.outcomes]
            lines += ["  " + x for x in (table(rows, ["patch", "outcome", "detail"]) if rows
                                         else "nothing pending").splitlines()]
            for o in s.outcomes:
                for pid, what in o.processes.items():
                    if pid != "":
                        lines.append(f"    {o.patch_id} in process {pid}: {what}")
        return "\n".join(lines) + _offline_note(repo)
    _emit(args, data, human)
    if result.exit_code:
        raise SystemExit(result.exit_code)


# ---------------------------------------------------------------- repo

def _private_key(path):
    from .signing import SignatureError, load_private
    try:
        return load_private(path)
    except OSError as exc:
        raise CliError(f"cannot read the key {path}: {exc.strerror}") from None
    except SignatureError as exc:
        raise CliError(str(exc).splitlines()[0]) from None


def _publish(args, **kw):
    from .publish import PublishError, add
    key = _private_key(args.key)
    trusted = None
    if getattr(args, "trust", None):
        from .signing import SignatureError, load_trusted
        try:
            trusted = load_trusted(args.trust)
        except SignatureError as exc:
            raise CliError(str(exc).splitlines()[0], EXIT_VERIFY) from None
    try:
        added = add(args.repo, key, trusted=trusted, **kw)
    except PublishError as exc:
        raise CliError(str(exc), EXIT_VERIFY if exc.verification else EXIT_ERROR) from None
    _emit(args, {"repository": args.repo, "added": [e.to_json() for e in added]},
          lambda d: "\n".join([f"added {e.id} ({e.kind}, {e.classification}) for {e.distribution} {e.version}"
                               for e in added] or ["nothing new: every one is in the catalog already"])
          + f"\ncatalog {os.path.join(args.repo, 'catalog.json')} signed")


def cmd_repo_add(args):
    _publish(args, bundles=args.bundles)


def cmd_repo_add_release(args):
    import time

    from .catalog import CatalogEntry
    entry = CatalogEntry(id=args.id, kind="baseline", classification=args.classification,
                         baseline={"name": args.name, "version": args.version}, title=args.title or args.id,
                         references=tuple(args.ref or ()), fixed_in=args.fixed_in,
                         released=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    from .catalog import CatalogError, _entry
    try:
        _entry({k: v for k, v in entry.to_json().items() if k not in ("size", "sha256", "path")}, 0)
    except CatalogError as exc:
        raise CliError(str(exc).splitlines()[0], EXIT_USAGE) from None
    _publish(args, releases=[entry])


def cmd_repo_list(args):
    from .repository import RepositoryError
    repo = open_repository(args)
    try:
        entries = repo.catalog()
    except RepositoryError as exc:
        raise _repo_error(exc) from None
    from .assess import last_assessment
    last = (last_assessment(repo) or {}).get("assessed_at")
    _emit(args, {"repository": repo.location, "generated": repo.info.generated, "signed_by": repo.info.signed_by,
                 "offline": repo.info.offline, "last_assessment": last, "entries": [e.to_json() for e in entries]},
          lambda d: table([{"id": e.id, "kind": e.kind, "class": e.classification,
                            "baseline": f"{e.distribution} {e.version}", "sequence": e.sequence,
                            "released": e.released, "references": ",".join(e.references)} for e in entries],
                          ["id", "kind", "class", "baseline", "sequence", "released", "references"])
          + f"\nsigned by {repo.info.signed_by}, generated {repo.info.generated}; last assessment "
          + (last or "never") + _offline_note(repo))


def add_commands(command) -> None:
    p = command("install", cmd_install,
                "install the pending bundles of a repository into a service or every service, through the service apply")
    p.add_argument("target", nargs="?", metavar="SERVICE", help="a service name, or a PID (its process tree)")
    p.add_argument("--all", action="store_true", help="every service on this machine")
    repo_arguments(p, required=True)
    p.add_argument("--classification", type=_classifications, metavar="C1,C2",
                   help=f"install only these classifications ({', '.join(CLASSES)}); default: all")
    p.add_argument("--include", action="append", metavar="ID", help="install only these patch ids; repeatable")
    p.add_argument("--exclude", action="append", metavar="ID", help="never install these patch ids; repeatable")
    p.add_argument("--canary", action="store_true", help="each bundle to one serving process first, then the rest")

    p = command("repo", None, "maintain a patch repository directory (bundles and a signed catalog)")
    sub = p.add_subparsers(dest="repo_command", required=True)

    def subcommand(name, func, help):
        q = sub.add_parser(name, help=help, description=help)
        q.add_argument("--json", action="store_true", help="machine-readable output")
        q.set_defaults(func=func)
        return q
    q = subcommand("add", cmd_repo_add, "add signed bundles to a repository directory and re-sign its catalog")
    q.add_argument("bundles", nargs="+", metavar="BUNDLE")
    q.add_argument("--repo", required=True, metavar="DIR")
    q.add_argument("--key", required=True, help="private key that signs the catalog")
    q.add_argument("--trust", metavar="KEYFILE_OR_DIR", help="keys the bundles must be signed with (default: --key's)")
    q = subcommand("add-release", cmd_repo_add_release,
                   "record a fix that exists only as a release (assess says needs-baseline for processes that run VERSION)")
    q.add_argument("id")
    q.add_argument("--repo", required=True, metavar="DIR")
    q.add_argument("--key", required=True, help="private key that signs the catalog")
    q.add_argument("--name", required=True, help="the distribution or application the fix is for")
    q.add_argument("--version", required=True, help="the version that has the flaw")
    q.add_argument("--fixed-in", metavar="VERSION", help="the release that has the fix")
    q.add_argument("--classification", default="security", choices=CLASSES)
    q.add_argument("--title")
    q.add_argument("--ref", action="append", help="a reference (CVE id, ticket); repeatable")
    q = subcommand("list", cmd_repo_list, "show a repository's verified catalog")
    repo_arguments(q, required=True)
