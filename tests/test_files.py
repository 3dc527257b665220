"""Files follow the job: its code and inputs by content, from the broker's store to any node.

Real brokers and node processes on loopback, real files. "Another machine" is a node with a
home of its own and the job's folder moved away after submit: what the node runs can then only
have come from the store.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from evo.broker import protocol as p
from evo.broker.store import ContentStore, StoreError
from evo.client import Client, CommandRejected
from evo.content import build_tree, code_files, digest_bytes, encode_manifest
from evo.errors import BadInput
from evo.events.schema import JobSpec
from evo.nodes.cache import Cache
from tests.conftest import run_evo
from tests.test_nodes import PY, done, of, wait_for


def _project(root: Path) -> Path:
    (root / "data").mkdir(parents=True)
    (root / "train.py").write_text(
        "import os, sys\n"
        "print('words', open('data/words.txt').read().strip())\n"
        "if len(sys.argv) > 1: print('ext', open(sys.argv[1]).read().strip())\n"
        "print('cwd', os.getcwd())\n")
    (root / "data" / "words.txt").write_text("as submitted\n")
    return root


def _submit(home: Path, cwd: Path, *args: str) -> str:
    r = run_evo("submit", *args, home=home, cwd=cwd)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def _logs(home: Path, job: str) -> subprocess.CompletedProcess:
    r = run_evo("logs", job, home=home)
    assert r.returncode == 0, r.stderr
    return r


# --- which files, and their bound -------------------------------------------------------------


def test_a_plain_folder_is_its_files_less_evoignore_and_caches(tmp_path):
    proj = _project(tmp_path / "proj")
    (proj / "__pycache__").mkdir()
    (proj / "__pycache__" / "x.pyc").write_bytes(b"\0")
    (proj / "runs").mkdir()
    (proj / "runs" / "out.bin").write_bytes(b"x" * 100)
    (proj / "big.ckpt").write_bytes(b"x" * 10)
    (proj / ".evoignore").write_text("# outputs\nruns/\n*.ckpt\n")
    top, inside, names = code_files(proj)
    assert top == proj and inside == ""
    assert names == [".evoignore", "data/words.txt", "train.py"]


def test_a_git_tree_is_its_tracked_and_unignored_files_from_the_top(tmp_path):
    repo = tmp_path / "repo"
    (repo / "exp").mkdir(parents=True)
    (repo / "lib.py").write_text("X = 1\n")
    (repo / "exp" / "run.py").write_text("import lib\n")
    (repo / "exp" / "new.py").write_text("# not added yet\n")
    (repo / "exp" / "data.csv").write_text("a,b\n")
    (repo / ".gitignore").write_text("*.csv\n")
    git = ["git", "-C", str(repo), "-c", "user.email=a@b", "-c", "user.name=a"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "lib.py", "exp/run.py", ".gitignore"], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    from evo.home import mark_home

    mark_home(repo / "runs" / "h")  # an evo home, untracked: never code
    (repo / "runs" / "h" / "broker.json").write_text("{}")
    top, inside, names = code_files(repo / "exp")
    assert top.resolve() == repo.resolve() and inside == "exp"
    assert names == [".gitignore", "exp/new.py", "exp/run.py", "lib.py"]  # data.csv ignored
    manifest, where = build_tree(repo / "exp")
    assert manifest.workdir == "exp" and {e.path for e in manifest.files} == set(names)
    assert all(where[e.digest].read_bytes() == (repo / e.path).read_bytes() for e in manifest.files)


def test_code_over_the_bound_is_refused_naming_the_largest_file(tmp_path, monkeypatch):
    proj = _project(tmp_path / "proj")
    (proj / "weights.bin").write_bytes(b"w" * 300_000)
    monkeypatch.setenv("EVO_MAX_CODE_MB", "0.1")
    with pytest.raises(BadInput, match=r"over the bound of 0.1 MiB.*weights.bin 0.3 MiB.*\.evoignore"):
        build_tree(proj)
    (proj / ".evoignore").write_text("weights.bin\n")
    manifest, _ = build_tree(proj)
    assert "weights.bin" not in {e.path for e in manifest.files}


def test_the_cli_says_the_bound_in_one_line_and_queues_nothing(tbroker, tmp_path):
    b = tbroker()
    proj = _project(tmp_path / "proj")
    (proj / "weights.bin").write_bytes(b"w" * 300_000)
    r = run_evo("submit", "--broker", b.address, "--", PY, "train.py", cwd=proj,
                env={"EVO_MAX_CODE_MB": "0.1"})
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "weights.bin" in r.stderr
    with b.client() as c:
        assert not of(list(c.read_all(1)), "JobSubmitted")


# --- the broker's store -----------------------------------------------------------------------


def test_the_store_takes_chunks_in_order_and_keeps_only_what_matches(tmp_path):
    store = ContentStore(tmp_path / "store")
    data = os.urandom(10_000)
    d = digest_bytes(data)
    assert store.put(d, len(data), 0, data[:4000]) == 4000
    assert store.put(d, len(data), 8000, data[8000:]) == 4000  # not where it is: not written
    assert not store.has(d)
    assert ContentStore(tmp_path / "store").put(d, len(data), 4000, data[4000:]) == 10_000  # resumed
    assert store.has(d) and store.read(d, 0, 1 << 20) == (data, 10_000)
    bad = digest_bytes(b"other")
    with pytest.raises(StoreError, match="changed while it was sent"):
        store.put(bad, 5, 0, b"wrong")
    assert not store.has(bad) and not (tmp_path / "store" / "partial" / bad).exists()


def test_a_submit_naming_files_not_in_the_store_is_refused_and_not_recorded(tbroker, tmp_path):
    b = tbroker()
    with b.client() as c:
        manifest = encode_manifest(build_tree(_project(tmp_path / "proj"))[0])
        for spec, why in ((JobSpec(command=["true"], tree="a" * 64), "not in the broker's store"),
                          (JobSpec(command=["true"], tree=digest_bytes(manifest)),
                           "not in the broker's store"),
                          (JobSpec(command=["true"], data={"/x.csv": "b" * 64}), "input /x.csv")):
            with pytest.raises(CommandRejected, match=why) as err:
                c.request(p.Submit(spec=spec))
            assert err.value.exit_code == 2
        c.send_files({digest_bytes(manifest): manifest})  # the manifest, but not its files
        with pytest.raises(CommandRejected, match=r"file\(s\) are not in the broker's store"):
            c.request(p.Submit(spec=JobSpec(command=["true"], tree=digest_bytes(manifest))))
        assert not of(list(c.read_all(1)), "JobSubmitted")
        # through the client, everything is sent first, once
        job = c.submit([PY, "train.py"], workdir=str(tmp_path / "proj"))
        assert of(list(c.read_all(1)), "JobSubmitted", job)[0].spec.tree
        assert c.send_files({digest_bytes(manifest): manifest}) == 0


# --- the node's cache -------------------------------------------------------------------------


def test_the_cache_fetches_once_mends_a_file_written_in_place_and_evicts_by_size(tmp_path):
    blobs = {digest_bytes(x): x for x in (b"one" * 100, b"two" * 100, b"three" * 100)}
    fetched: list[str] = []

    def fetch(digest: str, dest: Path) -> int:
        fetched.append(digest)
        dest.write_bytes(blobs[digest])
        return len(blobs[digest])

    cache = Cache(tmp_path / "cache", max_bytes=700)
    d1, d2, d3 = blobs
    assert cache.blob(d1, fetch).read_bytes() == blobs[d1]
    assert cache.blob(d1, fetch).read_bytes() == blobs[d1] and fetched == [d1]
    path = cache.blob_path(d1)
    os.chmod(path, 0o644)
    path.write_bytes(b"one" * 99 + b"XXX")  # a job wrote into it in place
    assert cache.blob(d1, fetch).read_bytes() == blobs[d1] and fetched == [d1, d1]
    cache.blob(d2, fetch)
    cache.in_use[d2] = 1
    cache.blob(d3, fetch)  # 300 + 300 + 500 bytes: over 700
    gone = cache.evict()
    assert d1 in gone and d2 not in gone and cache.blob_path(d2).exists()
    assert cache.usage() <= 700


# --- end to end -------------------------------------------------------------------------------


def test_a_job_runs_its_submitted_files_on_a_node_where_its_folder_is_not(pbroker, nodes, tmp_path):
    home = tmp_path / "home"
    b = pbroker(home)
    proj = _project(tmp_path / "proj")
    outside = tmp_path / "ext.txt"
    outside.write_text("outside as submitted\n")
    job = _submit(home, proj, "--input", str(outside), "--", PY, "train.py", str(outside))
    # as on another machine: the folder is not there, and the input there is another file
    proj.rename(tmp_path / "moved")
    outside.write_text("changed after submit\n")
    node_home = tmp_path / "node-home"
    nodes(node_home, "remote", "--broker", b.address, "--slots", "1")
    with Client(b.address) as c:
        events = wait_for(c, done(job))
    assert of(events, "JobCompleted", job), [type(e).__name__ for e in events]
    r = _logs(home, job)
    trees = node_home / "cache" / "trees"
    assert "words as submitted" in r.stdout and "ext outside as submitted" in r.stdout
    assert f"cwd {trees}" in r.stdout
    assert f"its folder {proj} is not on this node" in r.stderr
    assert f"input {outside} differs from the one submitted" in r.stderr
    # a second job of the same files fetches nothing more
    blobs = sorted((node_home / "cache" / "blobs").rglob("*"))
    (tmp_path / "moved").rename(proj)  # back, unchanged: the same tree
    job2 = _submit(home, proj, "--", PY, "train.py")
    (proj).rename(tmp_path / "moved")
    with Client(b.address) as c:
        events = wait_for(c, done(job2))
    assert of(events, "JobCompleted", job2)
    assert sorted((node_home / "cache" / "blobs").rglob("*")) == blobs


def test_on_the_broker_machine_an_unchanged_folder_is_used_in_place(pbroker, nodes, tmp_path):
    home = tmp_path / "home"
    b = pbroker(home)
    proj = _project(tmp_path / "proj")
    job = _submit(home, proj, "--", PY, "train.py")
    nodes(home, "local", "--slots", "1")
    with Client(b.address) as c:
        wait_for(c, done(job))
    r = _logs(home, job)
    assert f"cwd {proj}" in r.stdout and "words as submitted" in r.stdout
    assert not any((home / "cache" / "trees").iterdir())  # nothing copied


def test_a_file_edited_after_submit_is_not_what_the_job_runs(pbroker, nodes, tmp_path):
    home = tmp_path / "home"
    b = pbroker(home)
    proj = _project(tmp_path / "proj")
    job = _submit(home, proj, "--", PY, "train.py")
    (proj / "data" / "words.txt").write_text("edited later\n")
    nodes(home, "local", "--slots", "1")
    with Client(b.address) as c:
        wait_for(c, done(job))
    r = _logs(home, job)
    assert "words as submitted" in r.stdout and "edited later" not in r.stdout
    assert f"files in {proj} differ from those it was submitted with" in r.stderr
    assert (proj / "data" / "words.txt").read_text() == "edited later\n"  # the user's, untouched


def test_a_trainers_data_follows_it(pbroker, nodes, tmp_path):
    home = tmp_path / "home"
    b = pbroker(home)
    work = tmp_path / "work"
    work.mkdir()
    assert run_evo("data", "games", "--out", "games.csv", cwd=work).returncode == 0
    job = _submit(home, work, "--trainer", "GLM", "--param", "data=games.csv", "--param", "last=1")
    (work / "games.csv").rename(tmp_path / "games-moved.csv")
    node_home = tmp_path / "node-home"
    nodes(node_home, "remote", "--broker", b.address, "--slots", "1")
    with Client(b.address) as c:
        events = wait_for(c, done(job), timeout=60)
    (completed,) = of(events, "JobCompleted", job)
    assert completed.artifacts["data_source"].startswith(str(node_home / "cache" / "inputs"))
    assert completed.artifacts["data_sha256"] == of(events, "JobSubmitted", job)[0].spec.data[
        str(work / "games.csv")]


def test_evo_input_says_where_an_input_is(monkeypatch, tmp_path):
    import evo

    monkeypatch.delenv("EVO_INPUTS", raising=False)
    assert evo.input("/data/x.csv") == Path("/data/x.csv")
    monkeypatch.setenv("EVO_INPUTS", '{"/data/x.csv": "/cache/inputs/ab/x.csv"}')
    assert evo.input("/data/x.csv") == Path("/cache/inputs/ab/x.csv")
    assert evo.input("y.csv") == Path("y.csv")



def test_an_evo_home_in_the_folder_is_never_code_whatever_its_name(tmp_path):
    from evo.home import mark_home

    proj = _project(tmp_path / "proj")
    mark_home(proj / "home")  # a broker's or node's home, as tests and some users name it
    (proj / "home" / "log").mkdir()
    (proj / "home" / "log" / "000001.seg").write_bytes(b"\0" * 10)
    (proj / "other-home").mkdir()
    (proj / "other-home" / "x").write_text("the client's own, unmarked")
    _, _, names = code_files(proj, exclude=(proj / "other-home",))
    assert names == ["data/words.txt", "train.py"]


def test_a_blob_received_whole_before_a_restart_is_finished_and_an_empty_one_kept(tmp_path):
    data = b"x" * 5000
    d = digest_bytes(data)
    part = tmp_path / "store" / "partial" / d
    part.parent.mkdir(parents=True)
    part.write_bytes(data)  # every byte synced, then the broker died before the rename
    store = ContentStore(tmp_path / "store")
    assert store.put(d, len(data), 4000, data[4000:]) == 5000 and store.has(d)
    empty = digest_bytes(b"")
    assert store.put(empty, 0, 0, b"") == 0 and store.read(empty, 0, 10) == (b"", 0)


def test_a_submit_with_a_digest_that_is_not_one_is_refused_and_the_broker_lives(tbroker):
    b = tbroker()
    with b.client() as c:
        for spec in (JobSpec(command=["true"], tree="not-a-digest"),
                     JobSpec(command=["true"], data={"/a.csv": "abc"})):
            with pytest.raises(CommandRejected, match="is not a sha256 digest"):
                c.request(p.Submit(spec=spec))
        with pytest.raises(CommandRejected, match=r"outputs\[0\]: expected a glob relative"):
            c.request(p.Submit(spec=JobSpec(command=["true"], outputs=["/tmp/*.pt"])))
        assert c.status().jobs == {}  # and it still answers


def test_moved_paths_are_rewritten_whole_after_an_equals_sign_or_under_a_moved_folder():
    from evo.nodes.executor import relocated

    moved = {"/data/x.csv": "/cache/x.csv", "/home/me/proj": "/cache/trees/k"}
    assert relocated(["python", "/home/me/proj/train.py", "--data=/data/x.csv", "/data/x.csv",
                      "/home/me/project/other.py"], moved) == [
        "python", "/cache/trees/k/train.py", "--data=/cache/x.csv", "/cache/x.csv",
        "/home/me/project/other.py"]
    assert relocated({"data": "/data/x.csv", "n": 3}, moved) == {"data": "/cache/x.csv", "n": 3}


def test_a_job_cannot_name_a_stored_checkpoint_itself(tmp_path):
    from evo.nodes import reports

    line = json.dumps({"kind": "checkpoint", "path": "c.pt", "digest": "a" * 64, "size": 9})
    body = reports.from_line(line.encode(), reports.Notes(), str(tmp_path))
    assert body.path == "c.pt" and body.digest == "" and body.size == 0
