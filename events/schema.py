"""The event catalogue: every fact evo records, as frozen msgspec Structs in one tagged union.

Rules of evolution (enforced by tests/test_schema.py against a checked-in v1 log):
  1. a new field always has a default, so old records still decode;
  2. fields are only appended, never renamed, retyped or removed;
  3. tags (the ``type`` field on disk) never change;
  4. new event types may be added; a reader that does not know a type fails loudly.

Every event carries ``seq`` (its position in the log, from 1) and ``time`` (broker wall clock,
seconds since the epoch). Both are stamped by the broker when it appends; clients never choose
them. ``cause`` ties an event to the command that caused it (dask's ``stimulus_id``).

A lease's *epoch* is the ``seq`` of its JobLeased event; every report about a running attempt
carries it as ``lease_epoch`` so the broker can refuse reports from a lease it already took back.
"""

from __future__ import annotations

from typing import Any, Union

import msgspec


class Resources(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What one attempt of a job needs from a node."""

    cpus: float = 1.0
    mem_gb: float = 0.0
    gpus: int = 0
    vram_gb: float = 0.0  # per GPU


class JobSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything needed to run (and re-run, for an audit) a job.

    Exactly one of ``command`` (an argv list, never run through a shell) and ``callable``
    (``module:function``, run in a warm worker) is set.
    """

    command: list[str] | None = None
    callable: str | None = None
    trainer: str | None = None  # built-in trainer name, resolved to a callable at submit
    params: dict[str, Any] = {}
    model_type: str | None = None
    resources: Resources = Resources()
    priority: int = 0
    after: list[str] = []  # job ids that must complete first
    max_attempts: int = 3
    seed: int | None = None
    data: dict[str, str] = {}  # data path -> sha256
    sweep_id: str | None = None
    tags: dict[str, str] = {}
    key: str | None = None  # idempotency key
    isolate: bool = False  # a fresh process instead of a warm worker
    name: str | None = None
    workdir: str | None = None
    retry_of: str | None = None  # the finished job this one runs again (`evo retry`)
    code: dict[str, str] = {}  # what code it runs: git commit and changes, or files (at submit)
    tree: str = ""  # the manifest's digest of its files in the broker's store (evo.content)
    outputs: list[str] = []  # files (globs, from its folder) that come home when it completes
    # How long an attempt is expected to take, as declared (`evo submit --expected-s`); 0: the
    # broker estimates it from the history of jobs like it (broker/estimates.py).
    expected_s: float = 0.0


class GpuInfo(msgspec.Struct, frozen=True, kw_only=True):
    index: int  # the node's number for it (jobs' devices); NVML's, for a whole GPU
    name: str = ""
    vram_gb: float = 0.0
    uuid: str = ""  # GPU-... (or MIG-... for a MIG instance): what CUDA_VISIBLE_DEVICES names
    parent: str = ""  # a MIG instance's GPU (its uuid)


class GpuSample(msgspec.Struct, frozen=True, kw_only=True):
    index: int
    util: float = 0.0  # percent
    vram_used_gb: float = 0.0
    vram_total_gb: float = 0.0


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    seq: int = 0
    time: float = 0.0
    cause: str = ""


# --- jobs -------------------------------------------------------------------------------------


class JobSubmitted(Event, frozen=True, tag="JobSubmitted"):
    job_id: str
    spec: JobSpec


class JobLeased(Event, frozen=True, tag="JobLeased"):
    job_id: str
    attempt: int
    node: str
    devices: list[int] = []
    deadline: float = 0.0  # broker monotonic clock; informative only after a restart
    fallback: str = ""  # why a non-preferred node was chosen, if it was
    ahead: bool = False  # leased ahead: queued on the node until one of its slots frees


class JobStarted(Event, frozen=True, tag="JobStarted"):
    job_id: str
    lease_epoch: int
    pid: int = 0
    env: dict[str, Any] = {}  # python, package versions, git commit, dirty flag, ...


class Progress(Event, frozen=True, tag="Progress"):
    job_id: str
    lease_epoch: int
    step: int | None = None
    epoch: int | None = None  # training epoch, not the lease epoch
    metrics: dict[str, float] = {}
    eta_s: float | None = None


class Checkpointed(Event, frozen=True, tag="Checkpointed"):
    job_id: str
    lease_epoch: int
    path: str
    step: int | None = None
    metrics: dict[str, float] = {}
    digest: str = ""  # its manifest in the broker's store ("": it was not stored)
    size: int = 0  # bytes of its files


class JobCompleted(Event, frozen=True, tag="JobCompleted"):
    job_id: str
    lease_epoch: int
    metrics: dict[str, float] = {}
    artifacts: dict[str, str] = {}
    duration_s: float = 0.0
    outputs: dict[str, str] = {}  # a file it made (its path) -> its manifest in the store


class JobFailed(Event, frozen=True, tag="JobFailed"):
    """An attempt failed. ``final`` says the job will not be tried again."""

    job_id: str
    lease_epoch: int = 0  # 0 when no attempt was running (e.g. attempts exhausted on expiry)
    error: str = ""
    exit_code: int | None = None
    retryable: bool = True
    final: bool = False


class RetryScheduled(Event, frozen=True, tag="RetryScheduled"):
    job_id: str
    attempt: int  # the attempt that will run next
    not_before: float  # wall clock, seconds since the epoch
    delay_s: float = 0.0


class LeaseExpired(Event, frozen=True, tag="LeaseExpired"):
    job_id: str
    lease_epoch: int
    node: str


class ReportRejected(Event, frozen=True, tag="ReportRejected"):
    """A node reported on a lease that is no longer current; recorded, not applied."""

    job_id: str
    lease_epoch: int
    node: str
    report: str
    reason: str


class CancelRequested(Event, frozen=True, tag="CancelRequested"):
    job_id: str
    reason: str = ""


class JobCancelled(Event, frozen=True, tag="JobCancelled"):
    job_id: str
    reason: str = ""


class PruneRequested(Event, frozen=True, tag="PruneRequested"):
    """The sweep's pruner decided that this trial stops (it reported ``value`` of the sweep's
    metric as its ``resource``-th value); the node stops it, and it ends as JobPruned."""

    job_id: str
    resource: int = 0
    value: float | None = None
    reason: str = ""


class JobPruned(Event, frozen=True, tag="JobPruned"):
    """A trial stopped by its sweep's pruner: neither failed nor retried. The sampler is told
    its last intermediate value."""

    job_id: str
    reason: str = ""
    lease_epoch: int = 0  # the attempt it stopped (0: none was running)


class JobHeld(Event, frozen=True, tag="JobHeld"):
    """A queued job is kept from starting until it is released (`evo hold`)."""

    job_id: str


class JobReleased(Event, frozen=True, tag="JobReleased"):
    job_id: str


# --- nodes ------------------------------------------------------------------------------------


class NodeJoined(Event, frozen=True, tag="NodeJoined"):
    node: str
    hostname: str = ""
    cpus: float = 0.0
    mem_gb: float = 0.0
    gpus: list[GpuInfo] = []
    labels: list[str] = []
    slots: int = 1
    capabilities: list[str] = []
    # When the node's allocation ends (broker wall clock; 0: never): a Slurm pilot's walltime.
    # The scheduler leases it only jobs expected to end before then.
    ends_at: float = 0.0


class NodeLost(Event, frozen=True, tag="NodeLost"):
    node: str
    reason: str = ""


class NodeLeft(Event, frozen=True, tag="NodeLeft"):
    node: str


class NodeDrained(Event, frozen=True, tag="NodeDrained"):
    """The node finishes what it runs and takes nothing new (`evo node drain`), until resumed;
    a drained node that restarts stays drained."""

    node: str


class NodeResumed(Event, frozen=True, tag="NodeResumed"):
    node: str


class UtilizationSampled(Event, frozen=True, tag="UtilizationSampled"):
    node: str
    cpu: float = 0.0  # percent of the node's cores
    mem: float = 0.0  # percent of the node's memory
    gpus: list[GpuSample] = []
    running: int = 0


# --- sweeps -----------------------------------------------------------------------------------


class SweepSubmitted(Event, frozen=True, tag="SweepSubmitted"):
    sweep_id: str
    spec: dict[str, Any] = {}
    job_ids: list[str] = []
    name: str = ""
    # A learning sweep's (``method: tpe``) trials are asked for one at a time, each made from
    # this spec with the suggested parameters (``job_ids`` is then empty).
    template: JobSpec | None = None


class SweepCompleted(Event, frozen=True, tag="SweepCompleted"):
    sweep_id: str
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    best_job: str | None = None
    pruned: int = 0
    reason: str = ""  # why a learning sweep asked no more trials


AnyEvent = Union[
    JobSubmitted,
    JobLeased,
    JobStarted,
    Progress,
    Checkpointed,
    JobCompleted,
    JobFailed,
    RetryScheduled,
    LeaseExpired,
    ReportRejected,
    CancelRequested,
    JobCancelled,
    NodeJoined,
    NodeLost,
    NodeLeft,
    UtilizationSampled,
    SweepSubmitted,
    SweepCompleted,
    JobHeld,
    JobReleased,
    NodeDrained,
    NodeResumed,
    PruneRequested,
    JobPruned,
]

EVENT_TYPES: dict[str, type[Event]] = {cls.__struct_config__.tag: cls for cls in AnyEvent.__args__}  # type: ignore[attr-defined]

# Events that change the state of one job, by job id (the fold's transition table uses these).
JOB_EVENTS = tuple(c for c in AnyEvent.__args__ if "job_id" in c.__struct_fields__)  # type: ignore[attr-defined]
