"""The service forms of `livepatch ps`, `status`, `history`, `apply` and
`rollback`: acting on every process of a service (livepatch/tree.py finds
them) from this one process, with concurrent requests (livepatch/fanout.py).

Apply is all or nothing across the service unless the operator asks to
continue: every process verifies and checks the bundle first (`assess`);
only if all would apply does any commit; if one then refuses or fails, the
processes that had already committed roll back. Afterwards the service is
looked at once more, so workers forked or spawned meanwhile get the patch
too (a forked one usually inherited it)."""

from __future__ import annotations

import json
import time

from . import fanout, tree
from .cli import EXIT_NO_AGENT, EXIT_PARTIAL, EXIT_USAGE, EXIT_REFUSED, EXIT_VERIFY, CliError, _emit, _problems_text, read_bundle_bytes, table

ASSESS_WAIT = 60.0
VERIFY_ERRORS = ("BundleError", "SignatureError")
# outcomes that leave the patch in effect in a process, and those plus waiting for an import
PATCHED = ("patched", "already applied", "inherited", "re-applied")
IN_EFFECT = (*PATCHED, "pending")
EXIT_INTERRUPTED = 130  # Ctrl-C, as for any command


def find(args) -> tree.Service:
    if args.tree and not args.target.isdigit():
        raise CliError(f"--tree needs a PID, not {args.target!r}", EXIT_USAGE)
    try:
        return tree.find(args.target, args.tree)
    except tree.NoSuchService as exc:
        raise CliError(str(exc), EXIT_NO_AGENT) from None


def _ns(ns) -> str:
    return f"{ns / 1000:.1f} µs" if ns < 10_000_000 else f"{ns / 1e6:.1f} ms"


def _pid_cell(member_depth: int, pid: int) -> str:
    return "  " * member_depth + str(pid)


# A process that exits during the operation (a worker recycled by gunicorn's
# --max-requests, a pool's maxtasksperchild) is often still exiting when its
# request fails: its socket is gone or the connection was reset, but /proc
# still lists it. It gets this long to finish before it counts as failed.
EXIT_WAIT = 2.0


def _gone(pids, wait: float = EXIT_WAIT) -> set[int]:
    """Those of `pids` that have exited (a zombie, exited but not reaped,
    included), giving them up to `wait` seconds together to finish."""
    import psutil
    pids, gone = set(pids), set()
    deadline = time.monotonic() + wait
    while True:
        for pid in pids - gone:
            try:
                if psutil.Process(pid).status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
                    gone.add(pid)
            except psutil.NoSuchProcess:
                gone.add(pid)
            except psutil.Error:
                pass  # there, but not ours to look at: alive
        if gone == pids or time.monotonic() >= deadline:
            return gone
        time.sleep(0.02)


def _exited_among(outcomes) -> set[int]:
    """The PIDs of failed outcomes whose process exited meanwhile. A lost
    connection or an agent's own failure may be that exit under way, so
    those get EXIT_WAIT; a refusal or a timeout is an answer (or a long
    silence) from a live agent, so those are only looked at once."""
    from .cli_agent import _REFUSALS
    failed = [o for o in outcomes if not o.ok and o.error != fanout.CANCELLED]
    final = {o.pid for o in failed if o.error in _REFUSALS or o.error in VERIFY_ERRORS or o.error == fanout.TIMEOUT}
    return _gone(final, wait=0) | _gone({o.pid for o in failed} - final)


# ---------------------------------------------------------------- ps / status / history

def _doing(m: tree.Member) -> str:
    """' (applying X)' while the process waits for a safe point for an apply or rollback."""
    doing = ((m.status or {}).get("agent") or {}).get("in_progress") or (m.status or {}).get("in_progress")
    if not doing:
        return ""
    verb = {"apply": "applying", "rollback": "rolling back", "import": "patching on import"}.get(doing.get("action"), "busy with")
    return f" ({verb} {doing.get('patch')})"


def runs_text(m: tree.Member) -> str:
    """The release a process runs, as its agent found it (declared at start
    or from installed metadata), never what an applied bundle was built for."""
    base = (m.status or {}).get("baseline") or {}
    if not base.get("name"):
        return "-"
    return f"{base['name']} {base['version']}" if base.get("version") else f"{base['name']} (version unknown)"


def ps(args):
    services = tree.everything()
    rows = [{"service": s.label, **m.row()} for s in services for m in s.members]

    def human(_):
        lines = []
        for s in services:
            workers = len(s.workers)
            lines.append(f"{s.label}: {len(s.members)} process{'es' if len(s.members) != 1 else ''}, "
                         f"{workers} serving")
            cells = [{"pid": _pid_cell(m.depth, m.pid), "role": m.role, "python": m.row()["python"] or "?",
                      "runs": runs_text(m), "patches": ",".join(m.applied) or "-",
                      "state": m.state + (f" ({', '.join(m.pending)})" if m.pending else "") + _doing(m)
                      + (" (dev: unsigned allowed)" if m.row()["development_mode_unsigned_bundles"]
                         else " (no trusted keys)" if m.answering and not m.status.get("agent", {}).get("trusted_keys")
                         else ""),
                      "command": m.command[:60]} for m in s.members]
            lines += ["  " + line for line in table(cells, ["pid", "role", "python", "runs", "patches", "state", "command"]).splitlines()]
        lines.append("workers serve requests; a master only starts and watches its workers" if services
                     else "no process on this machine has a livepatch agent")
        return "\n".join(lines)
    _emit(args, rows, human)


def status(args):
    svc = find(args)
    data = {"service": svc.label, "processes": [{**m.row(), "status": m.status} for m in svc.members]}

    def human(d):
        lines = [f"service {svc.label}: {len(svc.members)} processes, {len(svc.workers)} serving"]
        cells = [{"pid": _pid_cell(m.depth, m.pid), "role": m.role + (" (serves)" if m.serves else ""),
                  "state": m.state + _doing(m), "patches": ",".join(m.applied) or "-",
                  "pending": ",".join(m.pending) or "-", "python": m.row()["python"] or "?",
                  "baseline": runs_text(m)} for m in svc.members]
        lines.append(table(cells, ["pid", "role", "state", "patches", "pending", "python", "baseline"]))
        for m in svc.members:
            if m.error:
                lines.append(f"process {m.pid}: {m.error}")
            for w in (m.status or {}).get("warnings", []):
                lines.append(f"WARNING in process {m.pid}: {w}")
        return "\n".join(lines)
    _emit(args, data, human)


def history(args):
    svc = find(args)
    outcomes = fanout.request_all(svc.pids, "history", wait=tree.STATUS_WAIT)
    # processes of a service may share one persisted history (each entry names
    # its pid): merge, keep each event once, oldest first
    events, seen = [], set()
    for m in svc.members:
        o = outcomes[m.pid]
        for e in (o.result or []) if o.ok else []:
            e = {**e, "pid": e.get("pid", m.pid)}
            key = json.dumps(e, sort_keys=True, default=str)
            if key not in seen:
                seen.add(key)
                events.append(e)
    events.sort(key=lambda e: (str(e.get("time", "")), e["pid"]))
    data = {"service": svc.label,
            "processes": [{"pid": m.pid, "role": m.role, "serves": m.serves,
                           **({} if outcomes[m.pid].ok else {"error": outcomes[m.pid].describe()})} for m in svc.members],
            "history": events}

    def human(d):
        rows = [{"time": e.get("time", ""), "pid": e["pid"], "action": e.get("action", ""),
                 "patch": e.get("patch", ""), "outcome": e.get("outcome", ""),
                 "reason": (e.get("reason") or "").splitlines()[0][:60] if e.get("reason") else ""} for e in d["history"]]
        lines = [table(rows, ["time", "pid", "action", "patch", "outcome", "reason"])]
        lines += [f"process {p['pid']}: {p['error']}" for p in d["processes"] if p.get("error")]
        return "\n".join(lines)
    _emit(args, data, human)


# ---------------------------------------------------------------- apply

class _Report:
    """One line per process, and the counts the summary is made of."""

    def __init__(self, svc: tree.Service):
        self.svc = svc
        self.procs: dict[int, dict] = {}
        # one that did not answer while the service was looked at may have been exiting
        exited = _gone(m.pid for m in svc.members if not m.answering)
        for m in svc.members:
            self.add(m, exited=exited)

    def add(self, m: tree.Member, newcomer: bool = False, exited=None) -> dict:
        rec = self.procs[m.pid] = {"pid": m.pid, "parent": m.parent, "role": m.role, "serves": m.serves,
                                   "depth": m.depth, "newcomer": newcomer, "outcome": "", "detail": ""}
        if not m.answering:
            if m.pid in (_gone([m.pid]) if exited is None else exited):
                self.exited(m.pid)
            else:
                self.fail(m.pid, "not answering", m.error)
        return rec

    def exited(self, pid):
        self.procs[pid].update(outcome="gone", detail="the process exited meanwhile")

    def fail(self, pid, outcome, message, error="", problems=()):
        rec = self.procs[pid]
        rec.update(outcome=outcome, error=error, detail=message.splitlines()[0] if message else "")
        if problems:
            rec["problems"] = list(problems)

    def from_outcome(self, o: fanout.Outcome, exited=()):
        """A failed outcome; `exited`: the PIDs _exited_among found gone."""
        from .cli_agent import _REFUSALS
        if o.pid in exited:
            self.exited(o.pid)
            return
        kind = "refused" if o.error in _REFUSALS or o.error in VERIFY_ERRORS else "failed"
        self.fail(o.pid, kind, f"{o.error}: {o.message}", o.error, o.details.get("problems", ()))

    def relayout(self, now: tree.Service):
        for m in now.members:
            if m.pid in self.procs:
                # a master stays one when every worker it had exited meanwhile
                # (recycled, their replacements not listening yet): it still serves nothing
                role = "master" if self.procs[m.pid]["role"] == "master" else m.role
                self.procs[m.pid].update(parent=m.parent, role=role, serves=role == "worker", depth=m.depth)

    def with_outcome(self, *outcomes) -> list[int]:
        return [pid for pid, r in self.procs.items() if r["outcome"] in outcomes]

    def counts(self) -> dict:
        live = [r for r in self.procs.values() if r["outcome"] != "gone"]
        serving = [r for r in live if r["serves"]]
        masters = [r for r in live if not r["serves"]]
        return {"serving": len(serving),
                "serving_patched": sum(r["outcome"] in PATCHED for r in serving),
                "serving_pending": sum(r["outcome"] == "pending" for r in serving),
                "masters": len(masters),
                "masters_patched": sum(r["outcome"] in PATCHED for r in masters),
                "masters_pending": sum(r["outcome"] == "pending" for r in masters),
                "gone": sum(r["outcome"] == "gone" for r in self.procs.values())}

    def ordered(self) -> list[dict]:
        # processes in tree order, newcomers where the last look placed them
        order = {m.pid: i for i, m in enumerate(self.svc.members)}
        return sorted(self.procs.values(), key=lambda r: (order.get(r["pid"], len(order)), r["pid"]))


def _summary(c: dict) -> str:
    text = f"{c['serving_patched']} of {c['serving']} serving processes patched"
    if c["serving_pending"]:
        text += f", {c['serving_pending']} pending (target modules not imported yet; patched on import)"
    if c["masters"]:
        text += f"; {c['masters_patched']} of {c['masters']} master{'s' if c['masters'] != 1 else ''} patched"
        if c["masters_pending"]:
            text += f", {c['masters_pending']} pending"
    if c["gone"]:
        text += f"; {c['gone']} exited during the operation"
    return text


def _render(rep: _Report, headline: str, summary: str) -> str:
    cells = [{"pid": _pid_cell(r["depth"], r["pid"]), "role": r["role"] + (" (serves)" if r["serves"] else ""),
              "outcome": r["outcome"] + (" (new)" if r["newcomer"] else ""), "detail": r["detail"][:90]}
             for r in rep.ordered()]
    lines = [headline, table(cells, ["pid", "role", "outcome", "detail"])]
    for r in rep.ordered():
        if r.get("problems"):
            lines.append(f"process {r['pid']}:\n{_problems_text(r['problems'])}")
    lines.append(summary)
    return "\n".join(lines)


def busy_sentence(v: dict, timeout) -> str:
    from .cli_agent import busy_sentence
    return busy_sentence(v, timeout)


def _order_fields(args) -> dict:
    from .cli_agent import order_fields
    return order_fields(args)


def _commit(rep: _Report, pids, blob, args, tokens: dict) -> list[int]:
    """Apply in every PID at once; returns the ones that committed, and
    keeps each one's undo token (it lets this client roll that application
    back without an authorisation)."""
    done = []
    try:
        outcomes, interrupted = fanout.request_all(pids, "apply", wait=args.timeout + 60, bundle=blob, timeout=args.timeout,
                                                   force=args.force, **_order_fields(args)), False
    except fanout.Interrupted as exc:
        outcomes, interrupted = exc.outcomes, True
    exited = _exited_among(outcomes.values())
    for pid, o in outcomes.items():
        if o.error == fanout.CANCELLED:
            rep.procs[pid].update(outcome="cancelled", detail="cancelled (Ctrl-C) before any store")
        elif o.ok:
            r = o.result
            if r.get("undo_token"):
                tokens[pid] = r["undo_token"]
            rep.procs[pid].update(outcome="patched", pause_ns=r.get("pause_ns"), functions=r.get("functions"),
                                  detail=(f"{r.get('functions')} functions, pause {_ns(r.get('pause_ns') or 0)}"
                                          if r.get("functions") else "no target imported here yet")
                                  + (" (FORCED)" if r.get("forced") else ""))
            done.append(pid)
        else:
            rep.from_outcome(o, exited)
    if interrupted:
        raise _Cancelled(done)
    return done


class _Cancelled(Exception):
    """Ctrl-C during the commit phase; `done` committed before the cancel arrived."""

    def __init__(self, done):
        super().__init__("cancelled")
        self.done = done


def _cancelled(rep: _Report, svc: tree.Service, committed, patch_id, args, tokens, finish, name):
    """After Ctrl-C in the commit phase: undo what committed first, then say
    whether anything is left changed (exit 130 either way)."""
    undone = _back_out(rep, svc, committed, patch_id, args, tokens, "the apply was cancelled (Ctrl-C)") if committed else True
    unknown = [pid for pid, r in rep.procs.items() if r["outcome"] == "failed" and r.get("error") == fanout.TIMEOUT]
    if not undone:
        summary = (f"cancelled, but NOT fully rolled back: {len(rep.with_outcome('rollback failed'))} processes still run "
                   "the patch. " + _summary(rep.counts()))
    elif unknown:
        summary = (f"cancelled; {len(unknown)} processes did not confirm the cancel "
                   f"({', '.join(map(str, unknown))}): see `livepatch status`")
    else:
        summary = f"cancelled; nothing was changed in service {svc.label}" + (
            f" (the {len(committed)} processes that had committed first were rolled back)" if committed else "")
    finish(EXIT_INTERRUPTED, f"{name} on service {svc.label}: cancelled", summary)


def _undo(rep: _Report, pids, patch_id, args, why: str, tokens: dict, how: str = "committed") -> bool:
    """Roll `patch_id` back in `pids`; True if every one of them did."""
    outcomes = fanout.request_all(pids, "rollback", wait=args.timeout + 60, patch_id=patch_id,
                                  timeout=args.timeout, force=args.force,
                                  fields_for=lambda pid: {"undo_token": tokens[pid]} if pid in tokens else {})
    ok = True
    exited = _exited_among(outcomes.values())
    for pid, o in outcomes.items():
        if o.ok:
            rep.procs[pid].update(outcome="rolled back", detail=f"{how}, then rolled back: {why}")
        elif pid in exited:
            rep.exited(pid)
        else:
            ok = False
            rep.procs[pid].update(outcome="rollback failed", detail=f"STILL PATCHED: {o.describe()}"[:200])
    return ok


def _back_out(rep: _Report, svc: tree.Service, committed, patch_id, args, tokens: dict, why: str) -> bool:
    """Undo this apply wherever it took effect: in the processes that
    committed, then in any process started meanwhile that carries the patch
    (forked from one of them). True if every one of them rolled back; False
    also when one started meanwhile does not answer (it may run the patch)."""
    ok = _undo(rep, committed, patch_id, args, why, tokens)
    now, newcomers = tree.rediscover(svc)
    carriers = []
    for m in newcomers:
        if m.pid not in rep.procs:
            rep.add(m, newcomer=True)
        if not m.answering and rep.procs[m.pid]["outcome"] != "gone":
            ok = False
        if m.answering and patch_id in m.applied:
            carriers.append(m.pid)
            if m.parent in tokens:  # a forked child holds its parent's undo token too
                tokens[m.pid] = tokens[m.parent]
        elif m.answering:
            # e.g. forked in the middle of its parent's commit: the child's engine undid it
            rep.procs[m.pid].update(outcome="unchanged", detail="started during the apply, without the patch")
    if now.members:
        rep.svc = now
        rep.relayout(now)
    return _undo(rep, carriers, patch_id, args, why, tokens, how="started during the apply with the patch") and ok


def _not_undone(rep: _Report) -> str:
    """Why a back-out left something changed, for the summary."""
    failed = rep.with_outcome("rollback failed")
    silent = [pid for pid, r in rep.procs.items() if r["newcomer"] and r["outcome"] == "not answering"]
    return "".join([f"rollback failed in {len(failed)} processes, which still run the patch. " if failed else "",
                    f"{len(silent)} processes started during the apply did not answer and may run it. " if silent else ""])


def apply(args):
    from .client import encode_bundle
    blob = encode_bundle(read_bundle_bytes(args.bundle))  # read and encoded once for every process
    started = time.perf_counter()
    svc = find(args)
    rep = _Report(svc)
    answering = [m.pid for m in svc.members if m.answering]

    # phase 1: verify and check everywhere, changing nothing
    patch_id, ready = None, []
    tokens: dict[int, str] = {}
    waits = set()  # processes where part of the patch would wait for an import
    try:
        assessed = fanout.request_all(answering, "assess", wait=ASSESS_WAIT, bundles=[blob], **_order_fields(args))
    except KeyboardInterrupt:
        raise CliError("interrupted while checking the service; nothing was changed", EXIT_INTERRUPTED) from None
    exited = _exited_among(assessed.values())
    for pid, o in assessed.items():
        if not o.ok:
            rep.from_outcome(o, exited)
            continue
        v = o.result[0]
        patch_id = patch_id or v.get("patch_id")
        if v.get("pending"):
            waits.add(pid)
        if v["verdict"] == "refused":
            rep.fail(pid, "refused", f"{v.get('error')}: {v.get('message', '')}", v.get("error", ""), v.get("problems", ()))
        elif v["verdict"] == "already-applied":
            rep.procs[pid].update(outcome="already applied", detail="")
        else:
            # a suspended coroutine holding a target: the apply is still tried (it
            # waits up to --timeout), but a dry run does not promise it
            held = busy_sentence(v, args.timeout)
            blocked = v["verdict"] == "blocked" and not args.force
            rep.procs[pid].update(outcome="blocked" if blocked else "ready",
                                  detail=held or ", ".join(v.get("targets", []))[:90])
            ready.append(pid)
    blockers = rep.with_outcome("refused", "failed", "not answering")
    name = patch_id or args.bundle

    def finish(code, headline, summary):
        c = rep.counts()
        out = {"service": svc.label, "patch_id": patch_id, "bundle": args.bundle, "exit_code": code,
               "wall_ms": round((time.perf_counter() - started) * 1000, 1), **c,
               "processes": [{k: v for k, v in r.items() if k != "depth"} for r in rep.ordered()],
               "summary": summary}
        _emit(args, out, lambda o: _render(rep, headline, f"{summary} ({o['wall_ms']} ms)"))
        if code:
            raise SystemExit(code)

    from .cli_agent import verification_failed
    verify_failed = any(verification_failed(rep.procs[p].get("error", ""), rep.procs[p].get("problems", ()))
                        for p in blockers)
    if args.dry_run:
        held = rep.with_outcome("blocked")
        for pid in ready:
            if pid not in held:
                rep.procs[pid]["outcome"] = "would apply"
        finish(EXIT_VERIFY if verify_failed else EXIT_REFUSED if blockers or held else 0,
               f"dry run of {name} on service {svc.label}: nothing was changed",
               f"{len(ready) - len(held)} of {len(svc.members)} processes would apply it now" + (
                   f", {len(held)} blocked by a suspended coroutine or generator" if held else "") + (
                   f", {len(rep.with_outcome('already applied'))} already have it" if rep.with_outcome("already applied") else ""))
        return
    if blockers and not args.keep_going:
        for pid in ready:
            rep.procs[pid].update(outcome="unchanged", detail="would apply; not committed because another process refused")
        finish(EXIT_VERIFY if verify_failed else EXIT_REFUSED, f"{name} on service {svc.label}: refused",
               f"refused by {len(blockers)} of {len(svc.members)} processes; nothing was changed. " + _summary(rep.counts()))
        return

    # phase 2: commit everywhere at once (Ctrl-C cancels it everywhere)
    try:
        committed = _commit(rep, ready, blob, args, tokens)
    except _Cancelled as exc:
        return _cancelled(rep, svc, exc.done, patch_id, args, tokens, finish, name)
    failed = rep.with_outcome("refused", "failed")
    failed_now = [p for p in failed if p not in blockers]
    if failed_now and not args.keep_going:
        undone = _back_out(rep, svc, committed, patch_id, args, tokens, f"process {', '.join(map(str, failed_now))} refused")
        c = rep.counts()
        if undone:
            finish(EXIT_REFUSED, f"{name} on service {svc.label}: refused at commit",
                   f"refused by {len(failed_now)} of {len(svc.members)} processes at commit; "
                   f"the {len(committed)} that had committed were rolled back, nothing is left changed. " + _summary(c))
        else:
            finish(EXIT_PARTIAL, f"{name} on service {svc.label}: refused at commit, and NOT fully rolled back",
                   _not_undone(rep) + _summary(c))
        return

    # processes that appeared meanwhile, and where the patch waits for an import
    # (asked again only where the check said part of it would)
    now, newcomers = tree.rediscover(svc, ask=waits)
    rep.svc = now if now.members else svc
    rep.relayout(now)
    fresh = []
    for m in newcomers:
        rec = rep.add(m, newcomer=True)
        if not m.answering:
            continue
        if patch_id in m.applied:
            # a forked child carries its parent's patch stack entry as it was (same
            # measured pause); one spawned afresh applied the service's record itself
            entry = next(p for p in m.status["applied"] if p["id"] == patch_id)
            parent = rep.procs.get(m.parent) or {}
            if parent.get("pause_ns") is not None and parent.get("pause_ns") == entry.get("pause_ns"):
                rec.update(outcome="inherited", detail=f"forked from {m.parent} during the apply, with the patch")
            else:
                rec.update(outcome="re-applied", detail="started during the apply; applied the service's recorded patch at start")
        else:
            fresh.append(m.pid)
    if fresh:
        try:
            more = _commit(rep, fresh, blob, args, tokens)
        except _Cancelled as exc:
            return _cancelled(rep, svc, committed + exc.done, patch_id, args, tokens, finish, name)
        committed += more
        failed_new = [p for p in fresh if p not in more and rep.procs[p]["outcome"] in ("refused", "failed")]
        if failed_new and not args.keep_going:
            undone = _back_out(rep, svc, committed, patch_id, args, tokens,
                               f"process {', '.join(map(str, failed_new))}, started during the apply, refused")
            finish(EXIT_REFUSED if undone else EXIT_PARTIAL, f"{name} on service {svc.label}: refused by a new process",
                   ("the processes that had committed were rolled back, nothing is left changed. " if undone else
                    _not_undone(rep)) + _summary(rep.counts()))
            return
    for m in now.members:
        rec = rep.procs.get(m.pid)
        if rec and rec["outcome"] in IN_EFFECT and m.pending_of(patch_id):
            waiting = m.pending_of(patch_id)
            rec.update(outcome="pending", pending=waiting,
                       detail=f"waits for the import of {', '.join(sorted(waiting))}"
                       + ("" if rec["detail"] == "no target imported here yet" else "; " + rec["detail"]))
    c = rep.counts()
    left = rep.with_outcome("refused", "failed", "not answering")
    if left:
        finish(EXIT_PARTIAL, f"{name} on service {svc.label}: PARTIAL (--continue)",
               f"{len(left)} processes are not patched. " + _summary(c))
        return
    finish(0, f"{name} on service {svc.label}", _summary(c))


# ---------------------------------------------------------------- rollback

def rollback(args):
    svc = find(args)
    started = time.perf_counter()
    rep = _Report(svc)

    def has_work(m):
        return bool(m.applied) if args.all or not args.patch_id else args.patch_id in m.applied

    def targets(members):
        todo = []
        for m in members:
            if not m.answering:
                continue
            if has_work(m):
                todo.append(m.pid)
            else:
                rep.procs[m.pid].update(outcome="nothing to roll back",
                                        detail=f"{args.patch_id} is not applied" if args.patch_id and not args.all else "")
        return todo

    fields = {"all": True} if args.all else {"patch_id": args.patch_id} if args.patch_id else {}
    fields.update(_order_fields(args))

    interrupted = []

    def run(pids):
        if interrupted:
            return
        try:
            outcomes = fanout.request_all(pids, "rollback", wait=args.timeout + 60, timeout=args.timeout,
                                          force=args.force, **fields)
        except fanout.Interrupted as exc:
            outcomes = exc.outcomes
            interrupted.append(True)
        exited = _exited_among(outcomes.values())
        for pid, o in outcomes.items():
            if o.error == fanout.CANCELLED:
                rep.procs[pid].update(outcome="cancelled", detail="cancelled (Ctrl-C) before any store")
            elif o.ok:
                rep.procs[pid].update(outcome="rolled back", rolled_back=[r["patch_id"] for r in o.result],
                                      detail=", ".join(f"{r['patch_id']}" + (f" (pause {_ns(r['pause_ns'])})" if r.get("functions") else "")
                                                       for r in o.result))
            else:
                rep.from_outcome(o, exited)

    run(targets(svc.members))
    now, newcomers = tree.rediscover(svc)
    rep.relayout(now)
    for m in newcomers:
        rep.add(m, newcomer=True)
    run(targets(newcomers))
    done = rep.with_outcome("rolled back")
    failed = rep.with_outcome("refused", "failed", "not answering")
    what = "every patch" if args.all else args.patch_id or "the latest patch"
    serving = [r for r in rep.procs.values() if r["serves"] and r["outcome"] != "gone"]
    serving_clean = sum(r["outcome"] in ("rolled back", "nothing to roll back") for r in serving)
    summary = (f"rolled back {what} in {len(done)} processes; {serving_clean} of {len(serving)} serving processes "
               f"no longer run it" + (f"; failed in {len(failed)}" if failed else ""))
    code = 0 if not failed else EXIT_PARTIAL if done else EXIT_REFUSED
    if interrupted:
        code = EXIT_INTERRUPTED
        summary = (f"cancelled; nothing was changed in service {svc.label}" if not done and not failed else
                   f"cancelled after it had rolled back {what} in {len(done)} processes") + (
                       f"; failed or unconfirmed in {len(failed)}" if failed else "")
    out = {"service": svc.label, "exit_code": code, "wall_ms": round((time.perf_counter() - started) * 1000, 1),
           "processes": [{k: v for k, v in r.items() if k != "depth"} for r in rep.ordered()], "summary": summary}
    _emit(args, out, lambda o: _render(rep, f"rollback of {what} on service {svc.label}", f"{summary} ({o['wall_ms']} ms)"))
    if code:
        raise SystemExit(code)
