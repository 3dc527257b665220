"""Disk faults on append: ENOSPC and EIO on the write, the fsync, the rotation and the cut-back.

The affected commands get an error naming the cause, nothing is acknowledged that is not
durable, the broker keeps serving reads and queries, and writes again once the disk does. The
failpoints give EIO and ENOSPC at exact places; a real full tmpfs shows the same end to end.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import uuid
from pathlib import Path

import pytest

from evo import failpoints
from evo.client import BrokerUnavailable, Client, CommandRejected
from evo.events.log import LogWriteError, SegmentLog
from evo.events.schema import JobSpec, JobSubmitted
from tests.conftest import evo_cmd, free_port, run_evo, wait_until


@pytest.fixture(autouse=True)
def _disarm():
    yield
    failpoints.disarm()


def _submitted(home: Path) -> list[str]:
    with SegmentLog(home / "log", readonly=True) as lg:
        return [e.spec.command[0] for e in lg.read_from(1) if isinstance(e, JobSubmitted)]


@pytest.mark.parametrize("point, error", [("log.write", "ENOSPC"), ("log.fsync", "EIO")])
def test_a_failed_append_is_refused_with_its_cause_and_the_broker_serves_on(tbroker, point, error):
    b = tbroker()
    with b.client() as c:
        assert c.submit(["a"]) == "j1"
        size = (b.home / "log").stat().st_size, b.broker.log._size
        failpoints.arm(point, error)
        with pytest.raises(CommandRejected) as exc:
            c.submit(["lost"])
        assert exc.value.code == "unavailable" and exc.value.exit_code == 1
        assert os.strerror(getattr(errno, error)) in str(exc.value)
        assert b.broker.log._size == size[1]  # the batch was cut back off the segment
        assert c.status().last_seq == 1  # reads are served, the state forgot the batch
        assert c.sql("SELECT count(*) AS n FROM jobs").to_pylist() == [{"n": 1}]
        # the probe writes: the broker records again, and the next job takes the free seq
        wait_until(lambda: not b.broker.write_error, what="the broker to record again")
        assert c.submit(["b"]) == "j2"
    b.stop()
    assert _submitted(b.home) == ["a", "b"]


def test_a_failed_rotation_leaves_the_old_segment_in_use(tbroker):
    b = tbroker(segment_bytes=600)
    with b.client() as c:
        ids = [c.submit([f"pre{i}", "x" * 100]) for i in range(4)]
        failpoints.arm("log.rotate", "EIO")
        with pytest.raises(CommandRejected, match="starting a new segment"):
            for i in range(20):
                c.submit([f"rot{i}", "x" * 100])
        wait_until(lambda: not b.broker.write_error, what="the broker to record again")
        after = c.submit(["after"])
    b.stop()
    names = sorted(p.name for p in (b.home / "log").glob("*.seg"))
    assert all((b.home / "log" / n).stat().st_size > 0 for n in names), "an empty segment was left"
    got = _submitted(b.home)
    assert got[:4] == [f"pre{i}" for i in range(4)] and got[-1] == "after"
    assert len(set(ids) | {after}) == 5


def test_a_cut_that_fails_refuses_every_later_write(tmp_path):
    lg = SegmentLog(tmp_path / "log")
    lg.append([JobSubmitted(seq=1, job_id="j1", spec=JobSpec(command=["a"]))])
    real = os.ftruncate

    def broken(fd, size):  # noqa: ANN001
        raise OSError(5, "Input/output error")

    failpoints.arm("log.fsync", "EIO")
    os.ftruncate = broken
    try:
        with pytest.raises(LogWriteError):
            lg.append([JobSubmitted(seq=2, job_id="j2", spec=JobSpec(command=["b"]))])
    finally:
        os.ftruncate = real
    assert lg.broken and "restart the broker" in lg.broken
    with pytest.raises(LogWriteError, match="restart the broker"):
        lg.append([JobSubmitted(seq=2, job_id="j2", spec=JobSpec(command=["b"]))])
    lg.close()


# --- a real full disk -------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs (root only; skipped where mounting is not allowed)."""
    mnt = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(disk: Path) -> Path:
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for size in (1 << 20, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


class _Broker:
    """`evo broker` on a fixed port, its own output off the full disk (broker.json may not be
    writable there, so it is found by address)."""

    def __init__(self, home: Path, out: Path) -> None:
        self.address = f"tcp://127.0.0.1:{free_port()}"
        self.out = open(out, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(evo_cmd("--home", str(home), "broker", "--bind", self.address),
                                     stdout=self.out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        wait_until(self._answers, what=f"the broker at {self.address}")

    def _answers(self) -> bool:
        assert self.proc.poll() is None, f"the broker exited with {self.proc.returncode}"
        try:
            with Client(self.address, timeout_s=0.5) as c:
                c.status()
            return True
        except BrokerUnavailable:
            return False

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.out.close()


def test_a_full_disk_refuses_writes_serves_reads_and_recovers(small_disk, tmp_path):
    home = small_disk / "home"
    pad = "p" * 20_000  # each job needs fresh pages of the log
    b = _Broker(home, tmp_path / "broker-1.log")
    try:
        with Client(b.address, timeout_s=10) as c:
            acked = [c.submit(["before", pad], key=f"k{i}") for i in range(3)]
            filler = _fill(small_disk)
            refused = 0
            for i in range(5):
                try:
                    acked.append(c.submit(["full", pad], key=f"full{i}"))
                except CommandRejected as exc:
                    assert "No space left on device" in str(exc) and exc.code == "unavailable"
                    refused += 1
            assert refused, "the disk never filled"
            assert c.status().last_seq == len(acked)  # status and reads still answer
        r = run_evo("tail", "--from", "1", "--broker", b.address, home=home)
        assert r.returncode == 0 and r.stdout.count("JobSubmitted") == len(acked)
        r = run_evo("sql", "SELECT count(*) AS n FROM jobs", "--format", "csv",
                    "--broker", b.address, home=home)
        assert r.returncode == 0, r.stderr
    finally:
        b.kill()
    # a broker started on the full disk serves too (it used to exit)
    b = _Broker(home, tmp_path / "broker-2.log")
    try:
        with Client(b.address, timeout_s=10) as c:
            assert c.status().last_seq == len(acked)
            with pytest.raises(CommandRejected, match="No space left"):
                c.submit(["still", "full", pad])
            r = run_evo("sql", "SELECT count(*) AS n FROM jobs", "--format", "csv",
                        "--broker", b.address, home=home)
            assert r.returncode == 0 and r.stdout.startswith("n\n"), r.stderr
            filler.unlink()  # space returns
            wait_until(lambda: _accepts(c, pad), what="the broker to take writes again")
    finally:
        b.kill()
    with SegmentLog(home / "log", readonly=True) as lg:
        ids = [e.job_id for e in lg.read_from(1) if isinstance(e, JobSubmitted)]
    assert set(acked) <= set(ids) and len(ids) == len(set(ids)) == len(acked) + 1


def _accepts(c: Client, pad: str) -> bool:
    try:
        c.submit(["after", pad], key="after")
        return True
    except CommandRejected:
        return False
