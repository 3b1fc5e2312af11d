"""`livepatch run` against real processes: a script, `-m`, `-c` and console
scripts see the same PID, argv, `__main__`, sys.path[0], exit status and
signal death as without it; the refusals, each one line; the agent follows
the program into forked and spawned children (and does not with
--no-follow); a control directory that cannot be made safe costs the
service its socket, never its life."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from live import cli
from livepatch.signing import generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = [sys.executable, "-m", "livepatch", "run"]

REPORT = '''\
import json, os, sys
def report(code):
    main = sys.modules["__main__"]
    spec = getattr(main, "__spec__", None)
    agent = sys.modules.get("livepatch.agent")
    print(json.dumps({
        "pid": os.getpid(), "argv": sys.argv, "orig_argv": sys.orig_argv, "executable": sys.executable,
        "file": getattr(main, "__file__", None), "spec": spec and [spec.name, spec.origin],
        "path0": sys.path[0], "flags": [sys.flags.optimize, sys.flags.dev_mode, sys.flags.unbuffered if hasattr(sys.flags, "unbuffered") else None],
        "warnoptions": sys.warnoptions,
        "agent": agent.socket_path() if agent else None,
        "autostart_env": os.environ.get("LIVEPATCH_AUTOSTART")}), flush=True)
    if code == "wait":
        print("ready", flush=True)
        sys.stdin.read()
    sys.exit(int(code) if code != "wait" else 0)
'''


@pytest.fixture
def programs(tmp_path):
    """A script, a package for -m, and a console script with a #! line, all
    reporting what they see as __main__."""
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "seen.py").write_text(REPORT)
    (tmp_path / "app.py").write_text("import seen, sys\nseen.report(sys.argv[1])\n")
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text("import seen, sys\nseen.report(sys.argv[1])\n")
    (tmp_path / "lib" / "tool.py").write_text("import seen, sys\ndef main():\n    seen.report(sys.argv[1])\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "mytool"
    # what pip writes for a console script entry point
    script.write_text(f"#!{sys.executable}\n# -*- coding: utf-8 -*-\nimport re\nimport sys\nfrom tool import main\n"
                      "if __name__ == '__main__':\n"
                      "    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])\n"
                      "    sys.exit(main())\n")
    script.chmod(0o755)
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "lib"),
               PATH=f"{bin_dir}{os.pathsep}{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}")
    for var in [v for v in env if v.startswith("LIVEPATCH_")]:
        del env[var]
    # agents trust a key, as in production: one without any says so on stderr
    trust = tmp_path / "trusted"
    trust.mkdir(mode=0o700)
    generate(str(trust / "ops"))
    os.unlink(trust / "ops.key")
    env["LIVEPATCH_TRUST"] = str(trust)
    return tmp_path, env


CASES = {
    "script": lambda code: [sys.executable, "app.py", code, "--flag"],
    "-m": lambda code: [sys.executable, "-m", "pkg", code, "x"],
    "-c": lambda code: [sys.executable, "-u", "-X", "dev", "-W", "error", "-O", "-c",
                        "import seen, sys; seen.report(sys.argv[1])", code, "y"],
    "console script": lambda code: ["mytool", code, "--opt"],
}


def _run(cmd, cwd, env):
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    lines = r.stdout.splitlines()
    assert lines, (cmd, r.stderr)
    return r.returncode, json.loads(lines[0]), r.stderr


@pytest.mark.parametrize("case", list(CASES))
def test_same_process_as_without_livepatch(programs, case):
    cwd, env = programs
    plain_code, plain, plain_err = _run(CASES[case]("7"), cwd, env)
    code, seen, err = _run([*RUN, "--name", "svc", "--", *CASES[case]("7")], cwd, env)
    assert plain_code == code == 7, (plain_err, err)
    assert seen["agent"] == os.path.join(os.path.dirname(seen["agent"]), f"{seen['pid']}.sock")
    assert plain["agent"] is None
    for key in ("pid", "agent", "autostart_env"):
        del seen[key], plain[key]
    assert seen == plain
    if case == "-c":
        assert seen["flags"][:2] == [1, True] and seen["warnoptions"][-1] == "error"
    assert err == plain_err == ""


@pytest.mark.parametrize("case", list(CASES))
def test_same_pid_and_sigterm_death(programs, case):
    cwd, env = programs
    outcomes = []
    for launcher in ([], [*RUN, "--"]):
        proc = subprocess.Popen([*launcher, *CASES[case]("wait")], cwd=cwd, env=env, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            seen = json.loads(proc.stdout.readline())
            assert proc.stdout.readline().strip() == "ready"
            assert seen["pid"] == proc.pid  # exec'd: the service is the process that was started
            if launcher:
                assert cli("status", str(proc.pid), "--json").returncode == 0
            proc.send_signal(signal.SIGTERM)
            outcomes.append(proc.wait(20))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert outcomes == [-signal.SIGTERM, -signal.SIGTERM]


def test_installed_console_script_and_env_shebang(programs):
    cwd, env = programs
    django_admin = os.path.join(os.path.dirname(sys.executable), "django-admin")
    plain = subprocess.run([django_admin, "--version"], capture_output=True, text=True, timeout=60, env=env)
    ran = subprocess.run([*RUN, "--", django_admin, "--version"], capture_output=True, text=True, timeout=60, env=env)
    assert (ran.returncode, ran.stdout, ran.stderr) == (plain.returncode, plain.stdout, plain.stderr) == (0, plain.stdout, "")
    # a manage.py-style script whose #! line goes through env and PATH
    manage = cwd / "manage.py"
    manage.write_text(f"#!/usr/bin/env {os.path.basename(sys.executable)}\nimport seen, sys\nseen.report(sys.argv[1])\n")
    manage.chmod(0o755)
    plain_code, plain, _ = _run(["./manage.py", "5", "runserver"], cwd, env)
    code, seen, err = _run([*RUN, "--", "./manage.py", "5", "runserver"], cwd, env)
    assert plain_code == code == 5 and seen["argv"] == plain["argv"] == ["./manage.py", "5", "runserver"]
    assert seen["agent"] and seen["file"] == plain["file"] and err == ""


def test_through_a_pyenv_shim(programs):
    """`python` on PATH is often a pyenv shim (a bash script that has pyenv
    exec the real interpreter): livepatch run finds the interpreter it runs.
    The pyenv here is a stand-in speaking the shim protocol."""
    cwd, env = programs
    root = cwd / "pyenv"
    (root / "libexec").mkdir(parents=True)
    (root / "shims").mkdir()
    pyenv = root / "libexec" / "pyenv"
    pyenv.write_text(f'#!/bin/sh\ncmd="$1"; shift; shift\n'
                     f'case "$cmd" in which) echo "{sys.executable}";; exec) exec "{sys.executable}" "$@";; esac\n')
    shim = root / "shims" / "python"
    shim.write_text('#!/usr/bin/env bash\nset -e\nprogram="${0##*/}"\n'
                    f'exec "{pyenv}" exec "$program" "$@"\n')
    for f in (pyenv, shim):
        f.chmod(0o755)
    env = dict(env, PATH=f"{root / 'shims'}{os.pathsep}{env['PATH']}")
    manage = cwd / "manage.py"
    manage.write_text("#!/usr/bin/env python\nimport seen, sys\nseen.report(sys.argv[1])\n")
    manage.chmod(0o755)
    for cmd in (["python", "app.py", "4"], ["./manage.py", "4"]):
        plain_code, plain, _ = _run(cmd, cwd, env)
        code, seen, err = _run([*RUN, "--", *cmd], cwd, env)
        assert plain_code == code == 4 and seen["agent"] and err == "", err
        for key in ("pid", "agent", "autostart_env"):
            del seen[key], plain[key]
        assert seen == plain


# ---------------------------------------------------------------- refusals

def _bare_venv(tmp_path):
    target = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(target)], check=True, timeout=120)
    return str(target / "bin" / "python")


def test_refusals_are_one_line_and_run_nothing(tmp_path, programs):
    cwd, env = programs
    marker = tmp_path / "ran"
    app = cwd / "touch.py"
    app.write_text(f"open({str(marker)!r}, 'w').close()\n")
    shell = tmp_path / "run.sh"
    shell.write_text(f"#!/bin/sh\ntouch {marker}\n")
    other = tmp_path / "other"
    other.write_text(f"#!/bin/cat\n")
    no_shebang = tmp_path / "noshebang.py"
    no_shebang.write_text(app.read_text())
    not_exec = tmp_path / "plain.py"
    not_exec.write_text(app.read_text())
    for f in (shell, other, no_shebang):
        f.chmod(0o755)
    bare = _bare_venv(tmp_path)
    exe = sys.executable
    cases = [
        ([], 2, "nothing to run: expected -- COMMAND ARGS (for example: -- python app.py, -- gunicorn app:app)"),
        (["--"], 2, "nothing to run: expected -- COMMAND ARGS (for example: -- python app.py, -- gunicorn app:app)"),
        (["--", "no-such-command-lp"], 1, "no-such-command-lp: command not found on PATH"),
        (["--", "touch.py"], 1, "touch.py: command not found on PATH (to run the file touch.py here: -- python touch.py)"),
        (["--", "/bin/ls", "/"], 1, "/bin/ls: not a Python program (an executable that is not a Python interpreter)"),
        (["--", str(shell)], 1, f"{shell}: not a Python program (a shell script: #!/bin/sh)"),
        (["--", str(other)], 1, f"{other}: not a Python program (#!/bin/cat)"),
        (["--", str(no_shebang)], 1, f"{no_shebang}: not a Python program (no #! line; to run a Python file: -- python {no_shebang})"),
        (["--", str(not_exec)], 1, f"{not_exec}: not executable (to run a Python file: -- python {not_exec})"),
        (["--", exe, "-S", "touch.py"], 1, f"{exe} -S: -S disables site-packages, where the agent starts; drop -S"),
        (["--", exe, "-uS", "touch.py"], 1, f"{exe} -uS: -S disables site-packages, where the agent starts; drop -S"),
        (["--trust", "no-such-keys", "--", exe, "touch.py"], 1,
         f"--trust {cwd / 'no-such-keys'}: no such file or directory"),
        (["--", bare, "touch.py"], 1,
         f"livepatch is not installed for {bare} (Python {sys.version_info[0]}.{sys.version_info[1]}); install it in "
         f"that environment ({bare} -m pip install livepatch) or run the program with {exe}"),
    ]
    for argv, code, message in cases:
        r = subprocess.run([*RUN, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
        assert (r.returncode, r.stderr) == (code, f"livepatch run: {message}\n"), argv
        assert r.stdout == "" and not marker.exists(), argv
    # livepatch importable (through PYTHONPATH) but not installed: no autostart file
    r = subprocess.run([*RUN, "--", bare, "touch.py"], cwd=cwd, env=dict(env, PYTHONPATH=ROOT),
                       capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stderr) == (1, f"livepatch run: {bare}: livepatch is installed without "
                                           "livepatch-autostart.pth in site-packages, so the agent cannot start; "
                                           "reinstall livepatch in that environment\n")
    assert not marker.exists()


def test_options_reach_the_agent_as_absolute_paths(programs, tmp_path):
    cwd, env = programs
    assert cli("keygen", str(tmp_path / "ops")).returncode == 0
    code = ("import json, os, livepatch.agent as a; ag = a._agent; print(json.dumps({'name': ag.name, "
            "'trust': ag.trust_source, 'unsigned': ag.allow_unsigned, 'state': ag.state_dir, "
            "'env': {k: v for k, v in os.environ.items() if k.startswith('LIVEPATCH_')}}))")
    (cwd / "keys").mkdir()
    os.rename(tmp_path / "ops.pub", cwd / "keys" / "ops.pub")
    r = subprocess.run([*RUN, "--trust", "keys", "--state-dir", "state", "--allow-unsigned", "--", sys.executable,
                        "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout)
    assert seen["name"] == "python" and seen["trust"] == str(cwd / "keys") and seen["unsigned"]
    assert seen["state"] == str(cwd / "state")
    assert seen["env"] == {"LIVEPATCH_AUTOSTART": "1", "LIVEPATCH_NAME": "python", "LIVEPATCH_TRUST": str(cwd / "keys"),
                           "LIVEPATCH_ALLOW_UNSIGNED": "1", "LIVEPATCH_STATE_DIR": str(cwd / "state")}
    r = subprocess.run([*RUN, "--no-follow", "--", sys.executable, "-m", "pkg", "0"], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=60)
    seen = json.loads(r.stdout.splitlines()[0])
    # the agent runs here, and nothing this process spawns is told to start one
    assert seen["agent"] and seen["autostart_env"] is None


# ---------------------------------------------------------------- following children

TREE = '''\
import json, multiprocessing, os, sys, time

def idle(marker):
    open(marker, "w").close()
    time.sleep(120)

if __name__ == "__main__":
    kind, marker = sys.argv[1], sys.argv[2]
    if kind == "fork":
        pid = os.fork()
        if pid == 0:
            idle(marker)
            os._exit(0)
    else:
        child = multiprocessing.get_context(kind).Process(target=idle, args=(marker,), daemon=True)
        child.start()
        pid = child.pid
    print(json.dumps({"parent": os.getpid(), "child": pid}), flush=True)
    sys.stdin.read()
    os.kill(pid, 15)
'''


def _status(pid):
    r = cli("status", str(pid), "--json")
    return r.returncode, (json.loads(r.stdout) if r.returncode == 0 else r.stderr)


@pytest.mark.parametrize("follow", [True, False], ids=["follow", "no-follow"])
@pytest.mark.parametrize("kind", ["fork", "spawn", "forkserver"])
def test_children_get_their_own_agent(tmp_path, kind, follow):
    (tmp_path / "tree.py").write_text(TREE)
    marker = tmp_path / "child-started"
    options = ["--name", "svc"] + ([] if follow else ["--no-follow"])
    proc = subprocess.Popen([*RUN, *options, "--", sys.executable, "tree.py", kind, str(marker)], cwd=tmp_path,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    child = None
    try:
        pids = json.loads(proc.stdout.readline())
        child = pids["child"]
        assert pids["parent"] == proc.pid and child != proc.pid
        deadline = time.monotonic() + 30
        while not marker.exists():  # the child runs its own code: an agent would be up by now
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
            time.sleep(0.02)
        code, parent_status = _status(proc.pid)
        assert code == 0 and parent_status["agent"]["name"] == "svc"
        code, child_status = _status(child)
        if follow:
            assert code == 0, child_status
            assert child_status["agent"]["name"] == "svc"
            assert child_status["agent"]["socket"].endswith(f"/{child}.sock")
        else:
            assert code == 5, child_status
        # multiprocessing's resource tracker runs none of the program: no agent
        import psutil
        trackers = [p.pid for p in psutil.Process(proc.pid).children()
                    if any("resource_tracker" in a for a in p.cmdline())]
        assert len(trackers) == (0 if kind == "fork" else 1)
        assert all(_status(pid)[0] == 5 for pid in trackers)
    finally:
        proc.stdin.close()
        try:
            proc.wait(20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if child is not None:
                try:
                    os.kill(child, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def test_in_code_start_without_following(tmp_path):
    code = ("import json, os, livepatch.agent as a\n"
            "os.environ['LIVEPATCH_AUTOSTART'] = '1'\n"
            "a.start(name='solo', follow=False)\n"
            "r, w = os.pipe()\n"
            "pid = os.fork()\n"
            "if pid == 0:\n"
            "    os.write(w, json.dumps(a.socket_path()).encode()); os._exit(0)\n"
            "os.waitpid(pid, 0)\n"
            "print(json.dumps({'child': json.loads(os.read(r, 1000)), 'env': os.environ.get('LIVEPATCH_AUTOSTART'),\n"
            "  'me': a.socket_path() is not None}))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIVEPATCH_")}
    r = subprocess.run([sys.executable, "-W", "ignore::DeprecationWarning", "-c", code], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"child": None, "env": None, "me": True}


def test_unsafe_socket_directory_costs_the_socket_not_the_service(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    code = ("import livepatch.agent as a\n"
            f"print(a.start(socket_dir={str(shared)!r}), a._agent is not None, flush=True)\n"
            "print('served')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.split() == ["None", "True", "served"], r.stderr
    lines = [line for line in r.stderr.splitlines() if "every signed bundle will be refused" not in line]  # no --trust
    assert len(lines) == 1 and "without a control socket" in r.stderr and str(shared) in r.stderr
    assert "Traceback" not in r.stderr and os.listdir(shared) == []


def test_startup_benchmark_runs():
    """The benchmark script runs (tiny parameters) so it cannot rot; its
    figures come from `make bench`, never from assertions here."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "startup.py"), "--quick", "--rounds", "2"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    with open(out.stdout.strip().splitlines()[-1].split("results: ", 1)[1]) as fh:
        data = json.load(fh)
    assert data["agent_start"]["start_to_main_ms"]["agent"]["n"] == 2
    assert "livepatch.agent.autostart" in data["imports"]["added"]
    assert data["pth_check_unset"]["start_to_main_ms"]["with_pth"]["n"] == 2


def test_autostart_failures_are_one_line_and_the_program_runs(tmp_path):
    broken = tmp_path / "broken" / "livepatch"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('half-installed')\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIVEPATCH_")}
    for extra, line in (
            ({"PYTHONPATH": str(broken.parent)}, "livepatch: no agent in process {pid}: cannot import livepatch: "
                                                 "ImportError: half-installed"),
            # a bad trust store costs the keys, not the agent
            ({"LIVEPATCH_TRUST": str(tmp_path / "gone")}, f"livepatch: agent in process {{pid}}: trusted key "
                                                          f"{str(tmp_path / 'gone')!r} does not exist; no trusted keys: "
                                                          "every signed bundle will be refused")):
        r = subprocess.run([sys.executable, "-c", "print('main runs')"], env=dict(env, LIVEPATCH_AUTOSTART="1", **extra),
                           capture_output=True, text=True, timeout=60)
        assert (r.returncode, r.stdout) == (0, "main runs\n")
        # once, although a virtualenv's site-packages are processed twice
        assert r.stderr.splitlines() == [line.format(pid=r.stderr.split()[5 if "no agent" in line else 4].rstrip(':'))]


def test_the_livepatch_command_itself_starts_no_agent():
    """Run from inside a service's environment (LIVEPATCH_AUTOSTART=1
    inherited), `livepatch` is a tool, not a process of the service."""
    env = dict({k: v for k, v in os.environ.items() if not k.startswith("LIVEPATCH_")}, LIVEPATCH_AUTOSTART="1")
    console = os.path.join(os.path.dirname(sys.executable), "livepatch")
    for cmd in ([sys.executable, "-X", "importtime", "-m", "livepatch", "--help"],
                [sys.executable, "-X", "importtime", console, "--help"]):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "usage: livepatch" in r.stdout, r.stderr
        assert "livepatch.agent.autostart" in r.stderr and "livepatch.agent.server" not in r.stderr


FORKS = '''\
import os, threading, time
def fork():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
fork()
print("forked with only the agent's threads", flush=True)
threading.Thread(target=time.sleep, args=(5,), daemon=True).start()
fork()
print("forked with a thread of the program's", flush=True)
'''


@pytest.mark.parametrize("filters", [["-W", "always"], ["-X", "dev"], []], ids=["-W always", "-X dev", "default"])
def test_fork_warning_only_for_the_programs_own_threads(tmp_path, filters):
    """3.12+ warns at a fork in a multi-threaded process; the agent's idle
    accept thread alone does not make a program see that warning."""
    r = subprocess.run([*RUN, "--", sys.executable, *filters, "-c", FORKS], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["forked with only the agent's threads", "forked with a thread of the program's"]
    warned = [line for line in r.stderr.splitlines() if "is multi-threaded, use of fork()" in line]
    assert len(warned) == (1 if sys.version_info >= (3, 12) else 0), r.stderr
