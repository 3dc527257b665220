"""The pure scheduler: routing with fallback, fit, slots, priority, fair share, deps, why."""

from __future__ import annotations

from evo.broker.cluster import Cluster, Machine, Rule
from evo.broker.scheduler import decide, explain, never_fits, next_up
from evo.broker.state import BrokerState
from evo.events.schema import (
    GpuInfo, JobCompleted, JobFailed, JobHeld, JobLeased, JobSpec, JobSubmitted, NodeJoined, NodeLost,
    Resources, RetryScheduled,
)

CLUSTER = Cluster(wait_limit_s=30, rules=[
    Rule(model_type="GLM", route_to=["cpu"], reason="CPU-bound"),
    Rule(model_type="XGBoost", route_to=["gpu"], reason="GPU acceleration", wait_limit_s=10),
], machines={"ws": Machine(labels=["gpu"], cpus=16, mem_gb=64, gpus=1, vram_gb=24, slots=2)})


class World:
    def __init__(self) -> None:
        self.state = BrokerState()
        self.t = 1000.0

    def emit(self, cls, **kw):
        ev = cls(seq=self.state.last_seq + 1, time=self.t, **kw)
        self.state.apply(ev)
        return ev

    def node(self, name, labels, cpus=8, mem=32, slots=4, gpus=()):
        self.emit(NodeJoined, node=name, labels=labels, cpus=cpus, mem_gb=mem, slots=slots,
                  gpus=[GpuInfo(index=i, vram_gb=v) for i, v in enumerate(gpus)])

    def job(self, model=None, prio=0, sweep=None, after=(), **res):
        seq = self.state.last_seq + 1
        self.emit(JobSubmitted, job_id=f"j{seq}", spec=JobSpec(
            command=["x"], model_type=model, priority=prio, sweep_id=sweep, after=list(after),
            resources=Resources(**res)))
        return f"j{seq}"

    def lease(self, grants):
        for g in grants:
            self.emit(JobLeased, job_id=g.job_id, attempt=self.state.jobs[g.job_id].attempt + 1,
                      node=g.node, devices=list(g.devices), ahead=g.ahead, fallback=g.fallback)
        return [g.job_id for g in grants]

    def decide(self, node, **kw):
        return decide(self.state, node, self.t, CLUSTER, **kw)


def test_routing_by_model_type():
    w = World()
    w.node("laptop", ["cpu"])
    w.node("gpu-1", ["gpu"], gpus=[24])
    glm, xgb = w.job("GLM"), w.job("XGBoost", gpus=1)
    assert [g.job_id for g in w.decide("gpu-1")] == [xgb]
    assert [g.job_id for g in w.decide("laptop")] == [glm]


def test_fallback_when_no_preferred_node_is_present():
    w = World()
    w.node("laptop", ["cpu"])
    xgb = w.job("XGBoost")
    (g,) = w.decide("laptop")
    assert g.job_id == xgb and "no node labelled gpu is present" in g.fallback


def test_fallback_after_the_wait_limit_when_preferred_node_is_busy():
    w = World()
    w.node("laptop", ["cpu"])
    w.node("gpu-1", ["gpu"], slots=1, gpus=[24])
    w.lease(w.decide("gpu-1") or [])  # nothing yet
    first = w.job("XGBoost")
    w.lease(w.decide("gpu-1"))  # gpu-1 busy now
    second = w.job("XGBoost")
    w.t += 9.9
    assert w.decide("laptop") == []  # within XGBoost's 10 s limit
    w.t += 0.2
    (g,) = w.decide("laptop")
    assert g.job_id == second and "limit 10s" in g.fallback
    assert first != second


def test_gpu_node_lost_its_queued_work_falls_back_at_once():
    w = World()
    w.node("laptop", ["cpu"])
    w.node("gpu-1", ["gpu"], gpus=[24])
    xgb = w.job("XGBoost")
    assert w.decide("laptop") == []
    w.emit(NodeLost, node="gpu-1", reason="silent")
    assert [g.job_id for g in w.decide("laptop")] == [xgb]


def test_fit_cpus_memory_slots():
    w = World()
    w.node("n", [], cpus=4, mem=8, slots=2)
    big = w.job(cpus=6)
    a = w.job(cpus=2, mem_gb=6)
    b = w.job(cpus=2, mem_gb=4)   # memory left: 2
    c = w.job(cpus=1, mem_gb=1)
    assert w.lease(w.decide("n")) == [a, c]  # big never fits; b lacks memory after a
    assert w.decide("n") == []  # both slots used
    assert "can never fit: n has 4 CPUs, the job needs 6" in explain(w.state, big, w.t, CLUSTER)
    assert "no free slot" in explain(w.state, b, w.t, CLUSTER)


def test_gpu_whole_and_shared_vram():
    w = World()
    w.node("ws", ["gpu"], slots=8, gpus=[24, 10])
    whole = w.job(gpus=1)                 # takes GPU 0 (most free) whole
    share1 = w.job(gpus=1, vram_gb=8)     # GPU 1 (10 GB)
    share2 = w.job(gpus=1, vram_gb=8)     # GPU 1 has 2 GB left: does not fit
    grants = w.decide("ws")
    assert [(g.job_id, g.devices) for g in grants] == [(whole, (0,)), (share1, (1,))]
    w.lease(grants)
    assert w.decide("ws") == []
    why = explain(w.state, share2, w.t, CLUSTER)
    assert "needs 8 GB VRAM" in why and "2 GB free" in why


def test_priority_then_fair_share_between_sweeps():
    w = World()
    w.node("n", [], cpus=100, mem=100, slots=6)
    a = [w.job(sweep="A") for _ in range(4)]
    b = [w.job(sweep="B") for _ in range(4)]
    urgent = w.job(prio=10)
    got = [g.job_id for g in w.decide("n")]
    assert got[0] == urgent
    assert got[1:] == [a[0], b[0], a[1], b[1], a[2]]


def test_next_up_is_the_order_leases_go_out_in_then_what_cannot_run_with_why():
    w = World()
    w.node("n", [], cpus=100, mem=100, slots=6)
    a = [w.job(sweep="A") for _ in range(3)]
    b = [w.job(sweep="B") for _ in range(2)]
    held = w.job(prio=5)
    w.emit(JobHeld, job_id=held)
    urgent = w.job(prio=10)
    up = next_up(w.state, w.t, CLUSTER, 10)
    order = [j.job_id for j, _ in up]
    # the scheduler's own order: priority, then fair share between sweeps, then submission;
    # the held job last, though its priority is higher
    assert order == [urgent, a[0], b[0], a[1], b[1], a[2], held]
    assert order[:6] == [g.job_id for g in w.decide("n")]
    assert dict((j.job_id, why) for j, why in up)[held] == explain(w.state, held, w.t, CLUSTER)
    assert "held" in dict((j.job_id, why) for j, why in up)[held]
    assert [j.job_id for j, _ in next_up(w.state, w.t, CLUSTER, 2)] == [urgent, a[0]]


def test_fair_share_counts_running_jobs():
    w = World()
    w.node("n", [], cpus=100, mem=100, slots=3)
    a = [w.job(sweep="A") for _ in range(4)]
    w.lease(w.decide("n", max_leases=2))  # A has 2 running
    b = [w.job(sweep="B") for _ in range(2)]
    assert [g.job_id for g in w.decide("n")] == [b[0]]
    assert a


def test_drained_sweeps_leave_the_order_index():
    # Otherwise every Ready would visit every sweep ever submitted.
    w = World()
    w.node("n", [], cpus=100, mem=100, slots=100)
    for s in range(5):
        jobs = [w.job(sweep=f"s{s}") for _ in range(3)]
        assert sorted(w.lease(w.decide("n"))) == sorted(jobs)
    assert list(w.state.order_index.groups) == ["s4"]  # only the latest, until the next call
    late = w.job(sweep="s0")  # a sweep that comes back is ordered again
    assert w.lease(w.decide("n")) == [late]


def test_dependencies_wait_for_completion():
    w = World()
    w.node("n", [], slots=4)
    first = w.job()
    second = w.job(after=[first])
    assert w.lease(w.decide("n")) == [first]
    assert f"waits for {first} (leased)" in explain(w.state, second, w.t, CLUSTER)
    w.emit(JobCompleted, job_id=first, lease_epoch=w.state.jobs[first].lease_epoch)
    assert w.lease(w.decide("n")) == [second]


def test_retry_waits_for_not_before():
    w = World()
    w.node("n", [])
    j = w.job()
    w.lease(w.decide("n"))
    w.emit(JobFailed, job_id=j, lease_epoch=w.state.jobs[j].lease_epoch, error="boom")
    w.emit(RetryScheduled, job_id=j, attempt=2, not_before=w.t + 4)
    assert w.decide("n") == []
    assert "not before" in explain(w.state, j, w.t, CLUSTER)
    w.t += 4
    assert [g.job_id for g in w.decide("n")] == [j]


def test_why_names_nodes_and_routing():
    w = World()
    w.node("laptop", ["cpu"])
    w.node("gpu-1", ["gpu"], gpus=[10])
    j = w.job("XGBoost", gpus=1, vram_gb=24)
    why = explain(w.state, j, w.t, CLUSTER)
    assert "laptop: not preferred for XGBoost" in why and "fallback after 10s" in why
    assert "gpu-1: can never fit: gpu-1 has 10 GB VRAM per GPU, the job needs 24" in why


def test_never_fits_warning_names_machines():
    w = World()
    assert never_fits(JobSpec(command=["x"], resources=Resources(gpus=1, vram_gb=48)), w.state,
                      CLUSTER) == "no known machine fits this job: ws has 24 GB VRAM per GPU, the job needs 48; it waits for one that does"
    w.node("big", [], cpus=64, mem=512, gpus=[80])
    assert never_fits(JobSpec(command=["x"], resources=Resources(gpus=1, vram_gb=48)), w.state,
                      CLUSTER) is None


def test_lease_ahead_queues_cpu_jobs_beyond_free_slots_up_to_the_offer():
    from evo.events.schema import JobStarted

    w = World()
    w.node("n", ["cpu"], cpus=2, mem=8, slots=2, gpus=[24])
    jobs = [w.job(cpus=1) for _ in range(6)]
    big, gpu = w.job(cpus=4), w.job(gpus=1)
    first = w.decide("n", ahead=3)
    assert [(g.job_id, g.ahead) for g in first] == [
        (jobs[0], False), (jobs[1], False), (jobs[2], True), (jobs[3], True), (jobs[4], True)]
    w.lease(first)
    # three ahead leases are outstanding: nothing more until one starts (or the offer grows)
    assert w.decide("n", ahead=3) == []
    # queued-ahead leases hold no resources; a started one does, like any lease
    w.emit(JobCompleted, job_id=jobs[0], lease_epoch=w.state.jobs[jobs[0]].lease_epoch)
    w.emit(JobStarted, job_id=jobs[2], lease_epoch=w.state.jobs[jobs[2]].lease_epoch)
    assert not w.state.jobs[jobs[2]].ahead
    nxt = w.decide("n", ahead=3)
    # no free slot (jobs 1 and 2 run); one ahead lease is free again: job 5 (the 4-CPU job never
    # fits this node, the GPU job is never leased ahead)
    assert [(g.job_id, g.ahead) for g in nxt] == [(jobs[5], True)]
    assert big not in [g.job_id for g in nxt] and gpu not in [g.job_id for g in nxt]
    # without an offer the node gets only what fits its free resources
    assert w.decide("n") == []


def test_why_names_a_retrys_backoff_and_the_attempt_that_failed():
    from evo.broker.scheduler import blocked
    from evo.broker.state import Job

    job = Job(job_id="j1", spec=JobSpec(command=["x"]), attempt=1, not_before=110.0,
              error="exit code 3: CUDA out of memory")
    assert blocked(job, __import__("evo.broker.state", fromlist=["x"]).BrokerState(), 100.0) == (
        "retry 2 is not before 10.0s from now (backoff) (attempt 1 failed: exit code 3: CUDA "
        "out of memory)")


def test_the_node_admits_a_lease_by_the_schedulers_own_fit_rule():
    from evo.broker.scheduler import fits_on, free_for
    from evo.events.schema import JobSpec, Resources

    def spec(cpus=1.0, mem=0.0, gpus=0, vram=0.0):
        return JobSpec(command=["x"], resources=Resources(cpus=cpus, mem_gb=mem, gpus=gpus,
                                                          vram_gb=vram))

    vram = {0: 24.0, 1: 24.0}
    idle = free_for(2, 4.0, 16.0, vram, [])
    assert fits_on(spec(gpus=1), [0], idle, vram)  # a whole GPU
    shared = free_for(2, 4.0, 16.0, vram, [(spec(gpus=1, vram=20.0), [0])])
    assert not fits_on(spec(gpus=1), [0], shared, vram)  # not whole any more
    assert not fits_on(spec(gpus=1, vram=8.0), [0], shared, vram)  # 4 GB left on it
    assert fits_on(spec(gpus=1, vram=4.0), [0], shared, vram)
    whole = free_for(2, 4.0, 16.0, vram, [(spec(gpus=1), [1])])
    assert not fits_on(spec(gpus=1, vram=1.0), [1], whole, vram)  # taken whole by another
    full = free_for(2, 4.0, 16.0, vram, [(spec(cpus=3.0), []), (spec(), [])])
    assert not fits_on(spec(cpus=0.1), [], full, vram)  # no slot left
    busy = free_for(3, 4.0, 16.0, vram, [(spec(cpus=3.5, mem=12.0), [])])
    assert not fits_on(spec(cpus=1.0), [], busy, vram) and not fits_on(spec(cpus=0.5, mem=8.0), [], busy, vram)
    assert fits_on(spec(cpus=0.5, mem=4.0), [], busy, vram)


def test_a_node_whose_allocation_ends_takes_only_jobs_expected_to_end_before_it():
    w = World()
    w.emit(NodeJoined, node="pilot", labels=["slurm"], cpus=4, mem_gb=8, slots=4,
           ends_at=w.t + 60)
    seq = w.state.last_seq + 1
    for job_id, expected in ((f"j{seq}", 120.0), (f"j{seq + 1}", 30.0), (f"j{seq + 2}", 0.0)):
        w.emit(JobSubmitted, job_id=job_id, spec=JobSpec(command=["x"], expected_s=expected))
    long, short, unknown = f"j{seq}", f"j{seq + 1}", f"j{seq + 2}"
    # nothing is known of the third: it may run (a pilot that ends first has it retried)
    assert w.lease(w.decide("pilot")) == [short, unknown]
    why = explain(w.state, long, w.t, CLUSTER)
    assert ("pilot: too little time: expected to take up to 120s (declared); pilot's "
            "allocation ends in 60s") in why
    w.t += 50  # 10 s left: a 30 s job no longer fits
    w.emit(JobSubmitted, job_id="j900", spec=JobSpec(command=["x"], expected_s=30))
    assert "j900" not in w.lease(w.decide("pilot"))


def test_expected_durations_are_learned_per_sweep_and_node_and_bound_pilots():
    from evo.broker.estimates import Durations

    w = World()
    w.node("fast", ["cpu"], slots=1)
    w.node("slow", ["cpu"], slots=1)
    for node, took in (("fast", 10.0), ("fast", 12.0), ("slow", 40.0)):
        seq = w.state.last_seq + 1
        w.emit(JobSubmitted, job_id=f"j{seq}", spec=JobSpec(command=["python", "train.py"],
                                                           sweep_id="s1"))
        w.emit(JobLeased, job_id=f"j{seq}", attempt=1, node=node)
        w.emit(JobCompleted, job_id=f"j{seq}", lease_epoch=seq + 1, duration_s=took)
    spec = JobSpec(command=["python", "train.py", "--lr", "3"], sweep_id="s1")
    d: Durations = w.state.durations
    fast, slow = d.estimate(spec, "fast"), d.estimate(spec, "slow")
    assert fast is not None and slow is not None
    assert (fast.seconds, fast.n, fast.basis) == (11.0, 2, "sweep s1 on fast (2 runs)")
    assert abs(fast.bound - (11 + 2 * 2 ** 0.5)) < 1e-9  # the mean and two deviations
    assert (slow.seconds, slow.bound, slow.basis) == (40.0, 40.0, "sweep s1 on slow (1 run)")
    anywhere = d.estimate(spec, "new")
    assert anywhere is not None and anywhere.basis == "sweep s1 (3 runs)"
    # another sweep of the same script: learned under the command's program and script
    other = d.estimate(JobSpec(command=["/usr/bin/python", "train.py"], sweep_id="s2"), None)
    assert other is not None and other.basis == "command python train.py (3 runs)"
    assert d.estimate(JobSpec(command=["other"]), "fast") is None
    # a pilot with 30 s left takes the sweep's next trial when it would run on fast, not on slow
    w.emit(NodeJoined, node="fast", labels=["cpu"], cpus=8, mem_gb=32, slots=1, ends_at=w.t + 30)
    w.emit(NodeJoined, node="slow", labels=["cpu"], cpus=8, mem_gb=32, slots=1, ends_at=w.t + 30)
    w.emit(JobSubmitted, job_id="j99", spec=spec)
    assert w.decide("slow") == []
    assert [g.job_id for g in w.decide("fast")] == ["j99"]


def test_a_multi_gpu_job_gets_distinct_devices_no_other_job_holds():
    w = World()
    w.node("ws", ["gpu"], slots=4, gpus=[24, 24, 24])
    two = w.job(gpus=2)
    other = w.job(gpus=2)
    one = w.job(gpus=1)
    grants = w.decide("ws")
    assert [(g.job_id, g.devices) for g in grants] == [(two, (0, 1)), (one, (2,))]
    w.lease(grants)
    assert w.decide("ws") == []
    assert "needs 2 whole GPU(s); ws has 0 free" in explain(w.state, other, w.t, CLUSTER)


def test_a_job_goes_to_a_non_preferred_node_that_is_expected_to_finish_it_sooner():
    w = World()
    w.node("ws", ["gpu"], slots=1)
    w.node("laptop", ["cpu"], slots=1)

    def ran(node, took, n=3):  # history: XGBoost jobs that completed on the node
        for _ in range(n):
            seq = w.state.last_seq + 1
            w.emit(JobSubmitted, job_id=f"j{seq}", spec=JobSpec(command=["x"],
                                                               model_type="XGBoost"))
            w.emit(JobLeased, job_id=f"j{seq}", attempt=1, node=node)
            w.emit(JobCompleted, job_id=f"j{seq}", lease_epoch=seq + 1, duration_s=took)

    busy = w.job("XGBoost")
    w.lease(w.decide("ws"))  # ws busy with it from now
    waiting = w.job("XGBoost")
    assert w.decide("laptop") == []  # nothing known yet: the rule's default, wait
    ran("ws", 100.0)
    ran("laptop", 300.0)
    assert w.decide("laptop") == []  # ws frees in ~100 s and takes 100: 200 < 300 here
    w.state.jobs[busy].started_at = w.t - 100 + 10  # ws's job has run 90 s: ~10 s left
    assert w.decide("laptop") == []
    w.state.jobs[busy].started_at = w.t  # just started again: ws is busy ~100 s more
    ran("laptop", 50.0, n=30)  # the laptop is fast for these after all: ~72 s there
    (g,) = w.decide("laptop")
    assert g.job_id == waiting and "expected to finish sooner here" in g.fallback
    assert "on ws, busy ~100s more, then ~100s" in g.fallback
    w.lease([g])
    why = explain(w.state, waiting, w.t, CLUSTER)
    assert why.startswith(f"{waiting} is leased on laptop (attempt 1); not a node its rule "
                          "prefers: expected to finish sooner here")


def test_a_new_pilot_is_wanted_only_for_a_queued_job_it_could_start():
    from evo.broker.status import startable
    from evo.events.schema import JobHeld

    w = World()
    w.emit(JobSubmitted, job_id="j1", spec=JobSpec(command=["x"], expected_s=120))
    assert not startable(w.state, 60, w.t)  # longer than any such pilot lasts
    assert startable(w.state, 180, w.t)
    w.emit(JobSubmitted, job_id="j2", spec=JobSpec(command=["y"]))  # nothing known: it may
    assert startable(w.state, 60, w.t)
    w.emit(JobHeld, job_id="j2")
    assert not startable(w.state, 60, w.t)  # held: no pilot comes for it
    w.emit(JobSubmitted, job_id="j3", spec=JobSpec(command=["z"], after=["j1"]))
    assert not startable(w.state, 60, w.t)  # waits for j1
