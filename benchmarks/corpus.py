"""The corpus of real security releases: does `livepatch build --from PKG==A
--to PKG==B` turn each into a bundle that fixes the running release live?

For every case in benchmarks/corpus/ (one file per release: the package, the
two versions, the advisory and an exploit check), this script
  1. installs the vulnerable release A (with its dependencies, wheels only)
     into a private target directory, and release B into another one;
  2. runs the check in a plain process on B: it must say "not vulnerable",
     or the check proves nothing (the control);
  3. starts a process on A under `livepatch run` and runs the check inside
     it (vulnerable expected);
  4. builds the bundle from the two published wheels, signed with a key
     made by `livepatch keygen`, exactly as an operator would (where the
     whole release is refused and the case names the fix's functions in
     ONLY, it builds again with --only, and says so);
  5. applies it to the running process, checks again (fixed expected),
     rolls it back with a signed authorisation, checks again (vulnerable).
Results: a table on stdout and benchmarks/results/corpus.json. Downloads
and installs are cached under benchmarks/results/corpus-cache/.

    python benchmarks/corpus.py              # every case
    python benchmarks/corpus.py --quick      # three cases
    python benchmarks/corpus.py --only NAME  # one case (repeatable)
    python benchmarks/corpus.py --checks-only  # does each check tell the two releases apart?
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CASES_DIR = os.path.join(HERE, "corpus")
RESULTS = os.path.join(HERE, "results")
CACHE = os.path.join(RESULTS, "corpus-cache")
QUICK = ("jinja2_3_1_4", "requests_2_31_0", "sqlparse_0_5_0")
CLI_TIMEOUT = 600
CHECK_TIMEOUT = 300


def load_case(name: str):
    spec = importlib.util.spec_from_file_location(f"corpus_case_{name}", os.path.join(CASES_DIR, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def case_info(name: str):
    """A case's PACKAGE, FROM, TO, ADVISORY, SUMMARY and REQUIRES, read from its
    source: the driver never imports the packages it tests."""
    import ast
    import types
    with open(os.path.join(CASES_DIR, f"{name}.py"), encoding="utf-8") as fh:
        tree = ast.parse(fh.read())
    info = {"REQUIRES": ()}
    for node in tree.body:
        if isinstance(node, ast.Assign):
            try:
                value = ast.literal_eval(node.value)
            except ValueError:  # not a literal: not one of the case's fields
                continue
            for target in node.targets:
                if isinstance(target, ast.Tuple):
                    info.update(zip((e.id for e in target.elts), value))
                elif isinstance(target, ast.Name) and target.id.isupper():
                    info[target.id] = value
    return types.SimpleNamespace(**info)


def case_names() -> list[str]:
    return sorted(f[:-3] for f in os.listdir(CASES_DIR) if f.endswith(".py") and not f.startswith("_"))


# ------------------------------------------------------------ inside the target

def serve(name: str, site: str) -> None:
    """The target process: the release on sys.path first, the case's check
    imported (and with it the package), then one check per line of stdin."""
    if sys.path and os.path.abspath(sys.path[0] or ".") == HERE:
        del sys.path[0]  # the benchmarks directory must not shadow anything
    sys.path.insert(0, site)
    sys.path.insert(1, CASES_DIR)  # the cases' shared measuring code
    case = load_case(name)
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "check":
            continue
        try:
            vulnerable, detail = case.check()
            answer = {"vulnerable": bool(vulnerable), "detail": str(detail)[:300]}
        except Exception as exc:  # a check that cannot run says why
            answer = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        print(json.dumps(answer), flush=True)


# ------------------------------------------------------------ the driver

def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=kw.pop("timeout", CLI_TIMEOUT), **kw)


def livepatch(*args, env=None):
    return run([sys.executable, "-m", "livepatch", *args], env=env)


def pip_env() -> dict:
    """pip reads the cached wheels only once they have been downloaded."""
    return dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")


def ensure_wheel(package: str, version: str) -> None:
    wheels = os.path.join(CACHE, "wheels")
    os.makedirs(wheels, exist_ok=True)
    r = run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--find-links", wheels,
             "-d", wheels, f"{package}=={version}"], env=pip_env())
    if r.returncode != 0:
        raise RuntimeError(f"cannot download {package}=={version}: {r.stderr.strip().splitlines()[-1:]}")


def ensure_site(case, version: str) -> str:
    """A target directory with the release and its dependencies installed."""
    site = os.path.join(CACHE, "sites", f"{case.PACKAGE}-{version}-{'-'.join(case.REQUIRES) or 'deps'}")
    site = site.replace("<", "lt").replace(">", "gt").replace("=", "")
    if os.path.isfile(os.path.join(site, ".complete")):
        return site
    shutil.rmtree(site, ignore_errors=True)
    r = run([sys.executable, "-m", "pip", "install", "-q", "--only-binary=:all:", "--ignore-installed", "--no-compile",
             "--target", site, f"{case.PACKAGE}=={version}", *case.REQUIRES], env=pip_env())
    if r.returncode != 0:
        raise RuntimeError(f"cannot install {case.PACKAGE}=={version}: {r.stderr.strip().splitlines()[-1:]}")
    open(os.path.join(site, ".complete"), "w").close()
    return site


def ensure_key() -> tuple[str, str]:
    keys = os.path.join(CACHE, "keys")
    trust = os.path.join(keys, "trusted")
    if not os.path.exists(os.path.join(keys, "corpus.key")):
        os.makedirs(keys, mode=0o700, exist_ok=True)
        r = livepatch("keygen", os.path.join(keys, "corpus"))
        if r.returncode != 0:
            raise RuntimeError(r.stderr)
    os.makedirs(trust, mode=0o700, exist_ok=True)
    shutil.copy(os.path.join(keys, "corpus.pub"), os.path.join(trust, "corpus.pub"))
    return os.path.join(keys, "corpus.key"), trust


class Target:
    """A process running one release, with an agent, answering checks."""

    def __init__(self, name: str, site: str, trust: str | None):
        cmd = [sys.executable, os.path.abspath(__file__), "--serve", name, site]
        if trust is not None:
            state = os.path.join(CACHE, "state", name)
            shutil.rmtree(state, ignore_errors=True)  # nothing recorded by an earlier run is re-applied
            os.makedirs(state, mode=0o700)
            cmd = [sys.executable, "-m", "livepatch", "run", "--name", f"corpus-{name}", "--trust", trust,
                   "--state-dir", state, "--", *cmd]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, cwd=CACHE, start_new_session=True)
        self.pid = self.proc.pid
        line = self._line()
        if line.strip() != "ready":
            self.stop()
            raise RuntimeError(f"the target did not start: {line!r} {self.proc.stderr.read()[-800:]}")

    def _line(self) -> str:
        import select
        ready, _, _ = select.select([self.proc.stdout], [], [], CHECK_TIMEOUT)
        if not ready:
            raise RuntimeError(f"no answer within {CHECK_TIMEOUT}s")
        return self.proc.stdout.readline()

    def check(self) -> dict:
        self.proc.stdin.write("check\n")
        self.proc.stdin.flush()
        line = self._line()
        if not line:
            return {"error": f"the target exited: {self.proc.stderr.read()[-800:]}"}
        return json.loads(line)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.proc.wait()


def _error_of(out: str) -> tuple[str, list]:
    try:
        data = json.loads(out)
    except ValueError:
        return out.strip()[:300], []
    err = data.get("error")
    if isinstance(err, dict):  # {"error": {"type", "message", "problems"}}
        return err.get("message", ""), err.get("problems") or data.get("problems") or []
    return data.get("message") or str(err), data.get("problems") or []


_INSTALLS = __import__("threading").Lock()


def run_case(name: str, key: str, trust: str, bundles: str) -> dict:
    case = case_info(name)
    rec = {"case": name, "package": case.PACKAGE, "from": case.FROM, "to": case.TO, "advisory": case.ADVISORY,
           "summary": case.SUMMARY}
    t0 = time.monotonic()
    try:
        with _INSTALLS:  # two cases may share a release: one pip at a time
            ensure_wheel(case.PACKAGE, case.FROM)
            ensure_wheel(case.PACKAGE, case.TO)
            site_a, site_b = ensure_site(case, case.FROM), ensure_site(case, case.TO)
    except RuntimeError as exc:
        rec.update(outcome="setup failed", error=str(exc))
        return rec
    control = Target(name, site_b, None)
    try:
        rec["control_on_fixed_release"] = control.check()
    finally:
        control.stop()
    target = Target(name, site_a, trust)
    try:
        rec["before"] = target.check()
        out = os.path.join(bundles, f"{name}.lpb")
        if os.path.exists(out):
            os.unlink(out)
        env = dict(os.environ, PIP_FIND_LINKS=os.path.join(CACHE, "wheels"), PIP_NO_INDEX="1")

        def build(*only):
            b0 = time.monotonic()
            r = livepatch("build", "--from", f"{case.PACKAGE}=={case.FROM}", "--to", f"{case.PACKAGE}=={case.TO}",
                          "-o", out, "--id", f"CORPUS-{name.upper().replace('_', '-')}", "--classification", "security",
                          "--ref", case.ADVISORY.split()[0], "--key", key, "--json",
                          *(a for pattern in only for a in ("--only", pattern)), env=env)
            return r, round(time.monotonic() - b0, 2)

        r, rec["build_seconds"] = build()
        if r.returncode == 3 and getattr(case, "ONLY", ()):
            # the whole release is refused; the operator selects the fix's functions with --only
            message, problems = _error_of(r.stdout or r.stderr)
            rec["whole_release"] = {"build": "refused", "build_message": message, "problems": problems}
            rec["selection"] = list(case.ONLY)
            r, rec["build_seconds"] = build(*case.ONLY)
        if r.returncode != 0:
            message, problems = _error_of(r.stdout or r.stderr)
            rec.update(build="refused" if r.returncode == 3 else "error", build_exit=r.returncode,
                       build_message=message, problems=problems, outcome="refused" if r.returncode == 3 else "build error")
            return rec
        summary = json.loads(r.stdout)
        rec.update(build="built", targets=summary.get("targets"), ignored=summary.get("ignored"),
                   bundle_bytes=summary.get("size"))
        a = livepatch("apply", str(target.pid), out, "--json")
        rec["applied"] = a.returncode == 0
        if a.returncode != 0:
            rec.update(apply_exit=a.returncode, apply_message=_error_of(a.stdout or a.stderr)[0],
                       outcome="apply refused")
            return rec
        rec["after_apply"] = target.check()
        auth = out + ".rollback"
        if os.path.exists(auth):
            os.unlink(auth)
        ar = livepatch("authorize-rollback", out, "--key", key, "-o", auth)
        rb = livepatch("rollback", str(target.pid), "--authorization", auth, "--json")
        rec["rolled_back"] = ar.returncode == 0 and rb.returncode == 0
        if not rec["rolled_back"]:
            rec["rollback_message"] = (ar.stderr + _error_of(rb.stdout or rb.stderr)[0])[:300]
        rec["after_rollback"] = target.check()
        fixed = rec["after_apply"].get("vulnerable") is False
        restored = rec["rolled_back"] and rec["after_rollback"].get("vulnerable") is True
        rec["fixed_live"], rec["rollback_restored"] = fixed, restored
        rec["outcome"] = "fixed live" if fixed and restored else ("fixed, rollback incomplete" if fixed else "applied, still vulnerable")
        if rec.get("selection") and rec["outcome"] == "fixed live":
            rec["outcome"] = "fixed live with --only"
        return rec
    finally:
        target.stop()
        rec["seconds"] = round(time.monotonic() - t0, 1)
        # a check that does not tell the releases apart makes the case unusable, whatever happened
        if rec.get("before", {}).get("vulnerable") is not True or rec.get("control_on_fixed_release", {}).get("vulnerable") is not False:
            rec["check_valid"] = False
            rec["outcome"] = "check invalid"
        else:
            rec["check_valid"] = True


def table(records: list[dict]) -> str:
    rows = [("case", "advisory", "build", "applied", "fixed live", "rollback", "outcome")]
    for r in records:
        rows.append((f"{r['package']} {r['from']}->{r['to']}", r["advisory"].split()[0],
                     r.get("build", "-") + (" (--only)" if r.get("selection") else ""),
                     {True: "yes", False: "no"}.get(r.get("applied"), "-"),
                     {True: "yes", False: "no"}.get(r.get("fixed_live"), "-"),
                     {True: "restored", False: "NOT restored"}.get(r.get("rollback_restored"), "-"), r["outcome"]))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
    for r in records:
        if r.get("selection"):
            lines.append(f"  {r['case']}: whole release refused ({len(r['whole_release']['problems'])} problems); "
                         f"built with --only {' --only '.join(r['selection'])}")
        for p in r.get("problems", ()):
            lines.append(f"  {r['case']}: [{p.get('category')}] {p.get('target')}: {p.get('message')}")
        for k in ("build_message", "apply_message", "error"):
            if r.get(k) and not r.get("problems"):
                lines.append(f"  {r['case']}: {r[k]}")
    valid = [r for r in records if r.get("check_valid")]
    fixed = sum(1 for r in valid if r["outcome"] == "fixed live")
    selected = sum(1 for r in valid if r["outcome"] == "fixed live with --only")
    lines.append(f"fixed live and restored by rollback: {fixed} of {len(valid)} cases with a valid check"
                 + (f" ({100 * fixed / len(valid):.0f}%)" if valid else "")
                 + f" from the whole release; {fixed + selected} of {len(valid)}"
                 + (f" ({100 * (fixed + selected) / len(valid):.0f}%)" if valid else "") + " with --only where the case selects the fix")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", metavar="NAME", help="one case (file name without .py); repeatable")
    ap.add_argument("--quick", action="store_true", help=f"three cases: {', '.join(QUICK)}")
    ap.add_argument("--jobs", type=int, default=2, metavar="N", help="cases run side by side (default 2)")
    ap.add_argument("--serve", nargs=2, metavar=("NAME", "SITE"), help=argparse.SUPPRESS)
    ap.add_argument("--checks-only", action="store_true",
                    help="only run each check on both releases (no build): does it tell them apart?")
    args = ap.parse_args(argv)
    if args.serve:
        serve(*args.serve)
        return 0
    names = args.only or (list(QUICK) if args.quick else case_names())
    unknown = [n for n in names if n not in case_names()]
    if unknown:
        print(f"corpus.py: no case {unknown[0]!r} (cases: {', '.join(case_names())})", file=sys.stderr)
        return 2
    os.makedirs(CACHE, mode=0o700, exist_ok=True)
    with open(os.path.join(CACHE, ".gitignore"), "w") as fh:
        fh.write("*\n")
    if args.checks_only:
        for name in names:
            case = case_info(name)
            for version in (case.FROM, case.TO):
                try:
                    target = Target(name, ensure_site(case, version), None)
                except RuntimeError as exc:
                    print(f"{name} {version}: {exc}")
                    continue
                try:
                    print(f"{name} {version}: {target.check()}", flush=True)
                finally:
                    target.stop()
        return 0
    key, trust = ensure_key()
    bundles = os.path.join(CACHE, "bundles")
    os.makedirs(bundles, exist_ok=True)
    def one(name):
        rec = run_case(name, key, trust, bundles)
        print(f"{name}: {rec['outcome']} ({rec.get('seconds', 0)}s)", flush=True)
        return rec

    # cases are independent (own process, state directory and bundle); most of a case's
    # time is spent waiting for interpreters to start, so a few can run side by side
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        records = list(pool.map(one, names))
    print(table(records))
    valid = [r for r in records if r.get("check_valid")]
    result = {"python": platform.python_version(), "machine": platform.machine(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "cases": records, "valid_cases": len(valid),
              "fixed_live": sum(1 for r in valid if r["outcome"] == "fixed live"),
              "fixed_live_with_only": sum(1 for r in valid if r["outcome"] == "fixed live with --only")}
    name = "corpus.json" if not (args.only or args.quick) else "corpus-quick.json"
    with open(os.path.join(RESULTS, name), "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"wrote {os.path.join(RESULTS, name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
