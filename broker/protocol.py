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

from typing import Any, Union

import msgspec

from evo.events.schema import GpuInfo, GpuSample, JobSpec

PROTOCOL_VERSION = 1
RELAY_TOPIC = b"ev"
MAX_MESSAGE_BYTES = 16 << 20  # ZMQ_MAXMSGSIZE: a peer that sends more is disconnected


class Command(msgspec.Struct, frozen=True, kw_only=True, tag_field="cmd", forbid_unknown_fields=True):
    req: int = 0


class Hello(Command, tag="hello"):
    client: str = ""


class Submit(Command, tag="submit"):
    spec: JobSpec


class SubmitSweep(Command, tag="submit_sweep"):
    """A sweep and all its jobs, appended together: SweepSubmitted, then one JobSubmitted each."""

    name: str
    spec: dict[str, Any] = {}  # the sweep as the user wrote it, for the record
    jobs: list[JobSpec] = []


class Cancel(Command, tag="cancel"):
    target: str  # a job id or a sweep id
    reason: str = ""


class Read(Command, tag="read"):
    from_seq: int = 1
    limit: int = 10_000


class Status(Command, tag="status"):
    pass


class Why(Command, tag="why"):
    job_id: str


# Node commands (the node daemon speaks these; see nodes/daemon.py).


class Join(Command, tag="join"):
    node: str
    hostname: str = ""
    cpus: float = 0.0
    mem_gb: float = 0.0
    gpus: list[GpuInfo] = []
    labels: list[str] = []
    slots: int = 1
    capabilities: list[str] = []
    running: list[tuple[str, int]] = []  # (job id, lease epoch) still running after a reconnect
    heartbeat_s: float = 2.0  # leases expire after 3 heartbeats missed


class Ready(Command, tag="ready"):
    """A node asks for work and waits up to ``wait_s`` (long poll) for leases.

    The broker counts the node's free resources from the jobs it leased to it; ``max_leases``
    caps how many it grants at once (0: as many as fit). With ``ahead`` > 0 the broker may also
    lease ahead: CPU jobs that fit the node when empty, queued on the node and started there as
    its slots free, so short trials do not wait a round trip to the broker between them.
    """

    node: str
    max_leases: int = 0
    wait_s: float = 0.0
    ahead: int = 0  # the node queues up to this many leases beyond its free resources


class Heartbeat(Command, tag="heartbeat"):
    node: str
    running: list[tuple[str, int]] = []
    util: dict[str, Any] = {}
    gpus: list[GpuSample] = []


class Report(Command, tag="report"):
    """What happened to a leased job: started, progress, checkpoint, completed, failed, cancelled."""

    node: str
    job_id: str
    lease_epoch: int
    kind: str
    data: dict[str, Any] = {}


class Leave(Command, tag="leave"):
    node: str


class Output(Command, tag="output"):
    """A chunk of a job's stdout or stderr, appended at ``offset`` to the broker's copy.

    Output is stored beside the event log, never in it. A chunk whose offset is not the size
    of the broker's copy is not written; the reply's ``data["size"]`` says where to resume.
    """

    node: str
    job_id: str
    attempt: int
    stream: str  # "stdout" or "stderr"
    offset: int
    data: bytes


class Logs(Command, tag="logs"):
    """Read a job's shipped output: ``attempt`` 0 means the latest."""

    job_id: str
    attempt: int = 0
    stream: str = "stdout"
    offset: int = 0
    limit: int = 1 << 20


class Query(Command, tag="query"):
    """Sent to the projection's own endpoint (Welcome.query_endpoint), never to the broker's.

    ``kind``: "sql" (one read-only statement; ``as_of`` > 0 answers from the state at that seq)
    or "digest" (the live projection's digest).
    """

    sql: str = ""
    as_of: int = 0
    kind: str = "sql"


AnyCommand = Union[Hello, Submit, SubmitSweep, Cancel, Read, Status, Why, Join, Ready, Heartbeat, Report, Leave,
                   Output, Logs, Query]


class Reply(msgspec.Struct, frozen=True, kw_only=True, tag_field="reply"):
    req: int = 0


class Error(Reply, tag="error"):
    code: str  # "invalid", "unknown", "protocol", "conflict", "internal"
    message: str


class Welcome(Reply, tag="welcome"):
    events_endpoint: str
    last_seq: int
    version: int = PROTOCOL_VERSION
    query_endpoint: str = ""  # the projection follower's endpoint ("" when it is off)


class Submitted(Reply, tag="submitted"):
    job_id: str
    seq: int
    duplicate: bool = False
    warning: str = ""


class SweepAccepted(Reply, tag="sweep_accepted"):
    sweep_id: str
    job_ids: list[str]
    seq: int
    warning: str = ""


class Cancelled(Reply, tag="cancelled"):
    job_ids: list[str]
    seq: int = 0


class Events(Reply, tag="events"):
    events: msgspec.Raw  # a msgpack array of encoded events (see events.codec.pack_batch)
    head: int  # the broker's last committed seq


class StatusReply(Reply, tag="status"):
    last_seq: int
    jobs: dict[str, int]  # state -> count
    nodes: list[dict[str, Any]] = []
    running: list[dict[str, Any]] = []
    queued: list[dict[str, Any]] = []


class Explanation(Reply, tag="why"):
    text: str


class Ok(Reply, tag="ok"):
    seq: int = 0
    data: dict[str, Any] = {}


class LeaseGrant(msgspec.Struct, frozen=True, kw_only=True):
    job_id: str
    lease_epoch: int
    attempt: int
    spec: JobSpec
    devices: list[int] = []


class Leases(Reply, tag="leases"):
    leases: list[LeaseGrant] = []
    cancel: list[str] = []  # job ids this node should stop
    seq: int = 0


class LogChunk(Reply, tag="log_chunk"):
    job_id: str
    attempt: int
    stream: str
    offset: int
    data: bytes
    size: int  # of the stored output so far
    attempts: list[int] = []
    state: str = ""  # the job's state: a follower stops once it is final and all is read


class QueryResult(Reply, tag="query_result"):
    arrow: bytes = b""  # an Arrow IPC stream
    seq: int = 0  # the last event the answer includes
    digest: str = ""
    tables: dict[str, str] = {}


AnyReply = Union[Error, Welcome, Submitted, SweepAccepted, Cancelled, Events, StatusReply, Explanation, Ok, Leases,
                 LogChunk, QueryResult]

command_encoder = msgspec.msgpack.Encoder()
command_decoder = msgspec.msgpack.Decoder(AnyCommand)
reply_encoder = msgspec.msgpack.Encoder()
reply_decoder = msgspec.msgpack.Decoder(AnyReply)


class _ReqOnly(msgspec.Struct):
    req: int = 0


_req_decoder = msgspec.msgpack.Decoder(_ReqOnly)


def salvage_req(frame: bytes) -> int:
    """Best effort: the request number of a command that failed to decode, else 0."""
    try:
        req = _req_decoder.decode(frame).req
        return req if isinstance(req, int) else 0
    except Exception:  # noqa: BLE001 - garbage in, no request number out
        return 0
