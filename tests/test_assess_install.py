"""Assess and install against real processes: a small program under
`livepatch run` with forked workers, and a repository served by a real
HTTP server on loopback. Every assess state; install honours
classification and include/exclude, goes one canary process first when
asked, refuses what is built for another release with the reason, and a
tampered bundle changes nothing anywhere."""

import json

import pytest
from live import cli
from repo_fixtures import App, build, served, unique_name

from livepatch import publish, tree
from livepatch.assess import assess, last_assessment
from livepatch.catalog import CatalogEntry
from livepatch.install import install
from livepatch.repository import Repository, RepositoryError
from livepatch.signing import load_private


@pytest.fixture
def apps():
    started = []
    yield started
    for app in started:
        app.stop()


def _repository(tmp_path, keys, name):
    """Bundles for NAME 1.0: CORE lineage (1 superseded by 2, security),
    a fix of a module imported later (bugfix), one built for another
    release, and a fix that exists only as release 1.1."""
    repo = tmp_path / "repo"
    repo.mkdir()
    bundles = [build(tmp_path, keys, "core", "HP-CORE-1", name, classification="security", lineage="CORE"),
               build(tmp_path, keys, "core2", "HP-CORE-2", name, classification="security", lineage="CORE",
                     sequence=2),
               build(tmp_path, keys, "lazy", "HP-LAZY", name, classification="bugfix", sequence=3),
               build(tmp_path, keys, "lazy", "HP-OTHER", "shop", "9.9", classification="bugfix"),
               # a fix to a third-party distribution the program has installed but not imported
               build(tmp_path, keys, "lazy", "HP-LIB", f"{name}-lib", "2.0", classification="security")]
    release = CatalogEntry(id="REL-1.1", kind="baseline", classification="security",
                           baseline={"name": name, "version": "1.0"}, references=("CVE-2026-1",), fixed_in="1.1")
    publish.add(str(repo), load_private(keys["key"]), bundles=bundles, releases=[release])
    return repo, dict(zip(("core1", "core2", "lazy", "other", "lib"), bundles))


def _states(target, url, keys, cache):
    r = cli("assess", target, "--repo", url, "--trust", keys["trust"], "--cache-dir", cache, "--json")
    assert r.returncode == 0, r.stderr
    (service,) = json.loads(r.stdout)["services"]
    return service


def test_assess_every_state_then_install_by_classification_and_include(tmp_path, keys, apps):
    name = unique_name()
    repo, _ = _repository(tmp_path, keys, name)
    app = App(tmp_path, keys, name, workers=2)
    apps.append(app)
    assert set(app.answers().values()) == {"old"}
    cache = str(tmp_path / "cache")
    with served(repo) as url:
        svc = _states(name, url, keys, cache)
        assert set(svc["processes"]) == {str(p) for p in app.pids}
        for pid in app.pids:
            assert svc["processes"][str(pid)] == {
                "HP-CORE-1": "superseded", "HP-CORE-2": "pending", "HP-LAZY": "pending-import",
                "HP-OTHER": "not-applicable", "HP-LIB": "not-applicable", "REL-1.1": "needs-baseline"}
            assert svc["runs"][str(pid)]["baseline"] == {"name": name, "version": "1.0", "source": "declared"}
        reasons = svc["reasons"][str(app.pid)]
        assert reasons["HP-CORE-1"] == "replaced by HP-CORE-2"
        assert reasons["HP-OTHER"] == "built for shop 9.9; the process does not run shop and has none installed"
        assert "1.1" in reasons["REL-1.1"] and "restart" in reasons["REL-1.1"]
        assert svc["assessed_at"]

        # security only: the CORE fix everywhere; the bugfix and the release are skipped, with why
        r = cli("install", name, "--repo", url, "--trust", keys["trust"], "--cache-dir", cache,
                "--classification", "security,critical", "--json")
        assert r.returncode == 0, r.stdout + r.stderr
        (result,) = json.loads(r.stdout)["services"]
        outcomes = {b["id"]: (b["outcome"], b["reason"]) for b in result["bundles"]}
        assert outcomes["HP-CORE-2"][0] == "installed"
        assert outcomes["HP-LAZY"] == ("skipped", "classification bugfix not selected (security, critical)")
        assert outcomes["REL-1.1"][0] == "skipped" and "needs a new baseline" in outcomes["REL-1.1"][1]
        assert "HP-CORE-1" not in outcomes and "HP-OTHER" not in outcomes and "HP-LIB" not in outcomes
        app.wait_answers("fixed-2")

        # --exclude wins over --include; then --include installs the one left
        repository = Repository(url, trusted_keys=keys["trust"], cache_dir=cache)
        result = install(repository, [tree.by_name(name)], include=["HP-LAZY"], exclude=["HP-LAZY"])
        assert result.to_json()["services"][0]["bundles"] == [
            {"id": "HP-LAZY", "outcome": "skipped", "reason": "excluded (--exclude)", "processes": {}, "exit_code": 0}]
        (sa,) = result.assessments
        assert {s["HP-CORE-2"] for s in sa.processes.values()} == {"installed"}
        assert {s["HP-LAZY"] for s in sa.processes.values()} == {"pending-import"}
        assert last_assessment(repository)["assessed_at"] == sa.assessed_at  # recorded for `repo list`
        result = install(repository, [tree.by_name(name)], include=["HP-LAZY"])
        assert [(o.patch_id, o.outcome) for o in result.services[0].outcomes] == [("HP-LAZY", "installed")]
    app.import_lazy()  # the pending fix is committed as the module is imported
    app.wait_answers("fixed-2 lazy-fixed")
    # status and ps name the release the processes run
    r = cli("status", name)
    assert r.returncode == 0 and r.stdout.count(f"{name} 1.0") == len(app.pids), r.stdout


def test_install_refuses_other_releases_and_tampered_bundles_then_canary_first(tmp_path, keys, apps):
    name = unique_name()
    repo, bundles = _repository(tmp_path, keys, name)
    app = App(tmp_path, keys, name, workers=2, declare=False, installed={name: "1.0", f"{name}-lib": "2.0"})
    apps.append(app)
    repository = Repository(str(repo), trusted_keys=keys["trust"], cache_dir=str(tmp_path / "cache"))
    svc = tree.by_name(name)
    (sa,) = assess(repository, [svc])
    # not declared: the installed distribution's metadata says what runs
    assert {r["baseline"]["source"] for r in sa.runs.values()} == {"metadata"}
    assert sa.state_of("HP-CORE-2") == "pending"
    # installed, not imported: its fix waits for the import
    assert {s["HP-LIB"] for s in sa.processes.values()} == {"pending-import"}

    # asked for by id, a bundle built for shop 9.9 is refused with the reason
    result = install(repository, [svc], include=["HP-OTHER"])
    (sr,) = result.services
    refused = [o for o in sr.outcomes if o.outcome != "skipped"]
    assert [(o.patch_id, o.outcome) for o in refused] == [("HP-OTHER", "refused")]
    assert "built for shop 9.9" in refused[0].reason and result.exit_code == 3
    assert {o.reason for o in sr.outcomes if o.outcome == "skipped"} >= {"not included (--include)"}

    # a bundle changed in the repository: refused, reported, nothing applied anywhere
    path = repo / "bundles" / "HP-CORE-2.lpb"
    good = path.read_bytes()
    path.write_bytes(good[:len(good) // 2] + bytes([good[len(good) // 2] ^ 1]) + good[len(good) // 2 + 1:])
    fresh = Repository(str(repo), trusted_keys=keys["trust"], cache_dir=str(tmp_path / "fresh-cache"))
    with pytest.raises(RepositoryError, match="HP-CORE-2 .* does not match its catalog entry"):
        install(fresh, [svc], classifications=["security"])
    r = cli("install", name, "--repo", str(repo), "--trust", keys["trust"], "--cache-dir", str(tmp_path / "c2"))
    assert r.returncode == 4 and len(r.stderr.strip().splitlines()) == 1 and "tampered" in r.stderr, r.stderr
    assert set(app.answers().values()) == {"old"}
    assert all(not m.applied for m in tree.by_name(name).members)

    # canary: one worker has the fix before any other process gets it
    path.write_bytes(good)
    seen = []

    def on_event(event):
        if event["event"] == "canary":
            answers = app.wait_answers_of(event["pid"], "fixed-2")
            seen.append((event["pid"], sorted(a for p, a in answers.items() if p != event["pid"])))

    result = install(repository, [tree.by_name(name)], include=["HP-CORE-2"], canary=True, on_event=on_event)
    assert result.exit_code == 0, result.to_json()
    (canary, others), = seen
    workers = [m.pid for m in tree.by_name(name).members if m.role == "worker"]
    assert canary in workers and others == ["old", "old"]  # the master and the other worker waited
    app.wait_answers("fixed-2")

    # status reports what the process runs, also when a bundle for another release is applied by hand
    r = cli("apply", str(app.pid), bundles["other"], "--json")
    assert r.returncode == 0, r.stderr
    status = json.loads(cli("status", str(app.pid), "--json").stdout)
    assert status["baseline"] == {"name": name, "version": "1.0", "source": "metadata"}
    assert status["applied"][-1]["metadata"]["baseline"] == {"name": "shop", "version": "9.9"}


def test_attach_declares_the_version_a_process_runs(tmp_path, keys):
    import subprocess
    import sys

    from live import end_process
    name = unique_name()
    proc = subprocess.Popen([sys.executable, "-c", "import time\nwhile True: time.sleep(0.05)"])
    try:
        r = cli("attach", str(proc.pid), "--trust", keys["trust"], "--name", name, "--version", "4.2",
                "--method", "pyinjector", "--timeout", "120")
        assert r.returncode == 0, r.stdout + r.stderr
        status = json.loads(cli("status", str(proc.pid), "--json").stdout)
        assert status["baseline"] == {"name": name, "version": "4.2", "source": "declared"}
        assert f"runs {name} 4.2 (declared)" in cli("status", str(proc.pid)).stdout
    finally:
        end_process(proc)
