"""Wrong inputs at the `livepatch` command, as an operator makes them: each
is one line naming what is wrong (and what to do), the exit code of the
README's table, no traceback, and nothing changed: no file written or
removed in the working directory, and the one real service of this module
still runs its baseline (the path traversal still leaks)."""

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from live import SECRET, Service, cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "demo_apps", "http_api")
PATCHES = os.path.join(DEMO, "patches")
BASE, FIX = os.path.join(PATCHES, "baseline"), os.path.join(PATCHES, "fix-path-traversal")
OTHER_PYTHONS = [os.path.join(ROOT, f".venv-{v}", "bin", "python") for v in ("3.11", "3.12", "3.13")
                 if v != "%d.%d" % sys.version_info[:2]]


@pytest.fixture(scope="module")
def world(tmp_path_factory, keys, docs_bundle):
    """The files a tour leaves behind, a process without an agent, and one
    service run under `livepatch run` with the operator's trusted keys."""
    d = tmp_path_factory.mktemp("work")
    w = {"tmp": str(d), "key": keys["key"], "pub": keys["pub"], "trust": keys["trust"], "bundle": docs_bundle,
         "base": BASE, "fix": FIX, "py": sys.executable}
    (d / "junk.lpb").write_bytes(b"this is not a bundle\n")
    (d / "exists.key").write_text("not mine to overwrite\n")
    (d / "exists.rb").write_text("an authorisation made earlier\n")
    (d / "outdir").mkdir()
    os.mkfifo(d / "fifo.lpb")  # reading it would block for good
    (d / "script.sh").write_text("#!/bin/sh\necho hello\n")
    (d / "script.sh").chmod(0o755)
    unsigned = d / "unsigned.lpb"
    r = _in_process(["build", BASE, FIX, "-o", str(unsigned), "--id", "HP-UNSIGNED", "--name", "inventory",
                     "--version", "1.0"], d)
    assert r.returncode == 0, r.stderr
    w["unsigned"] = str(unsigned)
    other = next((p for p in OTHER_PYTHONS if os.path.exists(p)), None)
    if other:
        r = _in_process(["build", BASE, FIX, "-o", str(d / "other-python.lpb"), "--id", "HP-OTHER", "--key", keys["key"],
                         "--python", other, "--name", "inventory", "--version", "1.0"], d)
        assert r.returncode == 0, r.stderr
        w["other"] = str(d / "other-python.lpb")
        w["other_tag"] = "cpython-" + os.path.basename(os.path.dirname(os.path.dirname(other)))[6:].replace(".", "")
    gone = subprocess.Popen(["true"])
    gone.wait()
    w["gone"] = str(gone.pid)  # a PID that just exited
    # a name of this module's own: tests running side by side never reach each other's service
    w["svc_name"] = f"errors-inventory-{os.getpid()}"
    launcher = [sys.executable, "-m", "livepatch", "run", "--name", w["svc_name"], "--trust", keys["trust"],
                "--state-dir", str(tmp_path_factory.mktemp("state")), "--"]
    sleeper = subprocess.Popen(["sleep", "300"])
    svc = None
    try:
        w["noagent"] = str(sleeper.pid)
        svc = w["svc"] = Service(d, DEMO, ["-m", "inventory.server"], launcher=launcher)
        w["pid"] = str(svc.pid)
        _wait_for_agent(svc.pid)
        yield w
    finally:
        if svc is not None:
            svc.stop()
        sleeper.kill()
        sleeper.wait()


def _wait_for_agent(pid, seconds=30):
    from livepatch.client import AgentUnavailable, request
    deadline = time.monotonic() + seconds
    while True:
        try:
            if request(pid, "status")["ok"]:
                return
        except AgentUnavailable:
            pass
        assert time.monotonic() < deadline, "the agent did not come up"
        time.sleep(0.2)


def _listing(path):
    return sorted((e.name, e.stat(follow_symlinks=False).st_size, e.stat(follow_symlinks=False).st_mtime_ns)
                  for e in os.scandir(path))


def _still_baseline(w):
    from livepatch.client import request
    answer = request(int(w["pid"]), "status")
    assert answer["ok"], answer
    status = answer["result"]
    assert status["applied"] == [] and not status["forced"]
    assert not [e for e in status["history"] if e.get("outcome") in ("applied", "rolled back")]
    code, body = w["svc"].get(SECRET)
    assert code == 200 and "secret" in json.dumps(body).lower()  # still the baseline's bug


# (what the operator typed, exit code, the one line: exact text or re:pattern)
# {placeholders} are filled from the module's world
CASES = [
    # keys
    ("keygen {tmp}/exists", 1, "livepatch keygen: {tmp}/exists.key already exists: not overwriting a key "
                               "(remove it first, or choose another PREFIX)"),
    ("keygen {tmp}/nodir/ops", 1, "livepatch keygen: cannot write {tmp}/nodir/ops.key: there is no directory {tmp}/nodir"),
    ("keygen {tmp}/outdir/", 1, "livepatch keygen: {tmp}/outdir/ is a directory: give a prefix for the two files, "
                                "such as {tmp}/outdir/ops"),
    ("keygen ''", 2, "livepatch keygen: give a PREFIX for the two files, such as ops (ops.key and ops.pub)"),
    # build
    ("build {base} {fix} -o {tmp}/x.lpb --id HP-1 --key {tmp}/missing.key", 1,
     "livepatch build: cannot read the key {tmp}/missing.key: No such file or directory"),
    ("build {base} {fix} -o {tmp}/nodir/x.lpb --id HP-1", 1,
     "livepatch build: cannot write {tmp}/nodir/x.lpb: there is no directory {tmp}/nodir"),
    ("build {base} {fix} -o {tmp}/outdir --id HP-1", 1, "livepatch build: cannot write {tmp}/outdir: it is a directory"),
    ("build {base} {fix} -o {tmp}/x.lpb --id HP-1 --key {pub}", 1,
     "re:livepatch build: .*ops.pub is a public key; signing needs the private key \\(its private key is .*ops.key\\)$"),
    ("build {tmp}/no-such-tree {fix} -o {tmp}/x.lpb --id HP-1", 1,
     "livepatch build: baseline directory {tmp}/no-such-tree does not exist"),
    ("build {base} {fix} -o {tmp}/x.lpb --id HP-1 --python no-such-python", 2,
     "livepatch build: --python no-such-python: no such interpreter on PATH"),
    ("build {base} {fix} -o {tmp}/x.lpb --id bad!id", 2,
     "livepatch build: argument --id: 'bad!id' is not a patch id: letters, digits, '.', '_' and '-', starting with a "
     "letter or digit, at most 128 (e.g. HP-DOCS-1) (see `livepatch build --help`)"),
    ("build {base} {fix} -o {tmp}/x.lpb --id HP-1 --allow-active read_documnt", 2,
     "livepatch build: --allow-active read_documnt: the patch changes no function of that name (it changes "
     "inventory.files:document_path, inventory.files:read_document)"),
    ("build {base} {fix} -o {tmp}/x.lpb --id HP-1 --allow decorators", 2,
     "livepatch build: argument --allow: 'decorators' cannot be overridden: choose from decorator, statement "
     "(see `livepatch build --help`)"),
    ("build {base} {fix} -o {tmp}/x.lpb --id HP-1 --sequence 0", 2,
     "re:livepatch build: argument --sequence: sequence must be a whole number from 1 to \\d+, got '0' "
     "\\(see `livepatch build --help`\\)$"),
    ("build {base} {fix} -o {tmp}/x.lpb --id HP-1 --lineage a/b", 2,
     "re:livepatch build: argument --lineage: lineage must be like a patch id .*got 'a/b' \\(see `livepatch build --help`\\)$"),
    ("build {base} {fix} -o {tmp}/x.lpb --id HP-1 --classification urgent", 2,
     "livepatch build: argument --classification: invalid choice: 'urgent' (choose from 'security', 'critical', "
     "'bugfix', 'other') (see `livepatch build --help`)"),
    ("build {base} {fix} -o {tmp}/x.lpb --id HP-1 --requires HP-0 --cumulative", 2,
     "livepatch build: argument --cumulative: not allowed with argument --requires (see `livepatch build --help`)"),
    ("build {base} {fix} --id HP-1", 2,
     "livepatch build: the following arguments are required: -o/--output (see `livepatch build --help`)"),
    ("build {fix} {fix} -o {tmp}/x.lpb --id HP-1", 3,
     "livepatch build: cannot build HP-1: the trees differ in no function, import or constant"),
    # rollback authorisations, verify, inspect
    ("authorize-rollback {bundle} --key {pub} -o {tmp}/a.rb", 1,
     "re:livepatch authorize-rollback: .*ops.pub is a public key; signing needs the private key"),
    ("authorize-rollback {bundle} --key {key} -o {tmp}/exists.rb", 1,
     "livepatch authorize-rollback: {tmp}/exists.rb already exists: not overwriting it (remove it first, or choose "
     "another -o)"),
    ("authorize-rollback {bundle} --key {key} -o {tmp}/nodir/a.rb", 1,
     "livepatch authorize-rollback: cannot write {tmp}/nodir/a.rb: there is no directory {tmp}/nodir"),
    ("authorize-rollback {bundle} --key {key} -o {tmp}/a.rb --valid-hours 0", 2,
     "livepatch authorize-rollback: argument --valid-hours: must be a number of hours above 0 and at most 720, "
     "got '0' (see `livepatch authorize-rollback --help`)"),
    ("authorize-rollback {tmp}/missing.lpb --key {key} -o {tmp}/a.rb", 1,
     "livepatch authorize-rollback: cannot read {tmp}/missing.lpb: No such file or directory"),
    ("verify {bundle} --trust {tmp}/no-trust", 1,
     "livepatch verify: --trust {tmp}/no-trust: no such file or directory (give the trust directory or a .pub key file)"),
    ("verify {bundle}", 2, "livepatch verify: the following arguments are required: --trust (see `livepatch verify --help`)"),
    ("verify {tmp}/junk.lpb --trust {trust}", 4,
     "livepatch verify: invalid bundle: magic: not a livepatch bundle (wrong magic bytes)"),
    ("inspect {tmp}/missing.lpb", 1, "livepatch inspect: cannot read {tmp}/missing.lpb: No such file or directory"),
    ("inspect {tmp}/junk.lpb", 4, "livepatch inspect: invalid bundle: magic: not a livepatch bundle (wrong magic bytes)"),
    # run: refused before anything is executed
    ("run", 2, "livepatch run: nothing to run: expected -- COMMAND ARGS (for example: -- python app.py, -- gunicorn app:app)"),
    ("run -- no-such-command-lp", 1, "livepatch run: no-such-command-lp: command not found on PATH"),
    ("run -- {py} {tmp}/missing.py", 1,
     "re:livepatch run: {tmp}/missing.py: no such file \\(the script to run; paths are relative to .*\\)$"),
    ("run --trust {tmp}/no-trust -- {py} -c pass", 1, "livepatch run: --trust {tmp}/no-trust: no such file or directory"),
    ("run --name a/b -- {py} -c pass", 2,
     "livepatch run: argument --name: 'a/b' is not a service name: letters, digits, '.', '_' and '-', starting with a "
     "letter or digit, at most 64, no '..' (see `livepatch run --help`)"),
    ("run --state-dir {tmp}/junk.lpb -- {py} -c pass", 1,
     "livepatch run: --state-dir {tmp}/junk.lpb: not a directory (give a directory for the services' state, or one to "
     "be created)"),
    ("run -- {tmp}/script.sh", 1, "livepatch run: {tmp}/script.sh: not a Python program (a shell script: #!/bin/sh)"),
    ("run -- {py} -S -c pass", 1,
     "livepatch run: {py} -S: -S disables site-packages, where the agent starts; drop -S"),
    # processes and services
    ("status {gone}", 5, "livepatch status: no process with PID {gone}"),
    ("status {noagent}", 5, "livepatch status: process {noagent} has no livepatch agent (start one with "
                            "`livepatch attach {noagent}`)"),
    ("status no-such-service", 5, "livepatch status: no live agent belongs to a service named 'no-such-service' "
                                  "(see `livepatch ps`)"),
    ("status {svc_name} --tree", 2, "livepatch status: --tree needs a PID, not '{svc_name}'"),
    ("history no-such-service", 5, "livepatch history: no live agent belongs to a service named 'no-such-service' "
                                   "(see `livepatch ps`)"),
    ("apply {pid} {tmp}/missing.lpb", 1, "livepatch apply: cannot read {tmp}/missing.lpb: No such file or directory"),
    ("apply {pid} {tmp}/fifo.lpb", 1, "livepatch apply: cannot read {tmp}/fifo.lpb: not a regular file"),
    ("inspect {tmp}/outdir", 1, "livepatch inspect: cannot read {tmp}/outdir: not a regular file"),
    ("verify {bundle} --trust {tmp}/junk.lpb", 4,
     "livepatch verify: {tmp}/junk.lpb: not a PEM public key (give a .pub file `livepatch keygen` wrote, or a directory "
     "of them)"),
    ("apply {pid} {tmp}/junk.lpb", 4,
     "livepatch apply: BundleError: invalid bundle: magic: not a livepatch bundle (wrong magic bytes)"),
    ("apply {pid} {unsigned}", 4, "re:livepatch apply: SignatureError: .*unsigned"),
    ("apply {pid} {other}", 3,
     "livepatch apply: BundleError: bundle HP-OTHER carries code for {other_tag}; this process runs "
     + "cpython-%d%d" % sys.version_info[:2]),
    ("apply {pid} {bundle} --timeout -1", 2,
     "livepatch apply: argument --timeout: must be a number of seconds from 0 to 600, got '-1' "
     "(see `livepatch apply --help`)"),
    ("apply {pid} {bundle} --timeout soon", 2,
     "livepatch apply: argument --timeout: must be a number of seconds from 0 to 600, got 'soon' "
     "(see `livepatch apply --help`)"),
    ("apply no-such-service {bundle}", 5,
     "livepatch apply: no live agent belongs to a service named 'no-such-service' (see `livepatch ps`)"),
    ("apply {svc_name} {other}", 3, "re:^.*/other-python.lpb on service {svc_name}: refused$"),
    ("assess {pid} {tmp}/missing.lpb", 1, "livepatch assess: cannot read {tmp}/missing.lpb: No such file or directory"),
    ("rollback {pid}", 3, "livepatch rollback: RollbackRefused: no patch is applied"),
    ("rollback {pid} 'bad id'", 2,
     "livepatch rollback: argument patch_id: 'bad id' is not a patch id: letters, digits, '.', '_' and '-', starting "
     "with a letter or digit, at most 128 (e.g. HP-DOCS-1) (see `livepatch rollback --help`)"),
    ("rollback {pid} HP-DOCS --all", 2, "livepatch rollback: give HP-DOCS or --all, not both"),
    ("rollback {pid} --authorization {tmp}/missing.rb", 1,
     "livepatch rollback: cannot read {tmp}/missing.rb: No such file or directory"),
    ("trust reload {pid} --trust {tmp}/no-trust", 1,
     "livepatch trust reload: --trust {tmp}/no-trust: no such file or directory (give the trust directory or a .pub "
     "key file)"),
    ("attach {noagent} --trust {tmp}/no-trust", 1,
     "livepatch attach: --trust {tmp}/no-trust: no such file or directory (give the trust directory or a .pub key file)"),
    ("attach {noagent}", 5, "re:livepatch attach: process {noagent} \\(.*sleep\\) is not a CPython interpreter$"),
    ("attach {pid} --timeout -5", 2,
     "livepatch attach: argument --timeout: must be a number of seconds from 0 to 600, got '-5' "
     "(see `livepatch attach --help`)"),
    # the command itself
    ("", 2, "livepatch: the following arguments are required: COMMAND (see `livepatch --help`)"),
    ("deploy {bundle}", 2, "re:livepatch: argument COMMAND: invalid choice: 'deploy' \\(choose from 'keygen', .*\\) "
                           "\\(see `livepatch --help`\\)$"),
    ("history {pid} --tree nonsense", 2,
     "livepatch history: unrecognized arguments: nonsense (see `livepatch history --help`)"),
    ("completion fish", 2, "livepatch completion: argument shell: invalid choice: 'fish' (choose from 'bash', 'zsh') "
                           "(see `livepatch completion --help`)"),
]


def _in_process(argv, cwd):
    """(exit code, stdout, stderr) of the command's main() in this process:
    what `python -m livepatch` runs, without an interpreter start per case
    (the JSON cases below run the real command)."""
    import contextlib
    import io
    from livepatch.cli import main
    out, err = io.StringIO(), io.StringIO()
    here = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        os.chdir(here)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def _argv(text, w):
    import shlex
    return [word.format(**w) for word in shlex.split(text)]


@pytest.mark.parametrize("typed, code, line", CASES, ids=[c[0].split(" {")[0][:40] + f" #{i}" for i, c in enumerate(CASES)])
def test_wrong_input_is_one_line_and_changes_nothing(world, typed, code, line):
    if "{other" in typed + line and "other" not in world:
        pytest.skip("no interpreter of another Python version to build for")
    before = _listing(world["tmp"])
    r = _in_process(_argv(typed, world), world["tmp"])
    # errors go to stderr; a service's refusal is its report, on stdout
    out = r.stderr if re.sub(r"^re:\^?", "", line).startswith("livepatch") else r.stdout
    shown = out.splitlines()[0] if out.strip() else ""
    expected = line.format(**world)
    assert r.returncode == code, (typed, r.returncode, r.stdout, r.stderr)
    if expected.startswith("re:"):
        assert re.search(expected[3:], shown), (shown, expected)
    else:
        assert shown == expected
    assert "Traceback" not in r.stdout + r.stderr
    if out is r.stderr:  # one line (a refusal may list its problems under it, indented)
        assert all(extra.startswith("  - ") for extra in r.stderr.splitlines()[1:]), r.stderr
    assert _listing(world["tmp"]) == before, "a file was written or removed"
    if "{pid}" in typed or "{svc_name}" in typed:
        _still_baseline(world)


@pytest.mark.parametrize("argv, kind, code", [
    (["--json", "status", "{gone}"], "NoAgent", 5),
    (["status", "{gone}", "--json"], "NoAgent", 5),
    (["--json", "apply", "{pid}", "{bundle}", "--timeout", "-1"], "UsageError", 2),
    (["apply", "{pid}", "{tmp}/junk.lpb", "--json"], "BundleError", 4),
    (["--json", "rollback", "{pid}"], "RollbackRefused", 3),
    (["build", "{base}", "{fix}", "-o", "{tmp}/x.lpb", "--id", "HP-1", "--key", "{tmp}/missing.key", "--json"], "Error", 1),
])
def test_json_errors_have_one_shape(world, argv, kind, code):
    r = cli(*[a.format(**world) for a in argv], cwd=world["tmp"])
    assert r.returncode == code, r.stdout + r.stderr
    assert r.stderr == ""
    error = json.loads(r.stdout)["error"]
    assert error["type"] == kind and error["exit_code"] == code
    assert isinstance(error["message"], str) and "\n" not in error["message"] and error["message"]
    if kind in ("BundleError", "RollbackRefused"):
        assert isinstance(error["problems"], list)


def test_version_and_json_before_the_command(world):
    r = cli("--version")
    assert r.returncode == 0 and re.fullmatch(r"livepatch \d+\.\d+\.\d+\S*\n", r.stdout)
    r = cli("--json", "--version")
    assert r.returncode == 0 and list(json.loads(r.stdout)) == ["version"]
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", json.loads(r.stdout)["version"])
    rows = json.loads(cli("--json", "ps").stdout)
    row = next(row for row in rows if str(row["pid"]) == world["pid"])
    assert row["service"] == world["svc_name"] and row["state"] == "baseline" and row["patches"] == []
    assert row["trusted_keys"] and all(isinstance(k, str) for k in row["trusted_keys"])
    assert row["development_mode_unsigned_bundles"] is False and row["in_progress"] is None
    assert row["argv"][-2:] == ["--port-file", world["svc"].port_file]  # the whole command line
    assert row["command"] == " ".join(row["argv"]) and row["refused_at_import"] == []


def test_completion_scripts_know_every_command(tmp_path):
    bash = shutil.which("bash")
    r = cli("completion", "bash")
    assert r.returncode == 0
    script = tmp_path / "livepatch.bash"
    script.write_text(r.stdout)
    assert cli("completion", "zsh").stdout.endswith(r.stdout)
    if bash is None:
        pytest.skip("no bash here")

    def complete(*words, cur="''"):
        probe = (f"source {script}\ncompopt() {{ :; }}\nCOMP_WORDS=(livepatch {' '.join(words)} {cur})\n"
                 "COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); _livepatch; echo \"${COMPREPLY[*]}\"")
        return subprocess.run([bash, "--norc", "-c", probe], capture_output=True, text=True, cwd=tmp_path).stdout.split()

    assert {"build", "apply", "rollback", "run", "completion", "trust"} <= set(complete())
    assert complete("build", "--classification") == ["security", "critical", "bugfix", "other"]
    assert complete("trust") == ["reload"]
    assert complete("attach", "1", "--method") == ["auto", "pyinjector", "gdb"]
    assert {"--timeout", "--dry-run", "--json"} <= set(complete("apply", "1", "x.lpb", cur="--"))
    assert complete("run", "--name", "shop", "--", cur="pytho")  # the program: a command on PATH
    (tmp_path / "HP-1.lpb").write_text("")
    assert "HP-1.lpb" in complete("apply", "1")
