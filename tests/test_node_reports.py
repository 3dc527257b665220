"""What a job reports, checked at the node: refused reports are recorded and shown on the job's
stderr, never appended; the node's loop is not held up by what a job prints."""

from __future__ import annotations

import sys

from evo.client import Client
from evo.events.log import SegmentLog
from tests.conftest import run_evo
from tests.test_nodes import cluster, done, joined, of, wait_for  # noqa: F401 - the fixture

PY = sys.executable


def _job(c: Client, code: str, **kw) -> str:
    return c.submit([PY, "-c", code], **kw)


def test_a_float_step_is_rejected_with_its_path_and_the_log_stays_readable(cluster, pbroker):
    home, b, node = cluster
    node("n1")
    with Client(b.address) as c:
        j = _job(c, "import evo\nevo.report(step=0.5, loss=1.0)\nevo.report(step=True)\n"
                    "evo.report(step=2, loss=0.5)\n", max_attempts=1)
        events = wait_for(c, done(j))
    (bad, bool_step) = of(events, "ReportRejected", j)
    assert bad.report == "progress" and "$.step" in bad.reason and "float" in bad.reason
    assert "$.step" in bool_step.reason and "bool" in bool_step.reason
    assert [e.step for e in of(events, "Progress", j)] == [2]
    assert of(events, "JobCompleted", j)
    err = run_evo("logs", j, "--stream", "stderr", home=home)
    assert "evo: progress report not recorded: Expected `int | null`, got `float` - at `$.step`" \
        in err.stderr
    b.kill()  # the log must still decode and fold: a restart, then every event read back
    b2 = pbroker(home)
    with Client(b2.address) as c:
        assert c.status().last_seq >= events[-1].seq
    with SegmentLog(home / "log", readonly=True) as lg:
        assert len(list(lg.read_from(1))) >= len(events)


def test_non_finite_metrics_are_left_out_and_said_on_stderr(cluster):
    home, b, node = cluster
    node("n1")
    with Client(b.address) as c:
        j = _job(c, "import evo\nevo.report(step=1, loss=float('nan'), auc=0.5)\n")
        printed = _job(c, "print('epoch 2 loss=1e999 acc=0.7', flush=True)\n")
        events = wait_for(c, lambda evs: done(j)(evs) and done(printed)(evs))
    assert [(e.step, e.epoch, e.metrics) for e in of(events, "Progress", j)] == [
        (1, None, {"auc": 0.5})]
    assert [(e.epoch, e.metrics) for e in of(events, "Progress", printed)] == [(2, {"acc": 0.7})]
    assert not of(events, "ReportRejected", j)
    err = run_evo("logs", j, "--stream", "stderr", home=home).stderr
    assert "loss=nan not recorded (metrics must be finite numbers)" in err
    err = run_evo("logs", printed, "--stream", "stderr", home=home).stderr
    assert "loss=inf not recorded" in err


def test_a_result_too_large_fails_once_and_the_node_stays_joined(cluster):
    home, b, node = cluster
    node("n1")
    with Client(b.address) as c:
        big = c.submit(callable="tests.jobs:huge", params={"mb": 20})
        ok = c.submit(callable="tests.jobs:square", params={"x": 3})
        events = wait_for(c, lambda evs: done(big)(evs) and done(ok)(evs))
    (failed,) = of(events, "JobFailed", big)
    assert failed.final and not failed.retryable and "over evo's limit" in failed.error
    assert len(of(events, "NodeJoined")) == 1, "the node was dropped and joined again"
    assert of(events, "JobCompleted", ok)[0].metrics["y"] == 9.0


def test_huge_and_long_lines_do_not_hold_the_node_up(cluster):
    """A 300,000-character line took the old progress parser minutes (it backtracked); a step
    too big for an event crashed the node. Now both are skipped, and the leases live."""
    home, b, node = cluster
    node("n1", "--slots", "2")
    code = ("import sys\nsys.stdout.write('x' * 300000 + '\\n')\n"
            "print('step 99999999999999999999999 loss=0.1')\n"
            "print('a=' + '1' * 5000)\nprint('step 3 loss=0.5', flush=True)\n")
    with Client(b.address) as c:
        j = _job(c, code, max_attempts=1)
        other = _job(c, "import time; time.sleep(2)", max_attempts=1)
        events = wait_for(c, lambda evs: done(j)(evs) and done(other)(evs))
    assert not of(events, "LeaseExpired") and not of(events, "NodeLost")
    assert of(events, "JobCompleted", j) and of(events, "JobCompleted", other)
    assert [(e.step, e.metrics) for e in of(events, "Progress", j)] == [
        (None, {"loss": 0.1}), (3, {"loss": 0.5})]


def test_checkpoint_paths_stay_inside_the_checkpoint_folder(cluster):
    home, b, node = cluster
    node("n1")
    code = ("import os, evo\nd = evo.checkpoint_dir()\n"
            "os.symlink('/etc', d / 'out')\n"
            "evo.checkpoint(str(d / 'model.pt'), step=1)\n"  # absolute, inside: kept, relative
            "evo.checkpoint('../../etc/passwd', step=2)\n"
            "evo.checkpoint('out/passwd', step=3)\n"  # through a symlink that leads outside
            "evo.checkpoint('sub/ok.pt', step=4)\n")
    with Client(b.address) as c:
        j = _job(c, code)
        events = wait_for(c, done(j))
    assert [(e.step, e.path) for e in of(events, "Checkpointed", j)] == [
        (1, "model.pt"), (4, "sub/ok.pt")]
    rejected = of(events, "ReportRejected", j)
    assert len(rejected) == 2 and all("leads outside the checkpoint folder" in r.reason
                                      for r in rejected)
    assert of(events, "JobCompleted", j)


def test_shell_metacharacters_reach_the_job_as_literal_arguments(cluster):
    home, b, node = cluster
    node("n1")
    args = ["a; echo owned", "$(id)", "`id`", "two\nlines", "*", "'quoted'"]
    with Client(b.address) as c:
        j = c.submit([PY, "-c", "import sys, json; print(json.dumps(sys.argv[1:]))", *args])
        wait_for(c, done(j))
        out = c.logs(j).data.decode()
    import json

    assert json.loads(out) == args


def test_a_job_that_prints_much_ships_it_all_before_its_end_and_the_lease_lives(cluster):
    home, b, node = cluster
    node("n1")
    lines = 30_000  # 30 MiB of output, shipped a few MiB a turn of the node's loop
    with Client(b.address) as c:
        j = _job(c, f"import sys\nsys.stdout.write(('x' * 1023 + '\\n') * {lines})\n",
                 max_attempts=1)
        events = wait_for(c, done(j), timeout=120)
        size = c.logs(j).size
    assert of(events, "JobCompleted", j) and not of(events, "LeaseExpired")
    assert size == lines * 1024


def test_an_oversized_final_report_stays_final():
    from evo.broker import protocol as p
    from evo.nodes import reports

    notes = reports.Notes()
    big = p.Report(node="n", job_id="j1", lease_epoch=3,
                   report=p.FailedReport(error="x" * (3 << 20), exit_code=1))
    fitted = reports.fit(big, notes)
    assert isinstance(fitted.report, p.FailedReport) and fitted.report.exit_code == 1
    assert len(fitted.report.error) == reports.MAX_TEXT
    done = reports.fit(p.Report(node="n", job_id="j1", lease_epoch=3, report=p.CompletedReport(
        artifacts={"a": "y" * (3 << 20)})), notes)
    assert isinstance(done.report, p.FailedReport) and not done.report.retryable


def test_the_job_api_takes_metrics_as_keywords_or_a_mapping_and_names_a_bad_value(tmp_path,
                                                                                  monkeypatch):
    import json

    import pytest

    import evo

    out = tmp_path / "reports.jsonl"
    monkeypatch.setenv("EVO_REPORT_FILE", str(out))
    evo.report(3, {"loss": 0.5}, acc=1)
    evo.report(step=4, loss=0.25)
    evo.result({"auc": 0.7})
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["metrics"] for r in recs] == [{"loss": 0.5, "acc": 1.0}, {"loss": 0.25},
                                            {"auc": 0.7}]
    assert recs[0]["step"] == 3 and recs[2]["kind"] == "result"
    with pytest.raises(TypeError, match="evo.report: metric 'loss' must be a number, got dict"):
        evo.report(step=1, loss={"x": 1})
