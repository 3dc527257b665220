"""Slurm pilots against a real Slurm: scripts/slurm-local starts slurmctld and slurmd on this
machine (root, Debian's packages; `make test` installs them where it can). Where it cannot
start, these tests skip and say why."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from evo.broker import protocol as p
from evo.client import Client
from tests.conftest import evo_cmd, free_port, run_evo, wait_until
from tests.test_nodes import PY, done, of, wait_for

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A two-node Slurm for the session (two slurmd on this machine, so allocations of
    several nodes run for real): its environment (SLURM_CONF), or a skip."""
    if not shutil.which("sbatch") or not Path("/usr/sbin/slurmctld").exists():
        pytest.skip("Slurm is not installed (apt-get install slurmctld slurmd slurm-client "
                    "munge; `make test` does it as root)")
    if os.geteuid() != 0:
        pytest.skip("a local Slurm needs root (SlurmUser=root)")
    folder = tmp_path_factory.mktemp("slurm")
    ctl, d = free_port(), free_port()
    while not free_port_at(d + 1):
        d = free_port()
    env = {**os.environ, "SLURMCTLD_PORT": str(ctl), "SLURMD_PORT": str(d), "NODES": "2"}
    r = subprocess.run([str(ROOT / "scripts" / "slurm-local"), "start", str(folder)],
                       capture_output=True, text=True, env=env, timeout=120)
    if r.returncode != 0:
        pytest.skip(f"a local Slurm did not start: {r.stderr.strip()[-500:]}")
    conf = str(folder / "slurm.conf")
    yield {"SLURM_CONF": conf}
    subprocess.run([str(ROOT / "scripts" / "slurm-local"), "stop", str(folder)],
                   capture_output=True, timeout=60)


def free_port_at(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class PilotKeeper:
    """`evo node --slurm` in the foreground, as a user runs it; stop() is its Ctrl-C."""

    def __init__(self, home: Path, slurm: dict, *args: str) -> None:
        self.home = home
        self.env = {**os.environ, **slurm, "EVO_HOME": str(home)}
        self.env.pop("EVO_BROKER", None)
        self.log = open(home / "keeper.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(evo_cmd("node", "--slurm", "--heartbeat-s", "0.5", *args),
                                     stdout=self.log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)

    def squeue(self) -> dict[str, str]:
        """evo's pilots in Slurm: job id -> state."""
        out = subprocess.run(["squeue", "-h", "-n", "evo-pilot", "-o", "%i %T"],
                             capture_output=True, text=True, env=self.env, timeout=30).stdout
        return dict(line.split() for line in out.splitlines() if line.strip())

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(60)
        self.log.close()
        return self.proc.returncode

    def output(self) -> str:
        self.log.flush()
        return (self.home / "keeper.log").read_text()


@pytest.fixture
def keeper(slurm):
    made: list[PilotKeeper] = []

    def start(home: Path, *args: str) -> PilotKeeper:
        k = PilotKeeper(home, slurm, *args)
        made.append(k)
        return k

    yield start
    for k in made:
        k.stop()
    # whatever a test left in Slurm (a keeper killed hard) goes with it
    subprocess.run(["scancel", "-n", "evo-pilot"], env={**os.environ, **slurm},
                   capture_output=True, timeout=30)


def project(tmp_path: Path, script: str, name: str, param: str, metric: str,
            values: str) -> Path:
    """A user's folder: train.py and a sweep of it over one parameter."""
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "train.py").write_text(script)
    (proj / "sweep.yaml").write_text(f"{name}\ncommand: [{PY}, train.py, '{{{param}}}']\n"
                                     f"{metric}\nspace:\n  {param}: {values}\n")
    return proj


def pilots(c: Client) -> list[dict]:
    return [n for n in c.status().nodes if n["node"].startswith("slurm-") and n["alive"]]


def test_pilots_start_lease_jobs_run_a_sweep_and_are_cancelled_with_their_keeper(
        pbroker, keeper, tmp_path):
    home = tmp_path / "home"
    b = pbroker(home)
    proj = project(tmp_path, "import sys, evo\nlr = float(sys.argv[1])\n"
                             "evo.result(loss=(lr - 0.3) ** 2)\n",
                   "name: on-slurm", "lr", "metric: loss\nmode: min",
                   "[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]")
    k = keeper(home, "--scale", "2", "--cpus-per-node", "1", "--mem-gb", "1", "--time", "5",
               "--grace-s", "10", "--idle-exit-s", "60")
    r = run_evo("sweep", "sweep.yaml", "--wait", home=home, cwd=proj, timeout=240)
    assert r.returncode == 0, r.stderr + k.output()
    with Client(b.address) as c:
        events = list(c.read_all(1))
        ran_on = {e.node for e in of(events, "JobLeased")}
        assert ran_on and all(n.startswith("slurm-") for n in ran_on), ran_on
        joined = [e for e in of(events, "NodeJoined") if e.node.startswith("slurm-")]
        assert len(joined) == 2 and all(e.ends_at > e.time for e in joined)
        assert {n["slots"] for n in pilots(c)} == {1}  # a slot per CPU Slurm gave
        completed = of(events, "JobCompleted")
        assert len(completed) == 6 and len({e.job_id for e in completed}) == 6
        ids = {e.node.removeprefix("slurm-") for e in joined}
        assert ids <= set(k.squeue())
        assert k.stop() == 0
        # stopping the keeper cancels its pilots: they leave and Slurm ends them
        wait_until(lambda: not ids & set(k.squeue()), 60, "the pilots to be cancelled")
        wait_until(lambda: not pilots(c), 60, "the pilots to leave the broker")
    assert "0.3" in r.stdout.splitlines()[-1] or "0.3" in r.stdout


def test_a_pilot_of_two_nodes_runs_an_evo_node_on_each_and_both_leave_with_it(
        pbroker, keeper, tmp_path):
    home = tmp_path / "home"
    b = pbroker(home)
    proj = project(tmp_path, "import sys, time, evo\ntime.sleep(1)\n"
                             "evo.result(x=float(sys.argv[1]))\n",
                   "name: two-nodes", "x", "metric: x\nmode: max", "[1, 2, 3, 4]")
    k = keeper(home, "--scale", "1", "--nodes", "2", "--cpus-per-node", "1", "--mem-gb", "1",
               "--time", "5", "--grace-s", "10", "--idle-exit-s", "60")
    r = run_evo("sweep", "sweep.yaml", "--wait", home=home, cwd=proj, timeout=240)
    assert r.returncode == 0, r.stderr + k.output()
    with Client(b.address) as c:
        events = list(c.read_all(1))
        joined = [e for e in of(events, "NodeJoined") if e.node.startswith("slurm-")]
        (job_id,) = set(k.squeue())  # one allocation ...
        # ... and an evo node on each of its machines, named by the allocation and the node
        assert sorted(e.node for e in joined) == [f"slurm-{job_id}-0", f"slurm-{job_id}-1"]
        assert all(e.ends_at > e.time for e in joined)
        assert len({e.job_id for e in of(events, "JobCompleted")}) == 4
        assert k.stop() == 0
        wait_until(lambda: job_id not in k.squeue(), 60, "the pilot to be cancelled")
        wait_until(lambda: not pilots(c), 60, "both of its nodes to leave the broker")


RESUMABLE = """\
import json, os, time, evo
ck = evo.checkpoint_dir() / "state.json"
start, state = 0, 1.0
if os.environ.get("EVO_RESUME_STEP"):
    saved = json.loads(ck.read_text())
    start, state = saved["step"], saved["state"]
    print("resumed at", start)
for step in range(start + 1, 9):
    time.sleep(0.3)
    state = state * 1.5 + step
    ck.write_text(json.dumps({"step": step, "state": state}))
    evo.checkpoint("state.json", step=step)
    evo.report(step=step, state=state)
evo.result(final=state, resumed_from=start)
"""


def test_scancel_of_a_pilot_mid_job_retries_it_once_on_another_from_its_checkpoint(
        pbroker, keeper, tmp_path, slurm):
    home = tmp_path / "home"
    b = pbroker(home)
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "train.py").write_text(RESUMABLE)
    k = keeper(home, "--scale", "2", "--cpus-per-node", "1", "--mem-gb", "1", "--time", "5",
               "--grace-s", "10", "--idle-exit-s", "60")
    with Client(b.address) as c:
        job = c.submit([PY, "train.py"], workdir=str(proj))  # work: the keeper submits pilots
        events = wait_for(c, lambda evs: any(e.step >= 2 and e.digest
                                             for e in of(evs, "Checkpointed", job)), timeout=60)
        wait_until(lambda: len(pilots(c)) == 2, 60, "both pilots to join")
        first = of(events, "JobLeased", job)[0].node
        subprocess.run(["scancel", first.removeprefix("slurm-")], check=True, timeout=30,
                       env={**os.environ, **slurm})
        events = wait_for(c, done(job), timeout=120)
    completed = of(events, "JobCompleted", job)
    assert len(completed) == 1, [type(e).__name__ for e in events if getattr(e, "job_id", "") == job]
    leases = of(events, "JobLeased", job)
    assert len(leases) == 2 and leases[1].node != first, [e.node for e in leases]
    assert completed[0].metrics["resumed_from"] >= 2  # from the checkpoint, not from scratch
    # the same training, never interrupted, gives the same final state
    state = 1.0
    for step in range(1, 9):
        state = state * 1.5 + step
    assert completed[0].metrics["final"] == state
    gone = [e for e in events if type(e).__name__ in ("NodeLost", "NodeLeft") and e.node == first]
    assert gone, f"{first} did not leave the broker"
    assert k.proc.poll() is None  # the keeper goes on


def test_a_pilot_with_60s_left_is_not_leased_a_job_expected_to_take_longer(
        pbroker, keeper, tmp_path):
    home = tmp_path / "home"
    b = pbroker(home)
    # a walltime of 2 minutes, ending 60 s early: the pilot has 60 s left from the start
    keeper(home, "--scale", "1", "--cpus-per-node", "1", "--mem-gb", "1", "--time", "2",
           "--grace-s", "60", "--idle-exit-s", "60")
    with Client(b.address) as c:
        long = c.submit([PY, "-c", "print('long')"], expected_s=120)
        short = c.submit([PY, "-c", "print('short')"], expected_s=5)
        wait_until(lambda: pilots(c), 60, "the pilot to join")
        (node,) = pilots(c)
        assert 0 < node["ends_in_s"] <= 60
        shown = run_evo("status", home=home).stdout
        assert "ends in" in shown and node["node"] in shown
        events = wait_for(c, done(short), timeout=60)
        assert of(events, "JobLeased", short)[0].node == node["node"]
        assert not of(events, "JobLeased", long)
        why = c.request(p.Why(job_id=long)).text
    assert f"{node['node']}: too little time: expected to take up to 120s (declared)" in why
    assert "allocation ends in" in why


def test_slurm_times_and_bad_pilot_options_are_one_line_and_exit_2(pbroker, tmp_path):
    from evo.nodes.pilots import walltime_s

    assert [walltime_s(t) for t in ("5", "5:30", "1:00:00", "2-0", "1-2:03", "0-0:0:9")] == \
        [300, 330, 3600, 172800, 93780, 9]
    home = tmp_path / "home"
    pbroker(home)
    for args, says in ((["--time", "soon"], "--time: expected Slurm's time"),
                       (["--time", "1", "--grace-s", "60"], "--grace-s 60 leaves nothing"),
                       (["--scale", "0"], "--scale: expected >= 1")):
        r = run_evo("node", "--slurm", *args, home=home, env={"PATH": "/nonexistent"})
        assert r.returncode == 2 and says in r.stderr and len(r.stderr.splitlines()) == 1, \
            r.stderr
    r = run_evo("node", "--until", "1", home=home)
    assert r.returncode == 2 and "--until: the allocation ends" in r.stderr
