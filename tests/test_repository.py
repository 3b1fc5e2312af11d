"""The patch repository without processes: `livepatch repo add` keeps a
signed catalog; a client over a real HTTP server on loopback verifies the
catalog and each bundle before use, refuses tampering, replays and
untrusted keys with one line, and works offline from its cache."""

import hashlib
import json
import os
import stat

import pytest
from live import cli
from repo_fixtures import build, repo_add, served, unreachable

from livepatch import catalog
from livepatch.repository import Repository, RepositoryError
from livepatch.signing import generate, load_private, sign


@pytest.fixture(scope="module")
def published(keys, tmp_path_factory):
    """A repository directory with two bundles and a fix that exists only as a release."""
    tmp = tmp_path_factory.mktemp("published")
    repo = tmp / "repo"
    repo.mkdir()
    one = build(tmp, keys, "core", "HP-APP-1", "app", "1.0", classification="security", references=["CVE-1"])
    two = build(tmp, keys, "lazy", "HP-APP-2", "app", "1.0", sequence=2)
    added = repo_add(repo, keys, one, two)
    assert [e["id"] for e in added["added"]] == ["HP-APP-1", "HP-APP-2"]
    r = cli("repo", "add-release", "REL-APP-2", "--repo", str(repo), "--key", keys["key"], "--name", "app",
            "--version", "1.0", "--fixed-in", "1.1", "--classification", "critical")
    assert r.returncode == 0, r.stderr
    return {"repo": repo, "bundles": {"HP-APP-1": one, "HP-APP-2": two}, "tmp": tmp}


def _copy(published, tmp_path):
    import shutil
    return shutil.copytree(published["repo"], tmp_path / "repo")


def test_catalog_over_http_is_verified_and_bundles_match(published, keys, tmp_path):
    with served(published["repo"]) as url:
        repo = Repository(url, trusted_keys=keys["trust"], cache_dir=str(tmp_path / "cache"))
        entries = {e.id: e for e in repo.catalog()}
        assert set(entries) == {"HP-APP-1", "HP-APP-2", "REL-APP-2"}
        one = entries["HP-APP-1"]
        assert (one.kind, one.classification, one.references, one.baseline, one.sequence) == \
            ("hotpatch", "security", ("CVE-1",), {"name": "app", "version": "1.0"}, 1)
        assert entries["REL-APP-2"].kind == "baseline" and entries["REL-APP-2"].fixed_in == "1.1"
        data = repo.fetch(one)
        with open(published["bundles"]["HP-APP-1"], "rb") as fh:
            assert data == fh.read()
        assert one.sha256 == hashlib.sha256(data).hexdigest() and one.size == len(data)
        with pytest.raises(RepositoryError, match="exists only as a release"):
            repo.fetch(entries["REL-APP-2"])
    assert repo.info.signed_by and not repo.info.offline
    # the cache is private to this user
    assert stat.S_IMODE(os.stat(tmp_path / "cache").st_mode) == 0o700


def test_offline_from_the_cache(published, keys, tmp_path):
    cache = str(tmp_path / "cache")
    with served(published["repo"]) as url:
        first = Repository(url, trusted_keys=keys["trust"], cache_dir=cache)
        entry = first.entry("HP-APP-1")
        expected = first.fetch(entry)
    # the repository cannot be reached now: the catalog and the bundle come from the cache, said so
    with unreachable() as down:
        again = Repository(down, trusted_keys=keys["trust"], cache_dir=cache)
        assert [e.id for e in again.catalog()] == [e.id for e in first.catalog()]
        assert again.info.offline and again.info.problem
        assert again.fetch(again.entry("HP-APP-1")) == expected
        with pytest.raises(RepositoryError, match="not cached"):
            again.fetch(again.entry("HP-APP-2"))
        with pytest.raises(RepositoryError, match="cannot be reached .* nothing of it is cached"):
            Repository(down, trusted_keys=keys["trust"], cache_dir=str(tmp_path / "empty")).catalog()
        r = cli("repo", "list", "--repo", down, "--trust", keys["trust"], "--cache-dir", cache)
    assert r.returncode == 0 and "used the cached catalog" in r.stdout, r.stderr


def test_tampered_catalog_is_refused(published, keys, tmp_path):
    repo = _copy(published, tmp_path)
    path = repo / "catalog.json"
    doc = json.loads(path.read_text())
    doc["catalog"]["entries"][0]["classification"] = "other"  # an attacker demotes a security fix
    path.write_text(json.dumps(doc))
    with served(repo) as url:
        with pytest.raises(RepositoryError, match="catalog signature does not verify") as exc:
            Repository(url, trusted_keys=keys["trust"], cache_dir=str(tmp_path / "cache")).catalog()
        assert exc.value.verification
        r = cli("repo", "list", "--repo", url, "--trust", keys["trust"], "--cache-dir", str(tmp_path / "cache2"))
    assert r.returncode == 4 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and "does not verify" in r.stderr


def test_catalog_of_an_untrusted_key_is_refused(published, tmp_path):
    os.mkdir(tmp_path / "t")
    generate(str(tmp_path / "t" / "other"))
    os.unlink(tmp_path / "t" / "other.key")
    with pytest.raises(RepositoryError, match="untrusted key"):
        Repository(str(published["repo"]), trusted_keys=str(tmp_path / "t"), cache_dir=str(tmp_path / "c")).catalog()


def test_tampered_bundle_is_refused_and_not_cached(published, keys, tmp_path):
    repo = _copy(published, tmp_path)
    bundle = repo / "bundles" / "HP-APP-1.lpb"
    data = bytearray(bundle.read_bytes())
    data[-10] ^= 0xFF
    bundle.write_bytes(bytes(data))
    cache = tmp_path / "cache"
    with served(repo) as url:
        r = Repository(url, trusted_keys=keys["trust"], cache_dir=str(cache))
        with pytest.raises(RepositoryError, match="does not match its catalog entry") as exc:
            r.fetch(r.entry("HP-APP-1"))
        assert exc.value.verification
    assert os.listdir(cache / "bundles") == []


def test_bundle_swapped_for_another_signed_one_is_refused(published, keys, tmp_path):
    """Right digest in a re-signed catalog, but the bundle says another id:
    the manifest must agree with its entry."""
    repo = _copy(published, tmp_path)
    os.replace(repo / "bundles" / "HP-APP-2.lpb", repo / "bundles" / "HP-APP-1.lpb")
    doc = json.loads((repo / "catalog.json").read_text())
    data = (repo / "bundles" / "HP-APP-1.lpb").read_bytes()
    for e in doc["catalog"]["entries"]:
        if e["id"] == "HP-APP-1":
            e.update(sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    doc["signature"] = sign(load_private(keys["key"]), catalog.canonical(doc["catalog"]))
    (repo / "catalog.json").write_text(json.dumps(doc))
    r = Repository(str(repo), trusted_keys=keys["trust"], cache_dir=str(tmp_path / "cache"))
    with pytest.raises(RepositoryError, match="says other id"):
        r.fetch(r.entry("HP-APP-1"))


def test_entry_paths_stay_inside_the_repository(published, keys, tmp_path):
    repo = _copy(published, tmp_path)
    doc = json.loads((repo / "catalog.json").read_text())
    doc["catalog"]["entries"][0]["path"] = "../../etc/passwd"
    doc["signature"] = sign(load_private(keys["key"]), catalog.canonical(doc["catalog"]))
    (repo / "catalog.json").write_text(json.dumps(doc))
    with pytest.raises(RepositoryError, match="path: must be bundles/"):
        Repository(str(repo), trusted_keys=keys["trust"], cache_dir=str(tmp_path / "cache")).catalog()


def test_an_older_catalog_is_a_replay(published, keys, tmp_path):
    repo = _copy(published, tmp_path)
    old = (repo / "catalog.json").read_bytes()
    cache = str(tmp_path / "cache")
    doc = json.loads(old)
    doc["catalog"]["generated"] = "2999-01-01T00:00:00Z"  # a later catalog, seen first
    doc["signature"] = sign(load_private(keys["key"]), catalog.canonical(doc["catalog"]))
    (repo / "catalog.json").write_text(json.dumps(doc))
    Repository(str(repo), trusted_keys=keys["trust"], cache_dir=cache).catalog()
    (repo / "catalog.json").write_bytes(old)
    with pytest.raises(RepositoryError, match="before the one already seen"):
        Repository(str(repo), trusted_keys=keys["trust"], cache_dir=cache).catalog()


def test_repo_add_refusals_change_nothing(published, keys, tmp_path):
    repo = _copy(published, tmp_path)
    before = (repo / "catalog.json").read_bytes()
    # unsigned
    unsigned = str(tmp_path / "unsigned.lpb")
    from repo_fixtures import _trees
    trees = _trees(str(published["tmp"]))
    from livepatch.builder import build as make
    with open(unsigned, "wb") as fh:
        fh.write(make(trees["base"], trees["core2"], patch_id="HP-APP-3")[0])
    r = cli("repo", "add", unsigned, "--repo", str(repo), "--key", keys["key"])
    assert r.returncode == 4 and "not added" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    # the same id with other content
    other = build(tmp_path, keys, "core2", "HP-APP-1", "app", "1.0")
    r = cli("repo", "add", other, "--repo", str(repo), "--key", keys["key"])
    assert r.returncode == 1 and "already in the catalog with other content" in r.stderr
    # not the repository's key
    generate(str(tmp_path / "other"))
    r = cli("repo", "add", published["bundles"]["HP-APP-1"], "--repo", str(repo), "--key", str(tmp_path / "other.key"))
    assert r.returncode == 4 and "sign with the key the catalog was made with" in r.stderr
    assert (repo / "catalog.json").read_bytes() == before
    assert sorted(os.listdir(repo / "bundles")) == ["HP-APP-1.lpb", "HP-APP-2.lpb"]
    # adding what is there already is no change either
    r = cli("repo", "add", published["bundles"]["HP-APP-1"], "--repo", str(repo), "--key", keys["key"])
    assert r.returncode == 0 and "nothing new" in r.stdout
    assert (repo / "catalog.json").read_bytes() == before


@pytest.mark.parametrize("args, code, line", [
    (["assess"], 2, "give PID BUNDLE... (one process, these bundles) or SERVICE|--all --repo URL"),
    (["install", "--all", "--repo", "REPO"], 2, "--trust is needed: the public key the repository's catalog is signed with"),
    (["install", "x", "--all", "--repo", "REPO", "--trust", "TRUST"], 2, "give a SERVICE or --all, not both"),
    (["repo", "list", "--repo", "MISSING", "--trust", "TRUST"], 1, "cannot be reached"),
    (["install", "--all", "--repo", "REPO", "--trust", "TRUST", "--classification", "urgent"], 2, "classifications are"),
])
def test_command_mistakes_are_one_line(published, keys, tmp_path, args, code, line):
    subs = {"REPO": str(published["repo"]), "TRUST": keys["trust"], "MISSING": str(tmp_path / "nowhere")}
    r = cli(*[subs.get(a, a) for a in args], "--cache-dir", str(tmp_path / "cache")) if args[0] != "assess" \
        else cli(*args)
    assert r.returncode == code, r.stderr
    assert line in r.stderr and "Traceback" not in r.stderr, r.stderr
