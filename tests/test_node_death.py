"""A command job's whole process tree ends when its node dies, however it dies: its children in
its group, and a daemon it double-forked into a session of its own."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import psutil
import pytest

from evo.client import Client
from tests.conftest import wait_until
from tests.test_nodes import cluster, done, of, wait_for  # noqa: F401 - the fixture

JOB = r"""
import os, subprocess, sys, time
d = sys.argv[1]
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
pid = os.fork()
if pid == 0:  # a daemon: a session of its own, its parent gone at once
    os.setsid()
    if os.fork() == 0:
        open(os.path.join(d, "daemon.pid"), "w").write(str(os.getpid()))
        time.sleep(600)
    os._exit(0)
os.waitpid(pid, 0)
open(os.path.join(d, "child.pid"), "w").write(str(child.pid))
open(os.path.join(d, "job.pid"), "w").write(str(os.getpid()))
time.sleep(600)
"""


def _pids(d: Path) -> list[int] | None:
    try:
        return [int((d / f"{k}.pid").read_text()) for k in ("job", "child", "daemon")]
    except (FileNotFoundError, ValueError):
        return None


def _gone(pids: list[int]) -> bool:
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            continue
    return True


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSEGV])
def test_a_job_tree_dies_with_its_node(cluster, tmp_path, sig):
    home, b, node = cluster
    n = node("n1")
    with Client(b.address) as c:
        c.submit([sys.executable, "-c", JOB, str(tmp_path)], max_attempts=1)
        pids = wait_until(lambda: _pids(tmp_path), what="the job and its processes")
    assert not _gone(pids)
    n.signal(sig)
    wait_until(lambda: _gone(pids), timeout=15, what=f"the job's processes to end: {pids}")


def _first_pid(path):
    # the file exists a moment before its line does: read it only once the line is whole
    text = path.read_text() if path.exists() else ""
    return int(text.split()[0]) if text.endswith("\n") else None


def test_a_job_retried_after_its_node_was_killed_runs_its_side_effect_once(cluster, tmp_path):
    home, b, node = cluster
    a = node("a")
    marker = tmp_path / "done.txt"
    code = (f"import os, time, sys\nopen({str(tmp_path / 'pid')!r}, 'a').write(str(os.getpid()) + '\\n')\n"
            f"time.sleep(3)\nopen({str(marker)!r}, 'a').write('side effect\\n')\n")
    with Client(b.address) as c:
        j = c.submit([sys.executable, "-c", code], max_attempts=3)
        first = wait_until(lambda: _first_pid(tmp_path / "pid"), what="the first attempt to start")
        a.kill()  # kill -9 of the node, mid-attempt
        wait_until(lambda: _gone([first]), what="the first attempt to end with its node")
        node("b")
        events = wait_for(c, done(j), timeout=60)
    assert of(events, "JobCompleted", j) and of(events, "LeaseExpired", j)
    assert marker.read_text() == "side effect\n"


def test_a_killed_keeper_takes_its_jobs_along_and_is_replaced(cluster, tmp_path):
    home, b, node = cluster
    n = node("n1")
    with Client(b.address) as c:
        j = c.submit([sys.executable, "-c", JOB, str(tmp_path)], max_attempts=1)
        pids = wait_until(lambda: _pids(tmp_path), what="the job and its processes")
        (keeper,) = [k for k in psutil.Process(n.proc.pid).children()
                     if "evo.nodes.keeper" in " ".join(k.cmdline())]
        keeper.kill()
        events = wait_for(c, done(j))
        (failed,) = of(events, "JobFailed", j)
        assert "keeper" in failed.error and failed.final
        wait_until(lambda: _gone(pids[:2]), what="the job's group to end")
        again = c.submit([sys.executable, "-c", "print('fine')"])
        events = wait_for(c, done(again))
    assert of(events, "JobCompleted", again)
    # the daemon had left the group; with its keeper gone nothing held it: say so, and clean up
    if not _gone(pids[2:]):
        psutil.Process(pids[2]).kill()


def test_a_keeper_that_died_idle_is_replaced_at_the_next_job(cluster, tmp_path):
    home, b, node = cluster
    n = node("n1")
    with Client(b.address) as c:
        first = c.submit([sys.executable, "-c", "print(1)"])
        wait_for(c, done(first))
        (keeper,) = [k for k in psutil.Process(n.proc.pid).children()
                     if "evo.nodes.keeper" in " ".join(k.cmdline())]
        keeper.kill()
        wait_until(lambda: _gone([keeper.pid]), what="the keeper to die")
        again = c.submit([sys.executable, "-c", "print(2)"], max_attempts=1)
        events = wait_for(c, done(again))
    assert of(events, "JobCompleted", again), "the job did not run with a new keeper"
    assert n.proc.poll() is None, "the node died"


def test_what_a_job_leaves_writing_is_ended_with_it_and_the_job_completes(cluster, tmp_path):
    home, b, node = cluster
    node("n1")
    pidfile = tmp_path / "writer.pid"
    code = ("import os, sys, time\n"
            "if os.fork() == 0:\n"
            "    os.setsid()\n"
            f"    open({str(pidfile)!r}, 'w').write(str(os.getpid()))\n"
            "    while True: sys.stdout.write('x' * 65536 + '\\n')\n"
            f"while not os.path.exists({str(pidfile)!r}): time.sleep(0.01)\n")
    with Client(b.address) as c:
        j = c.submit([sys.executable, "-c", code], max_attempts=1)
        events = wait_for(c, done(j), timeout=60)
    assert of(events, "JobCompleted", j)
    writer = int(pidfile.read_text())
    wait_until(lambda: _gone([writer]), what="the left-behind writer to be ended")
