"""The pure fold: transitions, illegal events, idempotency keys, counts. No sockets, no clock."""

from __future__ import annotations

import copy

import pytest

from evo.broker.state import BrokerState, IllegalTransition, TRANSITIONS, fold
from evo.events.schema import (
    CancelRequested, JobCancelled, JobCompleted, JobFailed, JobLeased, JobSpec, JobStarted,
    JobSubmitted, LeaseExpired, NodeJoined, NodeLost, Progress, ReportRejected, RetryScheduled,
    SweepSubmitted,
)


class Seq:
    """Stamps seqs and times in order, like the broker does."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, cls, **kw):
        self.n += 1
        return cls(seq=self.n, time=1000.0 + self.n, **kw)


SPEC = JobSpec(command=["true"])


def test_happy_path_and_counts():
    s = Seq()
    events = [
        s(NodeJoined, node="n1", cpus=4, slots=2),
        s(JobSubmitted, job_id="j2", spec=SPEC),
        s(JobLeased, job_id="j2", attempt=1, node="n1"),
        s(JobStarted, job_id="j2", lease_epoch=3, pid=42),
        s(Progress, job_id="j2", lease_epoch=3, step=1, metrics={"loss": 0.5}),
        s(JobCompleted, job_id="j2", lease_epoch=3, metrics={"auc": 0.6}),
    ]
    st = fold(events)
    job = st.jobs["j2"]
    assert job.state == "completed"
    assert job.metrics == {"loss": 0.5, "auc": 0.6}
    assert job.attempt == 1 and job.lease_epoch == 0
    assert st.nodes["n1"].running == set()
    assert st.counts == {"queued": 0, "leased": 0, "running": 0, "completed": 1}
    assert st.last_seq == 6


def test_lease_sets_epoch_and_node_running():
    s = Seq()
    st = fold([s(NodeJoined, node="n1"), s(JobSubmitted, job_id="a", spec=SPEC),
               s(JobLeased, job_id="a", attempt=1, node="n1", devices=[0])])
    assert st.jobs["a"].lease_epoch == 3
    assert st.jobs["a"].devices == [0]
    assert st.nodes["n1"].running == {"a"}


@pytest.mark.parametrize("bad", [
    lambda s: s(JobStarted, job_id="a", lease_epoch=1),          # queued -> started
    lambda s: s(JobCompleted, job_id="a", lease_epoch=1),        # queued -> completed
    lambda s: s(JobLeased, job_id="nope", attempt=1, node="n"),  # unknown job
    lambda s: s(JobSubmitted, job_id="a", spec=SPEC),            # submitted twice
    lambda s: s(JobFailed, job_id="a", final=False),             # non-final failure, not running
])
def test_illegal_transition_names_job_state_event_and_changes_nothing(bad):
    s = Seq()
    st = fold([s(JobSubmitted, job_id="a", spec=SPEC)])
    before = copy.deepcopy(st)
    ev = bad(s)
    with pytest.raises(IllegalTransition) as exc:
        st.apply(ev)
    msg = str(exc.value)
    assert type(ev).__name__ in msg and ev.job_id in msg
    assert ("queued" in msg) or ("unknown" in msg)
    assert st == before


def test_terminal_states_accept_nothing_but_rejections():
    s = Seq()
    st = fold([s(JobSubmitted, job_id="a", spec=SPEC), s(CancelRequested, job_id="a"),
               s(JobCancelled, job_id="a")])
    assert st.jobs["a"].state == "cancelled"
    with pytest.raises(IllegalTransition, match="cancelled"):
        st.apply(s(JobLeased, job_id="a", attempt=1, node="n"))
    st.apply(ReportRejected(seq=st.last_seq + 1, job_id="a", lease_epoch=9, node="n",
                            report="completed", reason="stale"))
    assert st.jobs["a"].state == "cancelled"


def test_retry_then_final_failure():
    s = Seq()
    st = fold([
        s(NodeJoined, node="n1"),
        s(JobSubmitted, job_id="a", spec=SPEC),
        s(JobLeased, job_id="a", attempt=1, node="n1"),
        s(JobFailed, job_id="a", lease_epoch=3, error="boom", exit_code=1),
        s(RetryScheduled, job_id="a", attempt=2, not_before=2000.0),
    ])
    job = st.jobs["a"]
    assert job.state == "queued" and job.not_before == 2000.0 and job.error == "boom"
    st.apply(s(JobLeased, job_id="a", attempt=2, node="n1"))
    st.apply(s(LeaseExpired, job_id="a", lease_epoch=6, node="n1"))
    assert job.state == "queued" and "expired" in job.error
    st.apply(s(JobFailed, job_id="a", error="attempts exhausted", final=True))
    assert job.state == "failed" and job.finished_at > 0


def test_idempotency_keys_and_node_loss():
    s = Seq()
    st = fold([s(JobSubmitted, job_id="a", spec=JobSpec(command=["x"], key="k")),
               s(NodeJoined, node="n1"), s(NodeLost, node="n1", reason="silent")])
    assert st.keys == {"k": "a"}
    assert st.nodes["n1"].alive is False


def test_sweep_registered():
    s = Seq()
    st = fold([s(SweepSubmitted, sweep_id="s1", name="grid", job_ids=["a", "b"])])
    assert st.sweeps["s1"].job_ids == ["a", "b"]


def test_seq_gap_is_refused():
    st = BrokerState()
    with pytest.raises(ValueError, match="does not follow"):
        st.apply(JobSubmitted(seq=2, job_id="a", spec=SPEC))


def test_transition_table_has_no_exit_from_terminal_states():
    for (before, kind), after in TRANSITIONS.items():
        if before in ("completed", "failed", "cancelled"):
            assert kind == "ReportRejected" and after == before


def test_a_node_that_joins_again_without_its_jobs_gives_their_leases_back():
    from evo.broker import protocol as p
    from evo.broker.desk import Desk
    from evo.events.schema import JobSpec

    desk = Desk()
    desk.handle(p.Join(node="a", cpus=4, slots=2), 1.0)
    a = desk.handle(p.Submit(spec=JobSpec(command=["x"])), 1.0).reply.job_id
    b = desk.handle(p.Submit(spec=JobSpec(command=["y"])), 1.0).reply.job_id
    grants = desk.handle(p.Ready(node="a"), 1.0).reply.leases
    assert {g.job_id for g in grants} == {a, b}
    keep = next(g for g in grants if g.job_id == a)
    out = desk.handle(p.Join(node="a", cpus=4, slots=2, running=[(a, keep.lease_epoch)]), 2.0)
    kinds = [(type(e).__name__, getattr(e, "job_id", "")) for e in out.events]
    # b never started: given back without a retry's backoff, and not counted as an attempt
    assert ("LeaseExpired", b) in kinds and ("RetryScheduled", b) not in kinds
    assert desk.state.jobs[a].state == "leased" and desk.state.jobs[b].state == "queued"
    assert desk.state.jobs[b].runs == 0


def test_the_invariant_check_passes_a_folded_state_and_sees_a_broken_one():
    s = Seq()
    st = fold([s(NodeJoined, node="n1", slots=2), s(JobSubmitted, job_id="a", spec=SPEC),
               s(JobSubmitted, job_id="b", spec=JobSpec(command=["x"], after=["a"])),
               s(JobLeased, job_id="a", attempt=1, node="n1")])
    assert st.problems() == []
    st.nodes["n1"].running.clear()  # a lease no node holds
    st.queue.pop("b")
    st.counts["queued"] += 1
    assert st.problems() == [
        "counts {'leased': 1, 'queued': 2} are not the jobs' {'leased': 1, 'queued': 1}",
        "queue index differs from the queued jobs by ['b']",
        "a is leased without a lease its node holds (epoch 4, node n1)"]
    st.nodes["n1"].running.add("a")
    st.queue["b"] = None
    st.counts["queued"] -= 1
    assert st.problems() == []
