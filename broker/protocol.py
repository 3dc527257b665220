"""The wire protocol between clients, nodes and the broker.

Framing is kept apart from meaning (msgspec's asyncio-kv example): a client's DEALER sends
exactly one frame, a msgpack map tagged by ``cmd``; the broker's ROUTER answers with one frame,
a msgpack map tagged by ``reply``. ``req`` is the client's request number, echoed back so a
client can keep many requests in flight. Anything else (more frames, bytes that do not decode,
an unknown ``cmd``) gets an ``Error`` reply and changes nothing.

The relay (PUB) sends two frames per committed batch: ``b"ev"`` and a msgpack array of the
encoded events, the same bytes as in the log.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

import msgspec
from msgspec import Meta

from evo.events.schema import GpuInfo, GpuSample, JobSpec
from evo.events.strict import MAX_FLOAT, Finite, Int64, friendly
from evo.names import relative_error

PROTOCOL_VERSION = 2  # 2: reports are typed bodies; numbers are bounded
RELAY_TOPIC = b"ev"
MAX_MESSAGE_BYTES = 16 << 20  # ZMQ_MAXMSGSIZE: a peer that sends more is disconnected
BLOB_CHUNK = 4 << 20  # bytes of a file per PutBlob or Blob message
MAX_DEPTH = 32  # nesting of maps and arrays in one frame, checked before it is decoded

# Bounded numbers for the wire (the projections keep these in 32-bit INTEGER columns).
Int32 = Annotated[int, Meta(ge=-(2**31), le=2**31 - 1)]
Count = Annotated[int, Meta(ge=0, le=1_000_000)]
Seconds = Annotated[float, Meta(ge=0, le=MAX_FLOAT)]  # finite, not negative
Amount = Annotated[float, Meta(ge=0, le=1e9)]  # cores, GB


class Command(msgspec.Struct, frozen=True, kw_only=True, tag_field="cmd", forbid_unknown_fields=True):
    req: int = 0


class Hello(Command, frozen=True, tag="hello"):
    client: str = ""


class Submit(Command, frozen=True, tag="submit"):
    spec: JobSpec


class SubmitSweep(Command, frozen=True, tag="submit_sweep"):
    """A sweep and all its jobs, appended together: SweepSubmitted, then one JobSubmitted each."""

    name: Annotated[str, Meta(max_length=200)]
    spec: dict[str, Any] = {}  # the sweep as the user wrote it, for the record
    jobs: Annotated[list[JobSpec], Meta(max_length=100_000)] = []
    into: str = ""  # a sweep the jobs join (`evo sweep --resume`) instead of a new one


class Cancel(Command, frozen=True, tag="cancel"):
    target: str  # a job id or a sweep id
    reason: Annotated[str, Meta(max_length=2000)] = ""


class Retry(Command, frozen=True, tag="retry"):
    """Run finished jobs again, as new jobs with the same spec (params, seed, ...) linked to the
    old ones (``retry_of``): one job, or a sweep's failed and cancelled jobs."""

    target: str  # a job id or a sweep id


class Drain(Command, frozen=True, tag="drain"):
    """A node finishes what it runs and takes nothing new (``resume``: takes work again)."""

    node: str
    resume: bool = False


class Hold(Command, frozen=True, tag="hold"):
    """Queued jobs kept from starting (a job, or a sweep's queued jobs); ``release``: let go."""

    target: str
    release: bool = False


class Read(Command, frozen=True, tag="read"):
    from_seq: Int64 = 1
    limit: Annotated[int, Meta(ge=0, le=2**31)] = 10_000


class Status(Command, frozen=True, tag="status"):
    # > 0: also say whether a queued job could start now on a new node whose allocation is
    # this long (`StatusReply.startable`): what a Slurm pilots' keeper asks before submitting
    within_s: Annotated[float, Meta(ge=0, le=10 * 365 * 86400)] = 0.0
    # > 0: also the first this many queued jobs in the order they will be leased, each with
    # `evo why`'s reason (`StatusReply.order`: the web page's queue)
    order: Annotated[int, Meta(ge=0, le=1000)] = 0


class Why(Command, frozen=True, tag="why"):
    job_id: str


class Estimate(Command, frozen=True, tag="estimate"):
    """How long each of these jobs is expected to take on each node present (`evo sweep
    --plan`): the broker's estimates (broker/estimates.py), nothing submitted."""

    specs: Annotated[list[JobSpec], Meta(max_length=100_000)]


# Node commands (the node daemon speaks these; see nodes/daemon.py).


class Join(Command, frozen=True, tag="join"):
    node: Annotated[str, Meta(min_length=1, max_length=200)]
    hostname: str = ""
    cpus: Amount = 0.0
    mem_gb: Amount = 0.0
    gpus: Annotated[list[GpuInfo], Meta(max_length=256)] = []
    labels: Annotated[list[str], Meta(max_length=256)] = []
    slots: Annotated[int, Meta(ge=1, le=100_000)] = 1
    capabilities: Annotated[list[str], Meta(max_length=256)] = []
    running: list[tuple[str, Int64]] = []  # (job id, lease epoch) still running after a reconnect
    # leases expire after 3 heartbeats missed
    heartbeat_s: Annotated[float, Meta(ge=0.01, le=3600)] = 2.0
    # Seconds left until the node's allocation ends (a Slurm pilot), 0: it has no end. Relative,
    # so the node's and the broker's clocks need not agree; the broker records when, on its own.
    ends_in_s: Annotated[float, Meta(ge=0, le=10 * 365 * 86400)] = 0.0


class Ready(Command, frozen=True, tag="ready"):
    """A node asks for work and waits up to ``wait_s`` (long poll) for leases.

    The broker counts the node's free resources from the jobs it leased to it; ``max_leases``
    caps how many it grants at once (0: as many as fit). With ``ahead`` > 0 the broker may also
    lease ahead: CPU jobs that fit the node when empty, queued on the node and started there as
    its slots free, so short trials do not wait a round trip to the broker between them.
    """

    node: str
    max_leases: Count = 0
    wait_s: Annotated[float, Meta(ge=0, le=3600)] = 0.0
    ahead: Count = 0  # the node queues up to this many leases beyond its free resources


class Heartbeat(Command, frozen=True, tag="heartbeat"):
    node: str
    running: list[tuple[str, Int64]] = []
    util: dict[str, Finite] = {}  # cpu and mem, percent
    gpus: Annotated[list[GpuSample], Meta(max_length=256)] = []


# --- reports: what happened to a leased job, one typed body per kind ---------------------------


class ReportBody(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind"):
    """Unknown fields are ignored: a job's own records (evo.report) carry a time, for one."""


class StartedReport(ReportBody, frozen=True, tag="started"):
    pid: Annotated[int, Meta(ge=0, le=2**31 - 1)] = 0
    env: dict[str, Any] = {}  # python, package versions, git commit, ...


class ProgressReport(ReportBody, frozen=True, tag="progress"):
    step: Int64 | None = None
    epoch: Int64 | None = None
    metrics: dict[str, Finite] = {}
    eta_s: Seconds | None = None


class CheckpointReport(ReportBody, frozen=True, tag="checkpoint"):
    path: Annotated[str, Meta(min_length=1, max_length=4096)]
    step: Int64 | None = None
    metrics: dict[str, Finite] = {}
    digest: Annotated[str, Meta(pattern="^([0-9a-f]{64})?$")] = ""  # its manifest, once stored
    size: Annotated[int, Meta(ge=0, le=2**62)] = 0


class CompletedReport(ReportBody, frozen=True, tag="completed"):
    metrics: dict[str, Finite] = {}
    artifacts: dict[str, str] = {}
    duration_s: Seconds = 0.0
    outputs: Annotated[dict[str, Annotated[str, Meta(pattern="^[0-9a-f]{64}$")]],
                       Meta(max_length=10_000)] = {}


class FailedReport(ReportBody, frozen=True, tag="failed"):
    error: str = ""
    exit_code: Int32 | None = None
    retryable: bool = True


class CancelledReport(ReportBody, frozen=True, tag="cancelled"):
    reason: str = ""


class RefusedReport(ReportBody, frozen=True, tag="refused"):
    """What a job wrote that the node could not turn into a report: recorded as ReportRejected."""

    report: Annotated[str, Meta(max_length=40)] = ""  # the kind the job meant it to be
    reason: Annotated[str, Meta(max_length=2000)] = ""


AnyReport = Union[StartedReport, ProgressReport, CheckpointReport, CompletedReport, FailedReport,
                  CancelledReport, RefusedReport]
FINAL_REPORTS = (CompletedReport, FailedReport, CancelledReport)


def report_kind(body: ReportBody) -> str:
    return body.__struct_config__.tag  # type: ignore[return-value]


def report_error(body: ReportBody) -> str | None:
    """Names in a report that could not stay inside their folder (see evo.names)."""
    if isinstance(body, CheckpointReport):
        return relative_error(body.path, "$.path")
    if isinstance(body, CompletedReport):
        for name in body.artifacts:
            if bad := relative_error(name, "$.artifacts key"):
                return bad
    return None


class Report(Command, frozen=True, tag="report"):
    """What happened to a leased job: started, progress, checkpoint, completed, failed, cancelled."""

    node: str
    job_id: str
    lease_epoch: Int64
    report: AnyReport


class Leave(Command, frozen=True, tag="leave"):
    node: str


class Output(Command, frozen=True, tag="output"):
    """A chunk of a job's stdout or stderr, appended at ``offset`` to the broker's copy.

    Output is stored beside the event log, never in it. A chunk whose offset is not the size
    of the broker's copy is not written; the reply's ``data["size"]`` says where to resume.
    """

    node: str
    job_id: str
    attempt: Annotated[int, Meta(ge=1, le=1_000_000)]
    stream: Literal["stdout", "stderr"]
    offset: Annotated[int, Meta(ge=0, le=2**62)]
    data: Annotated[bytes, Meta(max_length=4 << 20)]


class Logs(Command, frozen=True, tag="logs"):
    """Read a job's shipped output: ``attempt`` 0 means the latest."""

    job_id: str
    attempt: Annotated[int, Meta(ge=0, le=1_000_000)] = 0
    stream: Literal["stdout", "stderr"] = "stdout"
    offset: Annotated[int, Meta(ge=0, le=2**62)] = 0
    limit: Annotated[int, Meta(ge=0, le=1 << 30)] = 1 << 20


class Query(Command, frozen=True, tag="query"):
    """Sent to the projection's own endpoint (Welcome.query_endpoint), never to the broker's.

    ``kind``: "sql" (one read-only statement; ``as_of`` > 0 answers from the state at that seq)
    or "digest" (the live projection's digest).
    """

    sql: Annotated[str, Meta(max_length=1 << 20)] = ""
    # values for the statement's ? placeholders, in order: no quoting of values in SQL text
    params: Annotated[list[str | int | float | bool | None], Meta(max_length=10_000)] = []
    as_of: Annotated[int, Meta(ge=0, le=2**63 - 1)] = 0
    kind: Literal["sql", "digest"] = "sql"


Digest = Annotated[str, Meta(pattern="^[0-9a-f]{64}$")]  # sha256, lowercase hex


class Have(Command, frozen=True, tag="have"):
    """Which of these blobs the broker's content store lacks: ``Ok.data["missing"]``."""

    digests: Annotated[list[Digest], Meta(max_length=200_000)]


class PutBlob(Command, frozen=True, tag="put_blob"):
    """A chunk of a file for the content store, appended at ``offset`` (as for Output); the
    reply's ``data["size"]`` is how much the store has. The last chunk is checked against
    ``digest`` before the blob is kept."""

    digest: Digest
    size: Annotated[int, Meta(ge=0, le=2**50)]
    offset: Annotated[int, Meta(ge=0, le=2**50)]
    data: Annotated[bytes, Meta(max_length=BLOB_CHUNK)]


class GetBlob(Command, frozen=True, tag="get_blob"):
    """Read a stored blob: answered with ``Blob``."""

    digest: Digest
    offset: Annotated[int, Meta(ge=0, le=2**50)] = 0
    limit: Annotated[int, Meta(ge=0, le=BLOB_CHUNK)] = BLOB_CHUNK


AnyCommand = Union[Hello, Submit, SubmitSweep, Cancel, Read, Status, Why, Join, Ready, Heartbeat, Report, Leave,
                   Output, Logs, Query, Retry, Drain, Hold, Have, PutBlob, GetBlob, Estimate]


class Reply(msgspec.Struct, frozen=True, kw_only=True, tag_field="reply"):
    req: int = 0


class Error(Reply, frozen=True, tag="error"):
    code: str  # "invalid", "unknown", "protocol", "conflict", "internal"
    message: str


class Welcome(Reply, frozen=True, tag="welcome"):
    events_endpoint: str
    last_seq: int
    version: int = PROTOCOL_VERSION
    query_endpoint: str = ""  # the projection follower's endpoint ("" when it is off)


class Submitted(Reply, frozen=True, tag="submitted"):
    job_id: str
    seq: int
    duplicate: bool = False
    warning: str = ""


class SweepAccepted(Reply, frozen=True, tag="sweep_accepted"):
    sweep_id: str
    job_ids: list[str]
    seq: int
    warning: str = ""


class Changed(Reply, frozen=True, tag="changed"):
    """What a Drain or Hold changed (ids of nodes or jobs; empty: it was so already)."""

    ids: list[str]
    seq: int = 0


class Retried(Reply, frozen=True, tag="retried"):
    job_ids: list[str]  # the new jobs, in the order of
    of: list[str]  # the jobs they run again
    seq: int = 0


class Cancelled(Reply, frozen=True, tag="cancelled"):
    job_ids: list[str]
    seq: int = 0


class Events(Reply, frozen=True, tag="events"):
    events: msgspec.Raw  # a msgpack array of encoded events (see events.codec.pack_batch)
    head: int  # the broker's last committed seq


class StatusReply(Reply, frozen=True, tag="status"):
    last_seq: int
    jobs: dict[str, int]  # state -> count
    nodes: list[dict[str, Any]] = []
    running: list[dict[str, Any]] = []
    queued: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []  # the newest jobs that failed for good
    asking: int = 0  # open sweeps that ask for a trial whenever a slot is free (method tpe)
    startable: bool = False  # with Status.within_s: a queued job is runnable and fits that time
    order: list[dict[str, Any]] = []  # with Status.order: the queue as the scheduler takes it


class Explanation(Reply, frozen=True, tag="why"):
    text: str


class Estimates(Reply, frozen=True, tag="estimates"):
    """Per job (in the order asked), per node present: [seconds, basis], or None (unknown)."""

    nodes: list[dict[str, Any]]  # name, slots, labels
    jobs: list[dict[str, list | None]]


class Ok(Reply, frozen=True, tag="ok"):
    seq: int = 0
    data: dict[str, Any] = {}


class LeaseGrant(msgspec.Struct, frozen=True, kw_only=True):
    job_id: str
    lease_epoch: int
    attempt: int
    spec: JobSpec
    devices: list[int] = []
    resume: str = ""  # the job's latest stored checkpoint (its manifest), to restore first
    resume_step: int | None = None


class Leases(Reply, frozen=True, tag="leases"):
    leases: list[LeaseGrant] = []
    cancel: list[str] = []  # job ids this node should stop
    seq: int = 0


class LogChunk(Reply, frozen=True, tag="log_chunk"):
    job_id: str
    attempt: int
    stream: str
    offset: int
    data: bytes
    size: int  # of the stored output so far
    attempts: list[int] = []
    state: str = ""  # the job's state: a follower stops once it is final and all is read


class QueryResult(Reply, frozen=True, tag="query_result"):
    arrow: bytes = b""  # an Arrow IPC stream
    seq: int = 0  # the last event the answer includes
    digest: str = ""
    tables: dict[str, str] = {}
    behind: str = ""  # why the answer may miss recent events (the projection cannot apply them)


class Blob(Reply, frozen=True, tag="blob"):
    digest: str
    offset: int
    data: bytes
    size: int  # of the whole blob


AnyReply = Union[Error, Welcome, Submitted, SweepAccepted, Cancelled, Events, StatusReply, Explanation, Ok, Leases,
                 LogChunk, QueryResult, Retried, Changed, Blob, Estimates]

command_encoder = msgspec.msgpack.Encoder()
command_decoder = msgspec.msgpack.Decoder(AnyCommand)
reply_encoder = msgspec.msgpack.Encoder()
reply_decoder = msgspec.msgpack.Decoder(AnyReply)


class _ReqOnly(msgspec.Struct):
    req: int = 0


class BadFrame(ValueError):
    """Raised for a frame that is not a command: the message says why, for the Error reply."""


# A byte that may open a map or an array (fixmap, fixarray, array 16/32, map 16/32). A frame has
# at least as many of them as it has containers, so a frame with few is shallow enough without
# a closer look.
_CONTAINERS = bytes([*range(0x80, 0xA0), 0xDC, 0xDD, 0xDE, 0xDF])
# msgpack type byte -> (bytes that follow before the next item, bytes of a length that follows)
_SKIP: dict[int, tuple[int, int]] = {
    0xC0: (0, 0), 0xC2: (0, 0), 0xC3: (0, 0),
    0xC4: (0, 1), 0xC5: (0, 2), 0xC6: (0, 4),  # bin
    0xC7: (1, 1), 0xC8: (1, 2), 0xC9: (1, 4),  # ext: a type byte, then the data
    0xCA: (4, 0), 0xCB: (8, 0), 0xCC: (1, 0), 0xCD: (2, 0), 0xCE: (4, 0), 0xCF: (8, 0),
    0xD0: (1, 0), 0xD1: (2, 0), 0xD2: (4, 0), 0xD3: (8, 0),
    0xD4: (2, 0), 0xD5: (3, 0), 0xD6: (5, 0), 0xD7: (9, 0), 0xD8: (17, 0),  # fixext
    0xD9: (0, 1), 0xDA: (0, 2), 0xDB: (0, 4),  # str
}


def check_depth(frame: bytes, limit: int = MAX_DEPTH) -> None:
    """Raise BadFrame if maps and arrays nest deeper than ``limit`` in ``frame`` (msgpack).

    Decoders recurse per level, so this runs before any decoding. Most small frames hold
    fewer container bytes than the limit and pass at once; the others are walked item by item
    (a large frame at once: counting its bytes costs more than walking a few items past a
    file chunk's bytes)."""
    if len(frame) <= 1 << 16 and len(frame) - len(frame.translate(None, _CONTAINERS)) <= limit:
        return
    stack: list[int] = []
    i, n, left = 0, len(frame), 1
    while True:
        if left == 0:
            if not stack:
                return
            left = stack.pop()
            continue
        if i >= n:
            raise BadFrame("a truncated msgpack frame")
        b = frame[i]
        i += 1
        left -= 1
        if b <= 0x7F or b >= 0xE0:
            continue
        count = -1
        if b <= 0x8F:
            count = 2 * (b & 0x0F)
        elif b <= 0x9F:
            count = b & 0x0F
        elif b <= 0xBF:
            i += b & 0x1F
        elif b in (0xDC, 0xDE):
            count = int.from_bytes(frame[i:i + 2], "big") * (2 if b == 0xDE else 1)
            i += 2
        elif b in (0xDD, 0xDF):
            count = int.from_bytes(frame[i:i + 4], "big") * (2 if b == 0xDF else 1)
            i += 4
        else:
            skip = _SKIP.get(b)
            if skip is None:
                raise BadFrame(f"byte 0x{b:02x} at offset {i - 1} is not msgpack")
            fixed, size = skip
            if size:
                i += size + int.from_bytes(frame[i:i + size], "big")
            i += fixed
        if count > 0:
            stack.append(left)
            left = count
            if len(stack) > limit:
                raise BadFrame(f"maps and arrays nest deeper than {limit} levels")


def decode_command(frame: bytes) -> Command:
    """A command from one frame, or BadFrame saying why not (never any other exception)."""
    check_depth(frame)
    try:
        return command_decoder.decode(frame)
    except msgspec.ValidationError as exc:
        raise BadFrame(friendly(str(exc))) from None
    except (msgspec.DecodeError, UnicodeDecodeError, ValueError, RecursionError,
            OverflowError, TypeError) as exc:
        raise BadFrame(f"undecodable: {exc}") from None


_req_decoder = msgspec.msgpack.Decoder(_ReqOnly)


def salvage_req(frame: bytes) -> int:
    """Best effort: the request number of a command that failed to decode, else 0."""
    try:
        req = _req_decoder.decode(frame).req
        return req if isinstance(req, int) else 0
    except Exception:  # noqa: BLE001 - garbage in, no request number out
        return 0
