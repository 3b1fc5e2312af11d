"""The `livepatch` command. Human output by default, `--json` everywhere
(docs/json.md); every error is one line on stderr, or the one error shape
of CliError.to_json with --json.

Exit codes (also in README.md):
  0  success
  1  error (a file missing or unreadable, I/O, a program `run` cannot start)
  2  usage error (an unknown option, a missing argument, a value out of
     range or of the wrong form, options that exclude each other)
  3  refused: the patch or build was refused (baseline mismatch, busy
     target, incompatible change, refused source change, no code for the
     process's Python version, downgrade)
  4  verification failed (signature, tampered or invalid bundle)
  5  no such process, or no agent reachable in it
  6  partial: a service was left with some processes patched and others
     not (`--continue`, or a rollback after a refusal that failed)
  130  interrupted (Ctrl-C)
"""

from __future__ import annotations

import os
import sys

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_REFUSED, EXIT_VERIFY, EXIT_NO_AGENT = 0, 1, 2, 3, 4, 5
EXIT_PARTIAL = 6


# the error "type" in --json when nothing more precise names the error
_ERROR_TYPES = {EXIT_ERROR: "Error", EXIT_USAGE: "UsageError", EXIT_REFUSED: "Refused",
                EXIT_VERIFY: "VerificationFailed", EXIT_NO_AGENT: "NoAgent", EXIT_PARTIAL: "Partial",
                130: "Interrupted"}


class CliError(Exception):
    """An error a person can act on: one line, an exit code, and for --json a
    type (the agent's error class when it comes from one) and details."""

    def __init__(self, message: str, code: int = EXIT_ERROR, details=None, kind: str | None = None):
        super().__init__(message)
        self.code, self.details = code, details or {}
        named = self.details.get("error")
        self.kind = kind or (named if isinstance(named, str) and named else _ERROR_TYPES.get(code, "Error"))

    def to_json(self) -> dict:
        """The one error shape of every command's --json."""
        extra = {k: v for k, v in self.details.items() if k not in ("error", "message", "type")}
        return {"error": {"type": self.kind, "message": str(self), "exit_code": self.code, **extra}}


def usage_error(message: str) -> CliError:
    return CliError(message, EXIT_USAGE, kind="UsageError")


def _invalid(message: str) -> Exception:
    """A value of the wrong form, as argparse reports it (argparse is
    imported with the parser that calls a value's type, not before)."""
    import argparse
    return argparse.ArgumentTypeError(message)


# ---------------------------------------------------------------- output

def printable(text, keep: str = "") -> str:
    """`text` safe to put on a terminal: control and format characters (ANSI
    escapes, carriage returns, bidi overrides) and lone surrogates, except
    those in `keep`, shown as Python escapes. For anything an agent or a
    bundle said."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() or ch in keep else ascii(ch)[1:-1] for ch in text)


def table(rows: list[dict], columns: list[str]) -> str:
    if not rows:
        return "(none)"
    cells = [[printable(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def _emit(args, data, human) -> None:
    if getattr(args, "json", False):
        import json
        print(json.dumps(data, indent=2, sort_keys=True, default=str))
    else:
        print(printable(human(data) if callable(human) else human, keep="\n"))


def _problems_text(problems) -> str:
    return "\n".join(f"  - [{p['category']}] {p['target'] + ': ' if p['target'] else ''}{p['message']}" for p in problems)


def _patch_error(exc) -> CliError:
    from .bundle import BundleError
    from .signing import SignatureError
    code = EXIT_VERIFY if isinstance(exc, (BundleError, SignatureError)) else EXIT_REFUSED
    return CliError(str(exc).splitlines()[0], code, exc.to_dict())


# ---------------------------------------------------------------- bundles

def cmd_keygen(args):
    from .signing import generate
    prefix = args.output
    directory = os.path.dirname(prefix) or "."
    if not os.path.basename(prefix) and not prefix.endswith("/"):
        raise CliError("give a PREFIX for the two files, such as ops (ops.key and ops.pub)", EXIT_USAGE)
    if prefix.endswith("/") or os.path.isdir(prefix):
        raise CliError(f"{prefix} is a directory: give a prefix for the two files, such as {os.path.join(prefix, 'ops')}")
    if not os.path.isdir(directory):
        raise CliError(f"cannot write {prefix}.key: there is no directory {directory}")
    for path in (prefix + ".key", prefix + ".pub"):
        if os.path.lexists(path):
            raise CliError(f"{path} already exists: not overwriting a key (remove it first, or choose another PREFIX)")
    try:
        key, pub, kid = generate(prefix)
    except FileExistsError as exc:  # made meanwhile
        raise CliError(f"{exc.filename} already exists: not overwriting a key") from None
    except OSError as exc:
        raise CliError(f"cannot write {exc.filename or prefix}: {exc.strerror or exc}") from None
    _emit(args, {"private": key, "public": pub, "key_id": kid},
          lambda d: f"private key {d['private']} (keep it secret)\npublic key  {d['public']} (give to agents: --trust)\nkey id      {d['key_id']}")


def cmd_build(args):
    import stat
    from .builder import BuildError, UnknownInterpreter, build
    from .errors import PatchError
    from .signing import SignatureError, load_private
    # everything the operator named is checked before any work: nothing is written on an error
    out_dir = os.path.dirname(args.output) or "."
    if not os.path.isdir(out_dir):
        raise CliError(f"cannot write {args.output}: there is no directory {out_dir}")
    if os.path.isdir(args.output):
        raise CliError(f"cannot write {args.output}: it is a directory")
    try:
        if args.key and not stat.S_ISREG(os.stat(args.key).st_mode):  # a FIFO would block the read
            raise CliError(f"cannot read the key {args.key}: not a regular file")
        key = load_private(args.key) if args.key else None
    except OSError as exc:
        raise CliError(f"cannot read the key {args.key}: {exc.strerror}") from None
    except SignatureError as exc:
        raise CliError(str(exc).splitlines()[0]) from None
    baseline, patched, trees = _build_trees(args)
    try:
        data, summary = build(baseline, patched, patch_id=args.id, pythons=args.python or (),
                              title=args.title or "", description=args.description or "", references=args.ref or (),
                              classification=args.classification, requires=args.requires or (),
                              cumulative=args.cumulative, name=args.name, version=args.version,
                              allow=args.allow or (), allow_active=args.allow_active or (), private_key=key,
                              sequence=args.sequence or 1, lineage=args.lineage, hooks=args.hooks,
                              only=args.only or ())
    except UnknownInterpreter as exc:
        raise CliError(str(exc).splitlines()[0], EXIT_USAGE, exc.to_dict()) from None
    except BuildError as exc:
        raise CliError(str(exc).splitlines()[0], EXIT_ERROR, exc.to_dict()) from None
    except PatchError as exc:
        raise _patch_error(exc) from None
    finally:
        trees.close()
    _check_allow_active(args.allow_active or (), summary["targets"])
    # write via a temp file in the same directory: never a half-written bundle
    tmp = f"{args.output}.tmp{os.getpid()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, args.output)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as exc:
        raise CliError(f"cannot write {args.output}: {exc.strerror}") from None
    summary.update(output=args.output, size=len(data), signed=key is not None)

    def human(s):
        lines = [f"built {s['output']} ({s['size']} bytes, {'signed' if s['signed'] else 'UNSIGNED'})",
                 f"patch {s['id']} against {s['baseline']['name']} {s['baseline']['version']} for {', '.join(s['pythons'])}",
                 f"sequence {s['sequence']}" + (f" in lineage {s['lineage']}" if s["lineage"] else "")
                 + ("" if args.sequence else " (the default: a later bundle for this baseline needs --sequence 2 or higher)")]
        for module, names in s["targets"].items():
            lines.append(f"  {module}: {', '.join(names)}")
        if s["data_changes"]:
            lines.append(f"  data changes: {', '.join(s['data_changes'])}")
        if s["new_globals"]:
            lines.append(f"  new globals: {', '.join(s['new_globals'])}")
        for o in s["overridden"]:
            lines.append(f"  OVERRIDDEN [{o['category']}] {o['target']}: {o['message']}")
        if s.get("new_modules"):
            lines.append(f"  new modules (importable while the patch is in): {', '.join(s['new_modules'])}")
        if s.get("left_out"):
            lines.append(f"  left out (not selected by --only): {', '.join(s['left_out'])}")
        if s.get("hooks"):
            lines.append(f"  hooks: {', '.join(s['hooks'])} (run around apply and rollback, never by the build)")
        for i in s.get("ignored", ()):
            lines.append(f"  ignored [{i['category'].partition(':')[2]}] {i['target']}: {i['message']}")
        if s.get("made_at_apply"):
            lines.append(f"  made at apply time, before the pause (runs the bundle's code): {', '.join(s['made_at_apply'])}")
        for note in s.get("not_updated", ()):
            lines.append(f"  NOT UPDATED {note}")
        for note in s.get("recomputed", ()):
            lines.append(f"  recomputed {note}")
        for w in s.get("warnings", ()):
            lines.append(f"  WARNING {w['target']}: {w['message']}")
        for skipped in s.get("skipped", ()):
            lines.append(f"  skipped {skipped}")
        return "\n".join(lines)
    _emit(args, summary, human)


def _check_allow_active(names, targets: dict) -> None:
    """Each --allow-active names a function this bundle changes (QUALNAME or
    module:QUALNAME): a typo would otherwise build a bundle that waits for
    a serve loop which never leaves the stack."""
    changed = [f"{module}:{q}" for module, qualnames in targets.items() for q in qualnames]
    for name in names:
        if name not in changed and not any(t.partition(":")[2] == name for t in changed):
            raise usage_error(f"--allow-active {name}: the patch changes no function of that name "
                              f"(it changes {', '.join(changed[:8]) or 'none'}{', ...' if len(changed) > 8 else ''})")


def _build_trees(args):
    """(baseline, patched, cleanup) from two tree paths or from --from/--to releases."""
    import contextlib
    stack = contextlib.ExitStack()
    if args.from_release is None and args.to_release is None:
        if args.diff is not None:
            return _diff_tree(args, stack)
        if args.patched is None:
            raise CliError("build needs BASELINE and PATCHED trees, BASELINE --diff FIX.patch, "
                           "or --from PKG==A --to PKG==B", EXIT_USAGE)
        return args.baseline, args.patched, stack

    if args.from_release is None or args.to_release is None or args.baseline is not None:
        raise CliError("--from PKG==A and --to PKG==B go together, in place of the BASELINE and PATCHED trees",
                       EXIT_USAGE)
    from .builder import BuildError
    from .errors import PatchError
    from .releases import release_trees
    try:
        baseline, patched, _ = stack.enter_context(release_trees(args.from_release, args.to_release))
    except BuildError as exc:
        raise CliError(str(exc).splitlines()[0], EXIT_ERROR, exc.to_dict()) from None
    except PatchError as exc:
        raise _patch_error(exc) from None
    return baseline, patched, stack


def _diff_tree(args, stack):
    """The baseline and a private copy of it with --diff applied."""
    if args.baseline is None or args.patched is not None:
        raise CliError("--diff FIX.patch takes the place of the PATCHED tree: build BASELINE --diff FIX.patch", EXIT_USAGE)
    from .difftree import DiffRefused, patched_copy
    try:
        return args.baseline, stack.enter_context(patched_copy(args.baseline, args.diff)), stack
    except DiffRefused as exc:
        raise CliError(str(exc), EXIT_REFUSED) from None


def _only_pattern(text: str) -> str:
    from .selection import check_patterns
    try:
        return check_patterns([text])[0]
    except ValueError as exc:
        raise _invalid(str(exc)) from None


def _release_spec(text: str) -> str:
    from .releases import parse_spec
    try:
        parse_spec(text)
    except ValueError as exc:
        raise _invalid(str(exc)) from None
    return text


def cmd_authorize_rollback(args):
    from .authorization import make
    from .errors import PatchError
    from .signing import load_private
    out_dir = os.path.dirname(args.output) or "."
    if not os.path.isdir(out_dir):  # before the key is used: nothing is signed for nowhere
        raise CliError(f"cannot write {args.output}: there is no directory {out_dir}")
    if os.path.lexists(args.output):
        raise CliError(f"{args.output} already exists: not overwriting it (remove it first, or choose another -o)")
    bundle = _read_bundle(args.bundle, None, allow_unsigned=True)
    if bundle.signature is None:
        raise CliError(f"{args.bundle} is not signed: a patch applied unsigned needs no rollback authorisation")
    try:
        data = make(bundle, load_private(args.key), args.valid_hours * 3600)
    except PatchError as exc:
        raise CliError(str(exc).splitlines()[0]) from None
    except OSError as exc:
        raise CliError(f"cannot read {args.key}: {exc.strerror}") from None
    try:  # never overwrite, never follow a planted link
        fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    except FileExistsError:
        raise CliError(f"{args.output} already exists: not overwriting it (remove it first, or choose another -o)") from None
    except OSError as exc:
        missing = os.path.dirname(args.output) or "."
        if not os.path.isdir(missing):
            raise CliError(f"cannot write {args.output}: there is no directory {missing}") from None
        raise CliError(f"cannot write {args.output}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(data + b"\n")
    import json
    body = json.loads(data)["authorization"]
    import time
    out = {"output": args.output, "patch": body["patch"], "bundle_sha256": body["bundle_sha256"],
           "expires": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(body["expires"]))}
    _emit(args, out, lambda d: f"wrote {d['output']}: authorises rolling back {d['patch']} "
          f"(bundle {d['bundle_sha256'][:12]}) until {d['expires']}")


def _sequence(text: str) -> int:
    from .builder import BuildRefused, check_sequence
    try:
        return check_sequence(int(text) if text.strip().isdigit() else text)
    except BuildRefused as exc:
        raise _invalid(str(exc)) from None


def _lineage(text: str) -> str:
    from .builder import BuildRefused, check_lineage
    try:
        return check_lineage(text)
    except BuildRefused as exc:
        raise _invalid(str(exc)) from None


def seconds(text: str) -> float:
    """--timeout: what the agent accepts (0 to 600 s), refused here as a usage error."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 600:
        raise _invalid(f"must be a number of seconds from 0 to 600, got {text[:40]!r}")
    return value


def patch_id(text: str) -> str:
    from .bundle import valid_id
    if not valid_id(text):
        raise _invalid(f"{text[:40]!r} is not a patch id: letters, digits, '.', '_' and '-', "
                                         "starting with a letter or digit, at most 128 (e.g. HP-DOCS-1)")
    return text


def service_name(text: str) -> str:
    from livepatch.agent.state_dir import UnsafeState, validate_name
    try:
        return validate_name(text)
    except UnsafeState:
        raise _invalid(f"{text[:40]!r} is not a service name: letters, digits, '.', '_' and '-', "
                                         "starting with a letter or digit, at most 64, no '..'") from None


def _allow_category(text: str) -> str:
    from .builder import OVERRIDABLE
    if text not in OVERRIDABLE:
        raise _invalid(f"{text[:40]!r} cannot be overridden: choose from {', '.join(OVERRIDABLE)}")
    return text


def trust_path(option: str, path: str) -> None:
    """A --trust that names nothing is a mistake of the command line, said
    before anything is read or sent."""
    if not os.path.lexists(path):
        raise CliError(f"{option} {path}: no such file or directory (give the trust directory or a .pub key file)")


def _hours(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value <= 720:
        raise _invalid(f"must be a number of hours above 0 and at most 720, got {text[:40]!r}")
    return value


def read_bundle_bytes(path: str) -> bytes:
    from .bundlefile import MAX_BUNDLE_BYTES, read_file
    try:
        data = read_file(path)
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}") from None
    if len(data) > MAX_BUNDLE_BYTES:
        raise CliError(f"{path} is larger than a bundle may be ({MAX_BUNDLE_BYTES} bytes)", EXIT_VERIFY)
    return data


def _read_bundle(path: str, trust=None, allow_unsigned=True):
    from .bundle import read
    from .errors import PatchError
    try:
        return read(read_bundle_bytes(path), trust, allow_unsigned=allow_unsigned)
    except PatchError as exc:
        raise _patch_error(exc) from None


def cmd_verify(args):
    trust_path("--trust", args.trust)
    bundle = _read_bundle(args.bundle, args.trust, allow_unsigned=False)
    _emit(args, {"bundle": args.bundle, "id": bundle.id, "valid": True, "signed_by": bundle.signed_by},
          lambda d: f"{d['bundle']}: {d['id']} is intact and signed by trusted key {d['signed_by']}")


def _inspect_choices(m: dict) -> list[str]:
    """What the build included beyond code (hooks), ignored and left out."""
    lines = []
    if "hooks" in m:
        lines.append(f"hooks {m['hooks']['file']}: {', '.join(m['hooks']['functions'])} (run around apply and rollback)")
    if m.get("new_modules"):
        lines.append(f"new modules {', '.join(sorted(m['new_modules']))} (importable while the patch is in)")
    if "selection" in m:
        lines.append(f"selected with --only {' --only '.join(m['selection']['only'])}; left out: "
                     f"{', '.join(m['selection']['left_out']) or 'nothing'}")
    for i in m.get("ignored", ()):
        lines.append(f"ignored [{i['category'].partition(':')[2]}] {i['target']}: {i['message']}")
    for g in m["globals"]:
        if "built" in g:
            lines.append(f"recomputed {g['name']}: {g['built']['reason']}")
    for w in m.get("warnings", ()):
        lines.append(f"WARNING {w['target']}: {w['message']}")
    return lines


def cmd_inspect(args):
    from .signing import SignatureError
    if args.trust:
        trust_path("--trust", args.trust)
    problem = None
    try:
        bundle = _read_bundle(args.bundle, args.trust, allow_unsigned=args.trust is None)
    except CliError as exc:
        if exc.details.get("error") != SignatureError.__name__:
            raise
        bundle = _read_bundle(args.bundle, None, allow_unsigned=True)
        problem = str(exc)
    from .bundle import source_diffs
    m = bundle.manifest
    sig = bundle.signature
    # checked: against --trust; valid: None when not checked
    signature = {"signed": sig is not None, "key_id": sig["key_id"] if sig else None, "checked": args.trust is not None,
                 "valid": (problem is None and bool(bundle.signed_by)) if args.trust is not None else None,
                 "problem": problem}
    if problem:
        signature_text = f"SIGNATURE NOT VALID: {problem}"
    elif bundle.signed_by:
        signature_text = "signed by trusted key " + bundle.signed_by
    else:
        signature_text = f"signed by key {sig['key_id']} (not checked: give --trust)" if sig else "UNSIGNED"
    out = {"manifest": m, "signature": signature, "diffs": source_diffs(bundle)}

    def human(d):
        lines = [f"bundle {m['id']} (format {m['format']}): {m['title']}",
                 f"  classification {m['classification']}; references {', '.join(m['references']) or '-'}; created {m['created']}",
                 f"  baseline {m['baseline']['name']} {m['baseline']['version']}; pythons {', '.join(m['pythons'])}; "
                 f"sequence {m.get('sequence', '0 (made before bundles were ordered)')}"
                 + (f" in lineage {m['lineage']}" if m.get("lineage") else ""),
                 f"  {'cumulative' if m['cumulative'] else 'requires ' + (', '.join(m['requires']) or 'nothing')}",
                 f"  {signature_text}", ""]
        rows = [{"target": t["target"], "kind": t["kind"], "line": f"{t['file']}:{t['line']}",
                 "baseline": next(iter(t["code"].values()))["baseline"][:12],
                 "patched": next(iter(t["code"].values()))["patched"][:12]} for t in m["targets"]]
        lines.append(table(rows, ["target", "kind", "line", "baseline", "patched"]))
        if m["globals"]:
            lines += ["", table([{"global": g["name"], "kind": g["kind"],
                                  "value": g.get("value") or g.get("statement") or g.get("expression")
                                  or " ".join(line.strip() for line in g.get("source", "").splitlines())[:80]}
                                 for g in m["globals"]],
                                ["global", "kind", "value"])]
        for o in m["overrides"]:
            lines.append(f"OVERRIDDEN [{o['category']}] {o['target']}: {o['message']}")
        lines += _inspect_choices(m)
        for diff in d["diffs"].values():
            lines += ["", diff.rstrip()]
        return "\n".join(lines)
    _emit(args, out, human)


# ---------------------------------------------------------------- parser

class _Unused:
    """Stands for the parser of a command left out of `parser(only=...)`:
    whatever is added to it is dropped."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: self

    def __bool__(self):
        return False


def parser(only: str | None = None) -> argparse.ArgumentParser:
    """The command's parser; with `only`, the arguments of that command
    alone are defined (the other commands are left out)."""
    import argparse

    from .cli_argparse import Parser, Version
    ap = Parser(prog="livepatch", description="Hotpatch running Python processes.",
                                 epilog="exit codes: 0 ok, 1 error, 2 usage, 3 refused, 4 verification failed, 5 no agent/process, 6 partial, "
                                        "130 interrupted")
    ap.add_argument("--version", action=Version, nargs=0, default=argparse.SUPPRESS,
                    help="show the version and exit (as JSON after --json)")
    # also after the subcommand; a separate dest, as a subcommand's default would overwrite it
    ap.add_argument("--json", dest="json_first", action="store_true", help="machine-readable output (docs/json.md)")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, func, help):
        if only is not None and name != only:
            return _Unused()
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--json", action="store_true", help="machine-readable output (docs/json.md)")
        p.set_defaults(func=func)
        return p

    p = command("keygen", cmd_keygen, "create an Ed25519 signing key pair (PREFIX.key, PREFIX.pub)")
    p.add_argument("output", metavar="PREFIX")

    p = command("build", cmd_build, "build a bundle from a baseline and a patched source tree")
    p.add_argument("baseline", nargs="?")
    p.add_argument("patched", nargs="?")
    p.add_argument("--from", dest="from_release", type=_release_spec, metavar="PKG==A",
                   help="build from released wheels (fetched with pip): the release that runs ...")
    p.add_argument("--to", dest="to_release", type=_release_spec, metavar="PKG==B", help="... and the release with the fix")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--id", required=True, type=patch_id)
    p.add_argument("--classification", default="bugfix", choices=["security", "critical", "bugfix", "other"])
    p.add_argument("--title")
    p.add_argument("--description")
    p.add_argument("--ref", action="append", help="a reference (CVE id, ticket); repeatable")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--requires", action="append", metavar="ID", type=patch_id, help="a patch that must already be applied; repeatable")
    g.add_argument("--cumulative", action="store_true", help="replace all earlier patches in one commit")
    p.add_argument("--python", action="append", help="an interpreter to compile for; repeatable (default: this one)")
    p.add_argument("--key", help="private key to sign with")
    p.add_argument("--name", help="baseline application name")
    p.add_argument("--version", help="baseline application version")
    p.add_argument("--allow", action="append", metavar="CATEGORY", type=_allow_category, help="override a refusal category (decorator, statement)")
    p.add_argument("--allow-active", action="append", metavar="QUALNAME",
                   help="a function that never leaves the stack (a serve loop); repeatable")
    p.add_argument("--sequence", type=_sequence, metavar="N",
                   help="orders the bundles of one baseline: a later bundle needs a higher N (default 1)")
    p.add_argument("--lineage", type=_lineage, metavar="NAME",
                   help="the family of successive versions of one fix (e.g. HP-DOCS for HP-DOCS-1, HP-DOCS-2)")
    p.add_argument("--diff", metavar="FIX.patch", help="build from BASELINE and this unified diff applied to a "
                   "private copy of it (in place of PATCHED)")
    p.add_argument("--only", action="append", type=_only_pattern, metavar="PATTERN",
                   help="include only the changed functions matching MODULE:QUALNAME (fnmatch); repeatable")
    p.add_argument("--hooks", metavar="FILE", help="a module of state migration hooks (pre_apply, post_apply, "
                   "pre_rollback, post_rollback) carried and signed in the bundle; never run by the build")

    p = command("authorize-rollback", cmd_authorize_rollback,
                "sign a document that lets agents roll back one security or critical patch")
    p.add_argument("bundle", help="the bundle of the patch to authorise rolling back")
    p.add_argument("--key", required=True, help="private key whose public key the agents trust")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--valid-hours", type=_hours, default=24.0, metavar="H", help="how long it is valid (default 24)")

    p = command("verify", cmd_verify, "check a bundle's integrity and signature")
    p.add_argument("bundle")
    p.add_argument("--trust", required=True, metavar="KEYFILE_OR_DIR")

    p = command("inspect", cmd_inspect, "show a bundle's manifest, changed code and signature")
    p.add_argument("bundle")
    p.add_argument("--trust", metavar="KEYFILE_OR_DIR", help="check the signature against these keys")

    from . import cli_agent
    cli_agent.add_commands(command)
    # the commands of modules of their own, imported when one of theirs is
    # named (a name left out here only sends that command to the whole parser)
    if only in (None, "install", "repo"):
        from . import cli_repo
        cli_repo.add_commands(command)
    if only in (None, "updater"):
        from . import cli_updater
        cli_updater.add_commands(command)
    if only in (None, "installed"):
        from . import hotfixes
        hotfixes.add_commands(command)
    p = command("completion", cmd_completion, "print a shell completion script (bash or zsh)")
    p.add_argument("shell", choices=["bash", "zsh"])
    return ap


def cmd_completion(args):
    from .completion import script
    sys.stdout.write(script(parser(), args.shell))


def _wants_json(argv) -> bool:
    """--json anywhere before a `--` (what follows that belongs to `run`'s program)."""
    return "--json" in (argv[:argv.index("--")] if "--" in argv else argv)


def _report(exc: CliError, as_json: bool, prog: str) -> int:
    if as_json:
        import json
        print(json.dumps(exc.to_json(), indent=2, default=str))
    else:
        print(printable(f"{prog}: {exc}"), file=sys.stderr)
        if exc.details.get("problems"):
            print(printable(_problems_text(exc.details["problems"]), keep="\n"), file=sys.stderr)
    return exc.code


def _parse(argv: list) -> argparse.Namespace:
    """The arguments, parsed by a parser of the named command alone: making
    every command's parser is a third of a `livepatch status`. What that
    parser cannot settle (no command, a usage error, help before the
    command) is parsed by the whole parser, whose usage and help name every
    command. A status, apply or rollback written out in full is parsed
    without argparse (livepatch/cli_quick.py)."""
    from .cli_quick import parse
    args = parse(argv)
    if args is not None:
        return args
    name = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if name is not None and not {"-h", "--help"} & set(argv[:name]):
        try:
            return _parse_all(parser(only=argv[name]), argv)
        except CliError:
            pass
    return _parse_all(parser(), argv)


def _parse_all(p: argparse.ArgumentParser, argv: list) -> argparse.Namespace:
    """Arguments left over are named after the subcommand they were given
    to (argparse names the top-level `livepatch`)."""
    args, extra = p.parse_known_args(argv)
    if extra:
        raise CliError(f"unrecognized arguments: {' '.join(extra)} (see `{args.prog} --help`)", EXIT_USAGE,
                       {"command": args.prog}, kind="UsageError")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = _parse(argv)
    except CliError as exc:  # a usage error
        return _report(exc, _wants_json(argv), exc.details.get("command", "livepatch"))
    args.json = getattr(args, "json", False) or args.json_first
    try:
        args.func(args)
        return EXIT_OK
    except CliError as exc:
        return _report(exc, args.json, getattr(args, "prog", f"livepatch {args.command}"))
    except KeyboardInterrupt:
        return _report(CliError("interrupted (Ctrl-C)", 130), args.json, getattr(args, "prog", "livepatch"))
    except BrokenPipeError:  # output piped into `head` and the like
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    # run through the package module, so cli_agent and this share one CliError
    from livepatch.cli import main as _main
    sys.exit(_main())
