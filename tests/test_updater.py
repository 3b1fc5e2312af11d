"""The updater against real services and a repository served over HTTP on
loopback: it installs only inside a window (an injected clock, or a window
computed around now), rolls an unhealthy install back in every process
with no failed request on the healthy path and holds the service, and
survives an unreachable repository and a service restarting between its
assessment and its install. Plus the configuration's one-line errors."""

import datetime
import functools
import http.server
import json
import os
import subprocess
import sys
import threading
import time

import pytest

import updater_apps
from livepatch import updater_config
from livepatch.updater import StateFile, Updater
from livepatch.updater_config import ConfigError
from servers_harness import Keys, cli, cli_json, env, get

UTC = datetime.timezone.utc


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return Keys(tmp_path_factory.mktemp("keys"))


class Repo:
    """A repository directory served by a real HTTP server on 127.0.0.1."""

    def __init__(self, root, keys):
        self.dir, self.keys = os.path.join(str(root), "repo"), keys
        os.makedirs(self.dir)
        self.port = None
        self.server = None
        self.start()

    def start(self):
        handler = functools.partial(_Quiet, directory=self.dir)
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port or 0), handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.thread.join()
            self.server = None

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def publish(self, *bundles):
        r = cli("repo", "add", *bundles, "--repo", self.dir, "--key", self.keys.key)
        assert r.returncode == 0, r.stderr + r.stdout


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a):
        pass


@pytest.fixture
def repo(tmp_path, keys):
    r = Repo(tmp_path, keys)
    yield r
    r.stop()


def write_config(tmp_path, repo, keys, services, *, windows=(), interval="0.3s", timezone=None, extra=""):
    lines = [f'repository = "{repo.url}"', f'trusted_keys = "{keys.trust}"', f'operator_key = "{keys.key}"',
             f'state_file = "{tmp_path}/updater/state.json"', f'cache_dir = "{tmp_path}/cache"',
             f'interval = "{interval}"', 'classifications = ["security", "critical"]', extra]
    if timezone:
        lines.append(f'timezone = "{timezone}"')
    for days, start, end in windows:
        lines += ["[[window]]", f'days = "{days}"', f'start = "{start}"', f'end = "{end}"']
    for name, body in services.items():
        lines += [f"[services.{name}]", body]
    path = tmp_path / "updater.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def applied(server) -> dict:
    """pid -> the patch ids in effect there, for every process of the service."""
    data = cli_json("status", server.name)
    return {p["pid"]: p["patches"] for p in data["processes"]}


def wait_for(predicate, what, timeout=90.0):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return value


class Clock:
    def __init__(self, when):
        self.now = when.timestamp()

    def __call__(self):
        return self.now


# ---------------------------------------------------------------- configuration

@pytest.mark.parametrize("body, message", [
    ("", "repository is required"),
    ('repository = "ftp://x"\ntrusted_keys = "k"', "repository must be a directory or an http:// or https:// URL"),
    ('repository = "r"', "trusted_keys is required"),
    ('repository = "r"\ntrusted_keys = "k"\ninterval = "soon"', "interval must be a duration"),
    ('repository = "r"\ntrusted_keys = "k"\nclassifications = ["urgent"]', "classifications must be a list of"),
    ('repository = "r"\ntrusted_keys = "k"\ncanary = "yes"', "canary must be true or false"),
    ('repository = "r"\ntrusted_keys = "k"\ntimezone = "Mars/Olympus"', "is not a time zone this host knows"),
    ('repository = "r"\ntrusted_keys = "k"\n[[window]]\nstart = "26:00"\nend = "01:00"', "window[0].start must be a time"),
    ('repository = "r"\ntrusted_keys = "k"\nwindows = []', "unknown key 'windows'"),
    ('repository = "r"\ntrusted_keys = "k"\n[services.shop]\nhttp = ["localhost:80"]', "services.shop.http must be"),
    ('repository = "r"\ntrusted_keys = "k"\n[services.shop]\ncommands = ["check"]', "services.shop.commands must be"),
    ('repository = "r"\ntrusted_keys = "k"\n[services.shop]\npatched_errors = -1', "services.shop.patched_errors must"),
    ('repository = "r"\ntrusted_keys = "k"\n[services.shop]\nobserve = "2 days"', "services.shop.observe must be"),
    ('repository = "r"\ntrusted_keys = "k"\n[services.shop]\nhealth = 1', "services.shop has unknown key 'health'"),
    ('repository = "r"\ntrusted_keys = "k"\n[services."../etc"]', "a service name is letters"),
    ('repository = [', "is not valid TOML"),
])
def test_bad_configuration_is_one_line_naming_the_field(tmp_path, body, message):
    path = tmp_path / "updater.toml"
    path.write_text(body + "\n")
    with pytest.raises(ConfigError) as exc:
        updater_config.load(str(path))
    assert message in str(exc.value) and str(exc.value).startswith(str(path))
    assert "\n" not in str(exc.value)


def test_bad_configuration_through_the_command(tmp_path):
    path = tmp_path / "updater.toml"
    path.write_text('repository = "r"\ntrusted_keys = "k"\ninterval = "soon"\n')
    r = cli("updater", "status", "--config", str(path))
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == f"livepatch updater status: {path}: interval must be a duration from 0.05s to 30d such as \"30s\", " \
                       f"\"5m\" or \"6h\", got 'soon'\n"


def test_configuration_defaults_and_relative_paths(tmp_path):
    path = tmp_path / "updater.toml"
    path.write_text('repository = "repo"\ntrusted_keys = "trusted"\n[services.shop]\nhttp = "http://127.0.0.1:1/h"\n'
                    'canary = false\n')
    c = updater_config.load(str(path))
    assert c.repository == str(tmp_path / "repo") and c.trusted_keys == str(tmp_path / "trusted")
    assert c.interval == 6 * 3600 and c.classifications == ("security", "critical")
    assert c.canary and not c.canary_for("shop") and c.canary_for("other")
    assert c.health("shop").http == ["http://127.0.0.1:1/h"] and c.health("shop").patched_errors == 0
    assert c.schedule.windows == ()


# ---------------------------------------------------------------- windows and restarts

def test_window_unreachable_repository_and_restarted_service(tmp_path, keys, repo):
    """An injected clock. The repository is down: a failed assessment, not
    a crash. Back up, outside the window, the bundle waits (the state says
    until when); the service restarts meanwhile (new processes); in the
    window the updater installs into the processes that run then."""
    name = f"calc-win-{os.getpid()}"
    server = updater_apps.start(tmp_path, keys, name=name)
    try:
        path = write_config(tmp_path, repo, keys, {name: 'observe = "0.5s"'}, windows=[("daily", "02:00", "03:00")],
                            timezone="UTC")
        clock = Clock(datetime.datetime(2026, 3, 2, 12, 0, tzinfo=UTC))
        up = Updater(updater_config.load(path), clock=clock)
        repo.stop()  # nothing listens there: connection refused
        up.tick()
        last = StateFile(up.config.state_file).read()["last_assessment"]
        assert not last["ok"] and "cannot be reached" in last["error"]

        repo.start()
        repo.publish(updater_apps.build(keys, tmp_path, "HP-CALC-1", updater_apps.GOOD, name=name))
        clock.now += 1
        wake = up.tick()
        assert up.pending == {name: ["HP-CALC-1"]}
        state = StateFile(up.config.state_file).read()
        assert state["next_window"] == datetime.datetime(2026, 3, 3, 2, 0, tzinfo=UTC).astimezone().isoformat()
        assert state["window_open_until"] is None and 0 < wake <= 0.3
        assert "outside the maintenance windows: waiting until" in state["decisions"][-1]["message"]
        assert any("assessment failed, retrying" in d["message"] for d in state["decisions"])
        assert all(p == [] for p in applied(server).values())

        # the service restarts between the assessment and the window
        old = set(server.agents())
        server.stop()
        server = updater_apps.start(tmp_path, keys, name=name, state_dir=server.state_dir)
        assert not old & set(server.agents())

        clock.now = datetime.datetime(2026, 3, 3, 2, 30, tzinfo=UTC).timestamp()
        up.tick()
        assert all(p == ["HP-CALC-1"] for p in applied(server).values()), applied(server)
        assert get(server.port, "/div?a=7&b=2").body == {"result": 4}
        result = StateFile(up.config.state_file).read()["results"][-1]
        assert result["outcome"] == "installed" and result["healthy"] and result["patch"] == "HP-CALC-1"

        # the listing names the policy that installed it
        listing = cli_json("installed", name, "--state-dir", server.state_dir)
        row = next(r for r in listing["installed"] if r["id"] == "HP-CALC-1")
        assert row["classification"] == "security" and row["references"] and "updater" in row["by"]
    finally:
        server.stop()


# ---------------------------------------------------------------- health-gated rollback

def test_unhealthy_install_is_rolled_back_everywhere_and_the_service_held(tmp_path, keys, repo):
    """The updater service itself (`livepatch updater run`) with a window
    around now: a bundle that breaks the health page goes to the canary,
    fails its check, is rolled back, and the service is held, with no
    failed request on the healthy path; after `clear` the next good bundle
    is installed everywhere."""
    name = f"calc-gate-{os.getpid()}"
    server = updater_apps.start(tmp_path, keys, workers=2, name=name)
    now = datetime.datetime.now()
    window = ((now - datetime.timedelta(hours=1)).strftime("%H:%M"), (now + datetime.timedelta(hours=1)).strftime("%H:%M"))
    path = write_config(tmp_path, repo, keys, {name: f'observe = "1s"\nhttp = ["http://127.0.0.1:{server.port}/health"]'},
                        windows=[("daily", *window)])
    state = StateFile(updater_config.load(path).state_file)
    stop, served, failed = threading.Event(), [0], []

    def load():
        while not stop.is_set():
            try:
                r = get(server.port, "/div?a=9&b=3")
                served[0] += 1
                if r.status != 200:
                    failed.append(r.status)
            except OSError as exc:
                failed.append(repr(exc))
    clients = [threading.Thread(target=load, daemon=True) for _ in range(2)]
    daemon = None
    try:
        # the bad one comes first (sequence 1); the good one waits behind it
        repo.publish(updater_apps.build(keys, tmp_path, "HP-BAD-1", updater_apps.UNHEALTHY, name=name),
                     updater_apps.build(keys, tmp_path, "HP-GOOD-2", updater_apps.GOOD, name=name, sequence=2))
        for t in clients:
            t.start()
        daemon = subprocess.Popen([sys.executable, "-m", "livepatch", "updater", "run", "--config", path],
                                  stdout=subprocess.DEVNULL, stderr=open(tmp_path / "updater.log", "wb"), env=env())
        held = wait_for(lambda: (state.read().get("held") or {}).get(name), "the service to be held")
        assert held["patch"] == "HP-BAD-1" and held["rollback"] == "rolled back"
        assert "answered 503, not 2xx" in held["reason"]
        assert all(p == [] for p in applied(server).values()), applied(server)
        decisions = [d["message"] for d in state.read()["decisions"]]
        # one process first; the health page is served by whichever worker takes the
        # request, so the canary's check may or may not catch it: the service's does
        assert any("HP-BAD-1 installed in canary process" in m for m in decisions)
        assert any("HP-BAD-1 UNHEALTHY" in m for m in decisions)

        # why, in the service's own history (what `livepatch history` shows)
        hist = cli_json("history", name, "--state-dir", server.state_dir, "--since", "1d")["history"]
        entry = next(e for e in hist if e.get("action") == "health-rollback")
        assert entry["patch"] == "HP-BAD-1" and entry["outcome"] == "rolled back" and "503" in entry["reason"]

        # held: the good bundle waits, even in the window
        wait_for(lambda: any("not installing HP-GOOD-2 until `livepatch updater clear" in d["message"]
                             for d in state.read()["decisions"]), "the held service's next assessment")
        assert all(p == [] for p in applied(server).values())

        r = cli("updater", "clear", name, "--config", path)
        assert r.returncode == 0, r.stderr
        wait_for(lambda: all(p == ["HP-GOOD-2"] for p in applied(server).values()), "HP-GOOD-2 everywhere")
        assert "HP-BAD-1" not in json.dumps(applied(server))  # a bundle that failed here is not tried again
        assert get(server.port, "/div?a=7&b=2").body == {"result": 4}
    finally:
        stop.set()
        for t in clients:
            t.join(timeout=30)
        if daemon is not None:
            daemon.terminate()
            daemon.wait(timeout=30)
        server.stop()
    assert served[0] > 0 and failed == [], failed[:5]
    assert daemon.returncode == 0, (tmp_path / "updater.log").read_text()[-2000:]
