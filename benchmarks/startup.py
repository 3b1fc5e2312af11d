"""What the agent costs a process at start, and what a `livepatch`
command costs from start to exit, measured side by side in the package as a
user has it: a wheel built from this checkout, installed (not editable) in
a private virtual environment (benchmarks/installed.py; an editable
install's finder runs at every start and costs more than most of what is
measured here):

* start to main: wall time from just before the interpreter is started to
  the first statement of `__main__` (CLOCK_MONOTONIC is one clock for every
  process), for a plain interpreter, the same again (an A/A control: the
  noise floor of this machine), and one with LIVEPATCH_AUTOSTART=1 (the
  agent started by livepatch-autostart.pth, as under `livepatch run`); the
  three alternate in rotating order so drift hits all alike;
* modules: what `-X importtime` lists with and without the agent, and the
  modules the agent adds;
* the .pth check when LIVEPATCH_AUTOSTART is unset: two bare virtualenvs,
  identical except that one has livepatch-autostart.pth in site-packages,
  started alternately (plus an A/A pair), and the cost of processing that
  one line in-process (site.addpackage: open, read, exec);
* the commands end to end: the installed `livepatch` command (the script
  packaging/bin/livepatch, as pip installs it)
  running `status PID`, `apply PID BUNDLE` (a signed bundle for the HTTP
  demo service, which the agent verifies) and `rollback PID` against a live
  service, from just before the process is started to its exit, wall and
  CPU time, alternating with a bare interpreter of the same environment
  (the floor) and `status` again (an A/A control); and the first
  `status` a freshly started agent answers (it loads its request handling
  then);
* the CLI split: `livepatch status PID` against a live agent, its wall time
  split at the first statement of main and at the connect to the agent (an
  audit hook on socket.connect) into interpreter, imports and argument
  parsing, the request, and exit; twice (A/A) and, with --baseline REV, as
  the code was at REV; plus the modules it imports (-X importtime).

With `--baseline REV` the package as it was at git revision REV (livepatch/
and agent/, laid out as installed) is put first on PYTHONPATH for an extra
mode of each measurement, run alternately with the others (the commands end
to end through the launcher pip generated for the entry point the command
was then): before and after side by side, on one machine, under one load."""

from __future__ import annotations

import argparse
import io
import os
import resource
import shutil
import site
import subprocess
import sys
import tarfile
import tempfile
import time
import timeit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import installed  # noqa: E402
from common import machine, percentile, summary, write_result  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PTH = os.path.join(ROOT, "livepatch-autostart.pth")
DEMO = os.path.join(ROOT, "demo_apps", "http_api")
PATCHES = os.path.join(DEMO, "patches")
# the installed environment's interpreter and `livepatch` command (set in main)
PYTHON = sys.executable
LIVEPATCH = None
MAIN = "import time; print(time.monotonic_ns())"


def _clean_env(**extra) -> dict:
    # bytecode caches as an installed service has them: without, every start
    # compiles livepatch from source and that is what would be measured
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIVEPATCH_") and k != "PYTHONDONTWRITEBYTECODE"}
    env.update(extra)
    return env


def _children_cpu_ms() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (usage.ru_utime + usage.ru_stime) * 1e3


def _start_to_main_ms(python: str, env: dict) -> tuple[float, float]:
    """Wall time to the first statement of main, and the CPU time of the
    whole process (start, a one-line main, exit): on a loaded machine the
    wall time also counts waiting for a CPU, the CPU time does not."""
    cpu0 = _children_cpu_ms()
    t0 = time.monotonic_ns()
    # cwd: not the checkout, whose livepatch/ `-c` would import instead of a --baseline tree
    out = subprocess.run([python, "-c", MAIN], env=env, capture_output=True, text=True, timeout=60, cwd="/")
    if out.returncode != 0:
        raise SystemExit(f"{python} failed: {out.stderr.strip()}")
    return (int(out.stdout.split()[0]) - t0) / 1e6, _children_cpu_ms() - cpu0


def _alternate(modes: dict, rounds: int) -> dict:
    """modes: name -> (python, env). Each round runs every mode once, the
    order rotated by one each round."""
    names = list(modes)
    runs = {n: [] for n in names}
    for _ in range(2):  # warm the page cache for every mode first
        for n in names:
            _start_to_main_ms(*modes[n])
    for r in range(rounds):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            runs[n].append(_start_to_main_ms(*modes[n]))
    return runs


def _median(values):
    # the p50 that summary() reports: the differences printed are those of the p50s shown
    return percentile(values, 50)


def _report(runs: dict, base: str, control: str, subject: str) -> dict:
    out = {}
    for i, what in enumerate(("start_to_main_ms", "process_cpu_ms")):
        values = {n: [round(x[i], 3) for x in v] for n, v in runs.items()}
        med = {n: _median(v) for n, v in values.items()}
        out[what] = {n: summary(v) for n, v in values.items()}
        out[what]["median_extra_ms"] = round(med[subject] - med[base], 3)
        out[what]["aa_control_median_diff_ms"] = round(med[control] - med[base], 3)
    return out


def _agent_env(state_dir: str, **extra) -> dict:
    return _clean_env(**{"LIVEPATCH_AUTOSTART": "1", "LIVEPATCH_NAME": "startup-bench", "LIVEPATCH_STATE_DIR": state_dir,
                         **extra})


def agent_start(rounds: int, state_dir: str, baseline: str | None = None) -> dict:
    plain = _clean_env()
    modes = {"plain": (PYTHON, plain), "plain_again": (PYTHON, plain),
             "agent": (PYTHON, _agent_env(state_dir))}
    if baseline:
        modes["agent_baseline"] = (PYTHON, _agent_env(state_dir, PYTHONPATH=baseline))
    runs = _alternate(modes, rounds)
    out = _report(runs, "plain", "plain_again", "agent")
    if baseline:
        for what in ("start_to_main_ms", "process_cpu_ms"):
            i = 1 if what == "process_cpu_ms" else 0
            med = {n: _median([x[i] for x in v]) for n, v in runs.items()}
            out[what]["baseline_median_extra_ms"] = round(med["agent_baseline"] - med["plain"], 3)
    return out


def _imports(env: dict, code: str = "pass", args=()) -> tuple[list, int]:
    out = subprocess.run([PYTHON, "-X", "importtime", "-c", code, *args], env=env, capture_output=True,
                         text=True, timeout=60, cwd="/")
    modules, agent_us = [], 0
    for line in out.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line or "self [us]" in line:
            continue
        _, cumulative, name = line.split("|")
        modules.append(name.strip())
        if name.strip() == "livepatch.agent.autostart":
            agent_us = int(cumulative)
    return modules, agent_us


def modules_added(state_dir: str, baseline: str | None = None) -> dict:
    without, _ = _imports(_clean_env())
    with_agent, agent_us = _imports(_agent_env(state_dir))
    added = sorted(set(with_agent) - set(without))
    out = {"modules_without_agent": len(without), "modules_with_agent": len(with_agent),
           "modules_added": len(added), "added": added,
           "livepatch_agent_autostart_cumulative_us_under_importtime": agent_us}
    if baseline:
        before, before_us = _imports(_agent_env(state_dir, PYTHONPATH=baseline))
        gone = sorted(set(before) - set(with_agent))
        out["baseline"] = {"modules_with_agent": len(before), "modules_added": len(set(before) - set(without)),
                           "livepatch_agent_autostart_cumulative_us_under_importtime": before_us,
                           "no_longer_imported": gone}
    return out


# `livepatch status PID` as the installed command runs it, with three time
# stamps on stderr: the first statement, the first connect (to the agent),
# main's return. The parent takes the start and the exit.
CLI_TIMED = """import sys, time
t = []
sys.addaudithook(lambda event, args: event == "socket.connect" and not t and t.append(time.monotonic_ns()))
started = time.monotonic_ns()
from livepatch.cli import main
try:
    code = main(sys.argv[1:])
finally:
    done = time.monotonic_ns()
    sys.stderr.write(f"LPTIMES {started} {t[0] if t else 0} {done}\\n")
sys.exit(code)
"""
_CLI_PARTS = ("interpreter_ms", "imports_and_parsing_ms", "request_ms", "exit_ms", "total_ms", "process_cpu_ms")


def _cli_once(env: dict, pid: int) -> tuple:
    cpu0 = _children_cpu_ms()
    t0 = time.monotonic_ns()
    out = subprocess.run([PYTHON, "-c", CLI_TIMED, "status", str(pid)], env=env, capture_output=True,
                         text=True, timeout=60, cwd="/")
    t_end = time.monotonic_ns()
    cpu = _children_cpu_ms() - cpu0
    stamps = [line for line in out.stderr.splitlines() if line.startswith("LPTIMES ")]
    if out.returncode != 0 or not stamps:
        raise SystemExit(f"livepatch status {pid} failed: {out.stderr.strip()[-500:]}")
    started, connect, done = (int(x) for x in stamps[-1].split()[1:])
    return ((started - t0) / 1e6, (connect - started) / 1e6, (done - connect) / 1e6, (t_end - done) / 1e6,
            (t_end - t0) / 1e6, cpu)


def _service(state_dir: str):
    """A process with an agent, for the CLI to ask."""
    env = _agent_env(state_dir, LIVEPATCH_ALLOW_UNSIGNED="1", LIVEPATCH_NAME="startup-bench-cli")
    proc = subprocess.Popen([PYTHON, "-c", "import sys; print('up', flush=True); sys.stdin.read()"], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd="/")
    if proc.stdout.readline().strip() != "up":
        raise SystemExit("the service for the CLI measurement did not start")
    return proc


def cli_status(rounds: int, state_dir: str, baseline: str | None = None) -> dict:
    service = _service(state_dir)
    try:
        env = _clean_env()
        modes = {"cli": env, "cli_again": env}
        if baseline:
            modes["cli_baseline"] = _clean_env(PYTHONPATH=baseline)
        names = list(modes)
        runs = {n: [] for n in names}
        for _ in range(2):
            for n in names:
                _cli_once(modes[n], service.pid)
        for r in range(rounds):
            k = r % len(names)
            for n in names[k:] + names[:k]:
                runs[n].append(_cli_once(modes[n], service.pid))
        out = {}
        for i, part in enumerate(_CLI_PARTS):
            med = {n: _median([x[i] for x in v]) for n, v in runs.items()}
            out[part] = {n: summary([round(x[i], 3) for x in v]) for n, v in runs.items()}
            out[part]["aa_control_median_diff_ms"] = round(med["cli_again"] - med["cli"], 3)
            if baseline:
                out[part]["baseline_minus_now_median_ms"] = round(med["cli_baseline"] - med["cli"], 3)
        plain, _ = _imports(_clean_env())
        now, _ = _imports(env, CLI_TIMED, ("status", str(service.pid)))
        out["modules"] = {"plain_interpreter": len(plain), "cli": len(now),
                          "cli_livepatch": sorted(m for m in now if m.split(".")[0] == "livepatch"),
                          "cli_added": sorted(set(now) - set(plain))}
        if baseline:
            before, _ = _imports(_clean_env(PYTHONPATH=baseline), CLI_TIMED, ("status", str(service.pid)))
            out["modules"]["cli_baseline"] = len(before)
            out["modules"]["no_longer_imported"] = sorted(set(before) - set(now))
        return out
    finally:
        service.stdin.close()
        service.wait(timeout=30)


def _timed(argv: list, env: dict, expect: int = 0) -> tuple[float, float]:
    """Wall time from just before the process starts to its exit, and its CPU time."""
    cpu0 = _children_cpu_ms()
    t0 = time.perf_counter()
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, cwd="/")
    wall = (time.perf_counter() - t0) * 1e3
    if out.returncode != expect:
        raise SystemExit(f"{' '.join(argv[:3])} ... exited {out.returncode}: {(out.stderr or out.stdout).strip()[-500:]}")
    return wall, _children_cpu_ms() - cpu0


def _signed_bundle(work: str) -> tuple[str, str]:
    """A signed bundle of the HTTP demo's path-traversal fix, and the trust
    directory holding its key (made with the installed command)."""
    key, trust, bundle = os.path.join(work, "ops"), os.path.join(work, "trust"), os.path.join(work, "fix.lpb")
    env = _clean_env()
    subprocess.run([LIVEPATCH, "keygen", key], check=True, capture_output=True, env=env)
    os.mkdir(trust, 0o700)
    os.replace(key + ".pub", os.path.join(trust, "ops.pub"))
    subprocess.run([LIVEPATCH, "build", os.path.join(PATCHES, "baseline"), os.path.join(PATCHES, "fix-path-traversal"),
                    "-o", bundle, "--id", "HP-STARTUP", "--key", key + ".key"], check=True, capture_output=True, env=env)
    return bundle, trust


def _demo_service(work: str, trust: str, tag: str):
    """The HTTP demo under the installed agent (LIVEPATCH_AUTOSTART, as
    `livepatch run` starts it), listening."""
    port_file = os.path.join(work, f"port-{tag}")
    env = _agent_env(os.path.join(work, f"state-{tag}"), LIVEPATCH_TRUST=trust, LIVEPATCH_NAME=f"startup-{tag}")
    proc = subprocess.Popen([PYTHON, "-m", "inventory.server", "--port", "0", "--port-file", port_file], cwd=DEMO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not os.path.exists(port_file):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("the demo service did not start")
        time.sleep(0.01)
    return proc  # the agent listened before main ran (autostart), so before the port file


def _stop(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


_COMMANDS = ("bare_interpreter", "status", "status_again", "apply", "rollback")
_AT_BASELINE = ("status_baseline", "apply_baseline", "rollback_baseline")
# what pip generates for a [project.scripts] entry point (as the command was installed before
# packaging/bin/livepatch), for the --baseline modes
ENTRY_POINT_LAUNCHER = """import re
import sys
from livepatch.cli import main
if __name__ == '__main__':
    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])
    sys.exit(main())
"""


def commands_end_to_end(rounds: int, work: str, fresh: int, baseline: str | None = None) -> dict:
    """The installed command: status, apply and rollback against the
    live demo service, alternating with a bare interpreter and an A/A
    status (and with `baseline`, the three as the package was there, run by
    an entry-point launcher as pip made it); then the first status of
    `fresh` newly started agents."""
    bundle, trust = _signed_bundle(work)
    env = _clean_env()
    proc = _demo_service(work, trust, "e2e")
    pid = str(proc.pid)
    argv = {"bare_interpreter": [PYTHON, "-c", "pass"], "status": [LIVEPATCH, "status", pid],
            "status_again": [LIVEPATCH, "status", pid], "apply": [LIVEPATCH, "apply", pid, bundle],
            "rollback": [LIVEPATCH, "rollback", pid]}
    envs = dict.fromkeys(argv, env)
    # apply and rollback stay a pair (the service is back at its baseline after each)
    units = [("bare_interpreter",), ("status",), ("status_again",), ("apply", "rollback")]
    names = _COMMANDS
    if baseline:
        launcher = os.path.join(work, "livepatch-entry-point")
        with open(launcher, "w") as fh:
            fh.write(ENTRY_POINT_LAUNCHER)
        argv.update(status_baseline=[PYTHON, launcher, "status", pid], apply_baseline=[PYTHON, launcher, "apply", pid, bundle],
                    rollback_baseline=[PYTHON, launcher, "rollback", pid])
        envs.update(dict.fromkeys(_AT_BASELINE, _clean_env(PYTHONPATH=baseline)))
        units += [("status_baseline",), ("apply_baseline", "rollback_baseline")]
        names = _COMMANDS + _AT_BASELINE
    runs = {n: [] for n in names}
    try:
        for r in range(rounds + 2):  # two rounds of warm-up
            k = r % len(units)
            for unit in units[k:] + units[:k]:
                for name in unit:
                    sample = _timed(argv[name], envs[name])
                    if r >= 2:
                        runs[name].append(sample)
        out = {}
        for i, what in enumerate(("wall_ms", "process_cpu_ms")):
            values = {n: [round(x[i], 3) for x in v] for n, v in runs.items()}
            med = {n: _median(v) for n, v in values.items()}
            out[what] = {n: summary(v) for n, v in values.items()}
            out[what]["aa_control_median_diff_ms"] = round(med["status_again"] - med["status"], 3)
            out[what]["over_bare_interpreter_median_ms"] = {n: round(med[n] - med["bare_interpreter"], 3)
                                                           for n in names[1:]}
    finally:
        _stop(proc)
    first, second = [], []
    for i in range(fresh):
        proc = _demo_service(work, trust, f"fresh-{i}")
        try:
            pid = str(proc.pid)
            first.append(_timed([LIVEPATCH, "status", pid], env)[0])
            second.append(_timed([LIVEPATCH, "status", pid], env)[0])
        finally:
            _stop(proc)
    out["fresh_agent"] = {"agents": fresh,
                          "first_status_wall_ms": summary([round(x, 3) for x in first]),
                          "next_status_wall_ms": summary([round(x, 3) for x in second])}
    out["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    return out


def baseline_tree(rev: str, work: str) -> str:
    """livepatch/ and agent/ as they were at git revision `rev`, laid out
    as installed (agent/ as livepatch/agent/), for PYTHONPATH."""
    data = subprocess.run(["git", "-C", ROOT, "archive", rev, "livepatch", "agent"], capture_output=True,
                          check=True, timeout=60).stdout
    root = os.path.join(work, "baseline")
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(root, filter="data")
        else:
            tar.extractall(root)
    os.rename(os.path.join(root, "agent"), os.path.join(root, "livepatch", "agent"))
    return root


def _bare_venv(path: str, with_pth: bool) -> str:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", path], check=True, timeout=300)
    python = os.path.join(path, "bin", "python")
    if with_pth:
        purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 capture_output=True, text=True, check=True).stdout.strip()
        shutil.copy(PTH, os.path.join(purelib, os.path.basename(PTH)))
    return python


def pth_check(rounds: int, work: str) -> dict:
    without = _bare_venv(os.path.join(work, "venv-without"), False)
    with_pth = _bare_venv(os.path.join(work, "venv-with"), True)
    env = _clean_env()
    runs = _alternate({"without_pth": (without, env), "without_pth_again": (without, env),
                       "with_pth": (with_pth, env)}, rounds)
    result = _report(runs, "without_pth", "without_pth_again", "with_pth")
    # the one line in-process: what site does for it at every interpreter start
    directory = os.path.dirname(PTH)
    n = 2000
    per = min(timeit.repeat(lambda: site.addpackage(directory, os.path.basename(PTH), set()), number=n, repeat=5)) / n
    result["site_addpackage_us"] = round(per * 1e6, 2)
    # of which running the line once compiled (the rest: reading and compiling it)
    with open(PTH) as fh:
        code = compile(fh.read(), PTH, "exec")
    per = min(timeit.repeat(lambda: exec(code, {}), number=n, repeat=5)) / n
    result["line_exec_us"] = round(per * 1e6, 3)
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--baseline", metavar="REV", help="also measure the package as it was at this git revision")
    args = ap.parse_args()
    rounds = args.rounds or (3 if args.quick else 60)
    if os.environ.get("LIVEPATCH_AUTOSTART") == "1":
        os.environ.pop("LIVEPATCH_AUTOSTART")
    global PYTHON, LIVEPATCH
    work = tempfile.mkdtemp(prefix="lpstartup-")
    try:
        install = installed.install(os.path.join(work, "installed"))
        PYTHON, LIVEPATCH = install["python"], install["livepatch"]
        print(f"measuring {install['wheel']} installed in {install['venv']}")
        state_dir = os.path.join(work, "state")
        baseline = baseline_tree(args.baseline, work) if args.baseline else None
        start = agent_start(rounds, state_dir, baseline)
        for what, label in (("start_to_main_ms", "start to main (wall)"), ("process_cpu_ms", "process CPU time")):
            r = start[what]
            print(f"{label}: plain p50 {r['plain']['p50']:.1f} ms, with the agent {r['agent']['p50']:.1f} ms: "
                  f"{r['median_extra_ms']:+.1f} ms (A/A control {r['aa_control_median_diff_ms']:+.1f} ms)"
                  + (f"; at {args.baseline}: {r['baseline_median_extra_ms']:+.1f} ms" if baseline else ""))
        mods = modules_added(state_dir, baseline)
        print(f"modules at start: {mods['modules_without_agent']} without, {mods['modules_with_agent']} with the "
              f"agent (+{mods['modules_added']})"
              + (f"; at {args.baseline}: +{mods['baseline']['modules_added']}" if baseline else ""))
        e2e = commands_end_to_end(rounds, work, 3 if args.quick else 10, baseline)
        for name in _COMMANDS + (_AT_BASELINE if baseline else ()):
            w, c = e2e["wall_ms"][name], e2e["process_cpu_ms"][name]
            extra = "" if name == "bare_interpreter" else \
                f" ({e2e['wall_ms']['over_bare_interpreter_median_ms'][name]:+.1f} ms over a bare interpreter)"
            print(f"{name}: wall p50 {w['p50']:.1f} ms, p99 {w['p99']:.1f} ms{extra}; CPU time p50 {c['p50']:.1f} ms")
        print(f"status A/A control: {e2e['wall_ms']['aa_control_median_diff_ms']:+.1f} ms wall; first status of a "
              f"fresh agent p50 {e2e['fresh_agent']['first_status_wall_ms']['p50']:.1f} ms, the next "
              f"{e2e['fresh_agent']['next_status_wall_ms']['p50']:.1f} ms; load average {e2e['load_average_1min_at_end']}")
        cli = cli_status(rounds, state_dir, baseline)
        for part in _CLI_PARTS:
            r = cli[part]
            print(f"livepatch status PID, {part}: p50 {r['cli']['p50']:.1f} ms (A/A control "
                  f"{r['aa_control_median_diff_ms']:+.1f} ms)"
                  + (f"; at {args.baseline}: {r['cli_baseline']['p50']:.1f} ms" if baseline else ""))
        print(f"livepatch status PID imports {cli['modules']['cli']} modules (a bare interpreter "
              f"{cli['modules']['plain_interpreter']})"
              + (f"; at {args.baseline}: {cli['modules']['cli_baseline']}" if baseline else ""))
        pth = pth_check(rounds, work)
        print(f".pth check with LIVEPATCH_AUTOSTART unset: {pth['site_addpackage_us']} us in-process (running the "
              f"compiled line: {pth['line_exec_us']} us); process CPU time "
              f"{pth['process_cpu_ms']['median_extra_ms']:+.2f} ms vs a venv without it (A/A control "
              f"{pth['process_cpu_ms']['aa_control_median_diff_ms']:+.2f} ms)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    install.pop("python"), install.pop("livepatch")
    path = write_result("startup", {"machine": machine(), "params": {"rounds": rounds, "baseline": args.baseline},
                                    "installed": install, "agent_start": start, "imports": mods,
                                    "commands_end_to_end": e2e, "cli_status": cli,
                                    "pth_check_unset": pth}, args.quick)
    print("results:", path)


if __name__ == "__main__":
    sys.exit(main())
