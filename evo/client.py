"""evo.Client: everything the CLI does, from a notebook or a script.

    import evo
    with evo.Client() as c:                       # finds the broker like the CLI does
        job = c.submit(["python", "train.py"], model_type="GLM", cpus=2)
        for ev in c.follow(from_seq=1):           # every event once, in order, then live
            print(ev)

Requests are numbered; many can be in flight on the one DEALER socket (``submit_many``), and a
reply that arrives after its request timed out is recognised by its number and dropped.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal

import msgspec
import zmq

from evo.broker import protocol as p
from evo.errors import EvoError
from evo.events.codec import decode_batch
from evo.events.schema import AnyEvent, Event, JobSpec, Resources
from evo.home import find_broker


class BrokerUnavailable(EvoError):
    """Raised when the broker does not answer within the timeout."""


class CommandRejected(EvoError):
    """Raised when the broker answers a command with an Error reply."""

    def __init__(self, error: p.Error) -> None:
        self.code, self.error = error.code, error
        self.exit_code = 2 if error.code in ("invalid", "conflict", "protocol",
                                             "unauthorized") else 1
        super().__init__(error.message)


def make_spec(
    command: Sequence[str] | None = None,
    *,
    callable: str | None = None,  # noqa: A002 - the field's name in JobSpec
    cpus: float = 1.0,
    mem_gb: float = 0.0,
    gpus: int = 0,
    vram_gb: float = 0.0,
    **fields: Any,
) -> JobSpec:
    """A JobSpec from keyword arguments; unknown names raise TypeError naming them. The job
    runs in ``workdir``, by default the current directory (where it is submitted from)."""
    unknown = set(fields) - set(JobSpec.__struct_fields__)
    if unknown:
        raise TypeError(f"unknown job spec field(s): {', '.join(sorted(unknown))}")
    res = Resources(cpus=cpus, mem_gb=mem_gb, gpus=gpus, vram_gb=vram_gb)
    fields["workdir"] = os.path.abspath(fields.get("workdir") or os.getcwd())
    return JobSpec(command=list(command) if command is not None else None, callable=callable,
                   resources=res, **fields)


def input_files(paths: Iterable[str | os.PathLike[str]]) -> dict[str, str]:
    """``JobSpec.data`` for files a job reads (``--input``): absolute path -> sha256. A path
    that is not a file is BadInput, said before anything is sent."""
    from evo.content import hash_file
    from evo.errors import BadInput

    out = {}
    for given in paths:
        path = os.path.abspath(os.path.expanduser(os.fspath(given)))
        if not os.path.isfile(path):
            raise BadInput(f"--input {os.fspath(given)!r}: no such file")
        out[path] = hash_file(path)[0]
    return out


def _needs_tree(spec: JobSpec) -> bool:
    """A job whose code is the user's (a command, a callable of theirs) takes its folder's
    files with it; a built-in trainer's code is evo's own, and its data is an input."""
    return bool(spec.workdir) and not spec.tree and spec.trainer is None


def _reachable(endpoint: str, address: str) -> str:
    """``endpoint`` as this client can reach it: a broker bound to every interface
    (0.0.0.0) names its other sockets so; they are on the host its address names."""
    head, _, port = endpoint.rpartition(":")
    if head in ("tcp://0.0.0.0", "tcp://*", "tcp://[::]"):
        return f"{address.rpartition(':')[0]}:{port}"
    return endpoint


class Client:
    def __init__(self, broker: str | None = None, *, home: Any = None,
                 timeout_s: float = 10.0, key: str | os.PathLike[str] | None = None) -> None:
        """``key``: a key file (`evo keys issue`); default EVO_KEY, else this machine's own
        key when EVO_HOME has keys, else none (a loopback broker without keys)."""
        from evo.home import evo_home
        from evo.keys import find_key

        self.home = evo_home(home)
        self.key = find_key(key, self.home)  # a bad key file is said first
        self.address = find_broker(broker, home)
        self.timeout_s = timeout_s
        self.ctx = zmq.Context()
        self._monitors: dict[zmq.Socket, zmq.Socket] = {}
        self.sock = self._socket(zmq.DEALER, self.address)
        self._req = 0
        self._early: dict[int, p.Reply] = {}
        self._events_endpoint: str | None = None
        self._hashes: Any = None  # evo.content.HashCache, made when files are first sent

    # --- plumbing -----------------------------------------------------------------------------

    def _socket(self, kind: int, endpoint: str, opts: dict | None = None) -> zmq.Socket:
        """A socket to the broker at ``endpoint``, with this client's key when it has one."""
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        for opt, value in (opts or {}).items():
            sock.setsockopt(opt, value)
        if self.key is not None:
            sock.curve_serverkey = self.key.broker_public
            sock.curve_publickey = self.key.public
            sock.curve_secretkey = self.key.secret
            if kind == zmq.DEALER:  # a refused handshake is told here, not by an answer
                self._monitors[sock] = sock.get_monitor_socket(
                    zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        sock.connect(_reachable(endpoint, self.address))
        return sock

    def _wait(self, sock: zmq.Socket, timeout_ms: int) -> bool:
        """Whether ``sock`` has an answer within ``timeout_ms``; CommandRejected (exit 2) at
        once if the broker refuses this client's key in the handshake."""
        monitor = self._monitors.get(sock)
        if monitor is None:
            return bool(sock.poll(timeout_ms))
        from zmq.utils.monitor import parse_monitor_message

        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        deadline = time.monotonic() + timeout_ms / 1000
        blind = 0
        while True:
            ready = dict(poller.poll(max(0, int((deadline - time.monotonic()) * 1000))))
            if sock in ready or monitor not in ready:
                return sock in ready
            event = parse_monitor_message(monitor.recv_multipart())["event"]
            assert self.key is not None
            if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:  # the broker said no to this key
                why = "it does not know it, or it was revoked (`evo keys list` there)"
            else:  # the broker could not read our hello: sealed for another broker's key (a
                # broker going away mid-handshake drops one, not one after another)
                blind += 1
                if blind < 5:
                    continue
                why = ("the key file was issued by another broker, or this broker's keys were "
                       "made anew (`evo keys issue` there gives a new one)")
            raise CommandRejected(p.Error(code="unauthorized", message=(
                f"the broker at {self.address} refuses key {self.key.name!r}: {why}")))

    def _no_answer(self, where: str, timeout_s: float) -> BrokerUnavailable:
        return BrokerUnavailable(f"no answer from {where} within {timeout_s:g}s")

    def _next_req(self) -> int:
        self._req += 1
        return self._req

    def send(self, cmd: p.Command) -> int:
        """Send without waiting; returns the request number to ``receive``.

        A command over the broker's frame limit is refused here: sent, it would only make the
        broker drop the connection."""
        req = self._next_req()
        frame = p.command_encoder.encode(msgspec.structs.replace(cmd, req=req))
        if len(frame) > p.MAX_MESSAGE_BYTES:
            raise EvoError(f"{type(cmd).__name__} of {len(frame):,} bytes is over the broker's "
                           f"limit of {p.MAX_MESSAGE_BYTES:,} for one message")
        self.sock.send(frame)
        return req

    def receive(self, req: int, timeout_s: float | None = None) -> p.Reply:
        if req in self._early:
            return self._check(self._early.pop(req))
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self._wait(self.sock, int(left * 1000) + 1):
                raise self._no_answer(f"the broker at {self.address}", self.timeout_s)
            reply = p.reply_decoder.decode(self.sock.recv())
            if reply.req == req:
                return self._check(reply)
            if reply.req > req:  # an answer to a request still to be received
                self._early[reply.req] = reply

    def replies(self) -> list[p.Reply]:
        """Every reply that has arrived, without waiting and without raising on errors."""
        out = [self._early.pop(r) for r in sorted(self._early)]
        recv, decode = self.sock.recv, p.reply_decoder.decode
        while True:
            try:
                out.append(decode(recv(zmq.NOBLOCK)))
            except zmq.Again:
                return out

    @staticmethod
    def _check(reply: p.Reply) -> p.Reply:
        if isinstance(reply, p.Error):
            raise CommandRejected(reply)
        return reply

    def request(self, cmd: p.Command, timeout_s: float | None = None) -> p.Reply:
        return self.receive(self.send(cmd), timeout_s)

    # --- operations ---------------------------------------------------------------------------

    # --- files ----------------------------------------------------------------------------

    def with_files(self, specs: list[JobSpec]) -> list[JobSpec]:
        """``specs`` with their code recorded (``JobSpec.code``, evo.content.code_record) and
        their files in the broker's store: the manifest of each folder's code
        (``JobSpec.tree``) and every input of ``JobSpec.data``, sent once per content (what
        the store has is not sent again). The record is taken now: a later edit shows up in
        `evo audit`."""
        from evo.content import HashCache, build_tree, code_record, digest_bytes, encode_manifest

        if self._hashes is None:
            self._hashes = HashCache()
        trees: dict[str, tuple[str, dict[str, str]]] = {}  # workdir -> (tree, code record)
        records: dict[str, dict[str, str]] = {}  # workdir -> its record without a tree
        blobs: dict[str, bytes | str] = {}
        out = []
        for spec in specs:
            if _needs_tree(spec):
                assert spec.workdir is not None
                if spec.workdir not in trees:
                    manifest, where = build_tree(spec.workdir, self._hashes,
                                                 exclude=(self.home,))
                    raw = encode_manifest(manifest)
                    tree = digest_bytes(raw)
                    trees[spec.workdir] = tree, code_record(spec.workdir, manifest, tree)
                    blobs[tree] = raw
                    for digest, file in where.items():
                        blobs.setdefault(digest, str(file))
                tree, code = trees[spec.workdir]
                spec = msgspec.structs.replace(spec, tree=tree, code=spec.code or code)
            elif spec.workdir and not spec.code:  # a trainer's code is evo's: the commit only
                if spec.workdir not in records:
                    records[spec.workdir] = code_record(spec.workdir)
                spec = msgspec.structs.replace(spec, code=records[spec.workdir])
            for path, digest in spec.data.items():
                if os.path.isabs(path):
                    blobs.setdefault(digest, path)
            out.append(spec)
        if blobs:
            self.send_files(blobs)
        return out

    def send_files(self, blobs: dict[str, bytes | str]) -> int:
        """Put every blob (digest -> its bytes, or a file's path) the broker's store lacks;
        returns how many bytes were sent. A file that changed since it was hashed is refused
        by the broker (BadInput naming it)."""
        from evo.errors import BadInput

        digests = list(blobs)
        missing: list[str] = []
        for i in range(0, len(digests), 100_000):
            reply = self.request(p.Have(digests=digests[i:i + 100_000]))
            assert isinstance(reply, p.Ok)
            missing += reply.data["missing"]
        sent = 0
        for digest in missing:
            source = blobs[digest]
            try:
                sent += self._put(digest, source)
            except CommandRejected as exc:
                if exc.code == "invalid" and isinstance(source, str):
                    raise BadInput(f"{source}: {exc}") from None
                raise
            except OSError as exc:
                raise BadInput(f"{source!r}: {exc.strerror or exc}") from None
        return sent

    def _put(self, digest: str, source: bytes | str, window: int = 8) -> int:
        CHUNK = p.BLOB_CHUNK
        if isinstance(source, bytes):
            size, f = len(source), None
        else:
            f = open(source, "rb")  # noqa: SIM115 - closed below
            size = os.fstat(f.fileno()).st_size
        try:
            inflight: list[int] = []
            offset = 0
            while True:
                data = f.read(CHUNK) if f is not None else source[offset:offset + CHUNK]  # type: ignore[assignment]
                assert isinstance(data, bytes)
                inflight.append(self.send(p.PutBlob(digest=digest, size=size, offset=offset,
                                                    data=data)))
                offset += len(data)
                if len(inflight) >= window:
                    self.receive(inflight.pop(0))
                if offset >= size or not data:
                    break
            for req in inflight:
                reply = self.receive(req)
            assert isinstance(reply, p.Ok)
            if int(reply.data.get("size", -1)) != size:
                raise EvoError(f"the broker's store took {reply.data.get('size')} of the "
                               f"{size:,} bytes of {digest[:12]}")
            return size
        finally:
            if f is not None:
                f.close()

    def fetch(self, digest: str, dest: str | os.PathLike[str], window: int = 4) -> int:
        """Write the stored blob ``digest`` to ``dest`` (made anew), checked against its
        digest; returns its size. EvoError when the bytes do not match."""
        import hashlib

        h = hashlib.sha256()
        with open(dest, "wb") as f:
            first = self.request(p.GetBlob(digest=digest, offset=0))
            assert isinstance(first, p.Blob)
            size, offset = first.size, len(first.data)
            f.write(first.data)
            h.update(first.data)
            inflight: list[int] = []
            nxt = offset
            while offset < size:
                while len(inflight) < window and nxt < size:
                    inflight.append(self.send(p.GetBlob(digest=digest, offset=nxt)))
                    nxt += p.BLOB_CHUNK
                reply = self.receive(inflight.pop(0))
                assert isinstance(reply, p.Blob)
                if reply.offset != offset or not reply.data:
                    raise EvoError(f"blob {digest[:12]}: got offset {reply.offset}, wanted {offset}")
                f.write(reply.data)
                h.update(reply.data)
                offset += len(reply.data)
            f.flush()
            os.fsync(f.fileno())
        if h.hexdigest() != digest:
            raise EvoError(f"blob {digest[:12]} arrived as {h.hexdigest()[:12]}")
        return size

    def fetch_tree(self, manifest: str, dest: str | os.PathLike[str]) -> list[str]:
        """Write every file a stored manifest lists under ``dest`` (each checked against its
        digest, written beside and renamed into place); their paths."""
        import tempfile

        from evo.content import decode_manifest

        root = os.fspath(dest)
        with tempfile.TemporaryDirectory() as tmp:
            raw_path = os.path.join(tmp, "manifest")
            self.fetch(manifest, raw_path)
            with open(raw_path, "rb") as f:
                listed = decode_manifest(f.read())  # paths checked: none leads outside
        written = []
        for e in listed.files:
            target = os.path.join(root, *e.path.split("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            part = f"{target}.evo-part"
            self.fetch(e.digest, part)
            if e.exe:
                os.chmod(part, 0o755)
            os.replace(part, target)
            written.append(target)
        return written

    def hello(self) -> p.Welcome:
        reply = self.request(p.Hello(client="evo.Client"))
        assert isinstance(reply, p.Welcome)
        self._events_endpoint = reply.events_endpoint
        return reply

    def submit(self, command: Sequence[str] | JobSpec | None = None, **fields: Any) -> str:
        """Submit one job; returns its id (the original id when ``key`` was seen before)."""
        return self.submit_reply(command, **fields).job_id

    def submit_reply(self, command: Sequence[str] | JobSpec | None = None,
                     **fields: Any) -> p.Submitted:
        spec = command if isinstance(command, JobSpec) else make_spec(command, **fields)
        reply = self.request(p.Submit(spec=self.with_files([spec])[0]))
        assert isinstance(reply, p.Submitted)
        return reply

    def submit_sweep(self, name: str, jobs: list[JobSpec], spec: dict | None = None,
                     into: str = "", files: bool = True) -> p.SweepAccepted:
        """A sweep and its jobs in one durable batch (``into``: jobs that join that sweep;
        ``files=False``: their code and inputs were sent already, see with_files)."""
        reply = self.request(p.SubmitSweep(name=name, spec=spec or {},
                                           jobs=self.with_files(jobs) if files else jobs,
                                           into=into))
        assert isinstance(reply, p.SweepAccepted)
        return reply

    def study(self, name: str, command: Sequence[str] | JobSpec | None = None, *,
              samples: int, metric: str = "auc", mode: str | None = None, pruner: Any = None,
              target: float | None = None, time_budget_s: float | None = None,
              sweep_id: str | None = None, **fields: Any) -> Any:
        """Ask/tell with a sampler of the user's own (evo.study): a sweep of ``samples``
        trials made from this job spec (a command with ``{param}`` placeholders, or
        ``callable=``), each submitted by ``Study.submit(params)`` and its result read back
        with ``Study.results()``. ``pruner`` ("asha", "median", or a dict of its options)
        stops poor trials early by their reports; ``sweep_id`` opens an existing one again."""
        from evo.study import open_study

        template = command if isinstance(command, JobSpec) else (
            None if sweep_id is not None else make_spec(command, **fields))
        return open_study(self, name, template, samples=samples, metric=metric,  # type: ignore[arg-type]
                          mode=mode, pruner=pruner, target=target, time_budget_s=time_budget_s,
                          sweep_id=sweep_id)

    def submit_many(self, specs: Iterable[JobSpec], window: int = 64) -> list[str]:
        """Pipelined submits with at most ``window`` in flight; ids in the order given."""
        ids: list[str] = []
        inflight: list[int] = []
        for spec in specs:
            inflight.append(self.send(p.Submit(spec=spec)))
            if len(inflight) >= window:
                ids.append(self.receive(inflight.pop(0)).job_id)  # type: ignore[attr-defined]
        for req in inflight:
            ids.append(self.receive(req).job_id)  # type: ignore[attr-defined]
        return ids

    def retry(self, target: str) -> p.Retried:
        """Run a finished job again (or a sweep's failed and cancelled jobs), as new jobs."""
        reply = self.request(p.Retry(target=target))
        assert isinstance(reply, p.Retried)
        return reply

    def cancel(self, target: str, reason: str = "") -> list[str]:
        reply = self.request(p.Cancel(target=target, reason=reason))
        assert isinstance(reply, p.Cancelled)
        return reply.job_ids

    def status(self) -> p.StatusReply:
        reply = self.request(p.Status())
        assert isinstance(reply, p.StatusReply)
        return reply

    def logs(self, job_id: str, *, attempt: int = 0,
             stream: Literal["stdout", "stderr"] = "stdout", offset: int = 0,
             limit: int = 1 << 20) -> p.LogChunk:
        """A chunk of a job's shipped output (attempt 0: the latest)."""
        reply = self.request(p.Logs(job_id=job_id, attempt=attempt, stream=stream, offset=offset,
                                    limit=limit))
        assert isinstance(reply, p.LogChunk)
        return reply

    def query(self, sql: str = "", params: list | tuple = (), *, as_of: int = 0,
              kind: Literal["sql", "digest"] = "sql", timeout_s: float = 300.0) -> p.QueryResult:
        """Ask the broker's projection (its own endpoint, so a slow query delays no one)."""
        endpoint = self.hello().query_endpoint
        if not endpoint:
            raise EvoError(f"the broker at {self.address} runs without projections")
        sock = self._socket(zmq.DEALER, endpoint)
        try:
            sock.send(p.command_encoder.encode(p.Query(req=1, sql=sql, params=list(params),
                                                       as_of=as_of, kind=kind)))
            if not self._wait(sock, int(timeout_s * 1000)):
                raise self._no_answer(f"the projection at {endpoint}", timeout_s)
            reply = self._check(p.reply_decoder.decode(sock.recv()))
        finally:
            monitor = self._monitors.pop(sock, None)
            if monitor is not None:
                sock.disable_monitor()
                monitor.close(0)
            sock.close(0)
        assert isinstance(reply, p.QueryResult)
        return reply

    def sql(self, sql: str, params: list | tuple = (), *, as_of: int = 0):  # noqa: ANN201
        """A read-only query over the projections, as a pyarrow Table (``?`` placeholders take
        ``params``)."""
        from evo.projections.files import from_ipc

        return from_ipc(self.query(sql, params, as_of=as_of).arrow)

    def read(self, from_seq: int = 1, limit: int = 10_000) -> tuple[list[AnyEvent], int]:
        """Committed events from ``from_seq`` (at most ``limit``) and the broker's head seq."""
        reply = self.request(p.Read(from_seq=from_seq, limit=limit))
        assert isinstance(reply, p.Events)
        return decode_batch(reply.events), reply.head

    def read_all(self, from_seq: int = 1, to_seq: int | None = None) -> Iterator[Event]:
        """Every committed event from ``from_seq`` up to the head at call time (or ``to_seq``)."""
        nxt = from_seq
        head = None
        while head is None or nxt <= head:
            events, h = self.read(nxt)
            head = h if head is None else head
            if to_seq is not None:
                head = min(head, to_seq)
            if not events:
                return
            for ev in events:
                if ev.seq > head:
                    return
                yield ev
                nxt = ev.seq + 1

    def follow(self, from_seq: int = 1, *, idle_s: float = 1.0,
               until: float | None = None) -> Iterator[Event]:
        """Every event from ``from_seq`` exactly once, in order, then live (zguide's Clone).

        Subscribes to the relay first, backfills with Read, then drops live events it has
        already yielded and fills any gap it sees with Read. When the relay is quiet for
        ``idle_s`` it asks once more, so an event missed while the subscription was still
        joining is never left behind. ``until`` (monotonic time) ends the iteration.
        """
        endpoint = self._events_endpoint or self.hello().events_endpoint
        sub = self._socket(zmq.SUB, endpoint, {zmq.RCVHWM: 0, zmq.SUBSCRIBE: p.RELAY_TOPIC})
        nxt = from_seq
        try:
            while True:
                for ev in self.read_all(nxt):
                    yield ev
                    nxt = ev.seq + 1
                while True:
                    wait = idle_s if until is None else min(idle_s, until - time.monotonic())
                    if wait <= 0:
                        return
                    if not sub.poll(int(wait * 1000)):
                        break  # quiet: ask the broker directly (outer loop)
                    _, body = sub.recv_multipart()
                    batch = decode_batch(body)
                    if batch and batch[0].seq > nxt:
                        for ev in self.read_all(nxt, batch[0].seq - 1):  # fill the gap
                            yield ev
                            nxt = ev.seq + 1
                    for ev in batch:
                        if ev.seq == nxt:
                            yield ev
                            nxt += 1
                if until is not None and time.monotonic() >= until:
                    return
        finally:
            sub.close(0)

    def close(self) -> None:
        self.ctx.destroy(linger=0)  # every socket, a follow() left open included

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
