"""Durable, acknowledged submits per second: evo's broker against a raw ceiling, in one run.

The ceiling is a bare ROUTER loop with no evo code: it decodes each message, appends it to a
file as ``[length][crc32c][payload]``, fdatasyncs once per batch and then acks every message of
the batch. evo's broker does the same durable work plus validation, the state fold, idempotency
and the relay. Both are driven by the same client processes sending the same Submit bytes with
a window of requests in flight, so the ratio isolates the server.

    python bench/ingest.py [--seconds 2] [--quick]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import zmq
from crc32c import crc32c

from evo.broker import protocol as p
from evo.broker.server import Broker, broker_collector
from evo.events.schema import JobSpec, Resources


def raw_server(path: str, q: mp.Queue) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.ROUTER)
    s.setsockopt(zmq.RCVHWM, 0)
    s.setsockopt(zmq.SNDHWM, 0)
    s.bind("tcp://127.0.0.1:*")
    q.put(s.getsockopt(zmq.LAST_ENDPOINT).decode())
    f = open(path, "ab", buffering=0)  # noqa: SIM115
    dec = msgspec.msgpack.Decoder()
    enc = msgspec.msgpack.Encoder()
    running = True

    def stop(*_: object) -> None:
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    while running:
        if not s.poll(100):
            continue
        acks, parts = [], []
        for _ in range(4096):
            try:
                ident, body = s.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            msg = dec.decode(body)
            n = len(body).to_bytes(4, "little")
            parts += [n, crc32c(body, crc32c(n)).to_bytes(4, "little"), body]
            acks.append((ident, enc.encode({"reply": "submitted", "req": msg["req"]})))
        f.write(b"".join(parts))
        os.fdatasync(f.fileno())
        for ident, ack in acks:
            s.send_multipart([ident, ack])


def evo_server(home: str, q: mp.Queue, unchecked: bool = False) -> None:
    if unchecked:  # the cost of checking each event (--check-cost): encoding alone instead
        from evo.broker import desk
        from evo.events.codec import encode

        desk.check = encode
    b = Broker(home)
    b.install_signal_handlers()
    q.put(b.address)
    with broker_collector():  # as `evo broker` runs it
        b.serve_forever()


def client(address: str, window: int, seconds: float, cid: int, out: mp.Queue,
           go: mp.Event) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(address)
    enc = msgspec.msgpack.Encoder()
    spec = JobSpec(command=["python", "train.py", "--lr", "0.1"], model_type="XGBoost",
                   resources=Resources(cpus=1, mem_gb=2), tags={"bench": "ingest"})
    # warm up the connection
    s.send(enc.encode(p.Hello(req=0)))
    s.poll(10_000)
    s.recv()
    go.wait()
    t0 = time.perf_counter()
    deadline = t0 + seconds
    req = inflight = done = 0
    while True:
        now = time.perf_counter()
        while inflight < window and now < deadline:
            req += 1
            s.send(enc.encode(p.Submit(req=req, spec=spec)))
            inflight += 1
        if inflight == 0:
            break
        if not s.poll(10_000):
            raise SystemExit(f"client {cid}: no reply in 10 s")
        while True:
            try:
                s.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            inflight -= 1
            done += 1
    out.put((done, t0, time.perf_counter()))
    s.close(0)
    ctx.term()


def measure(kind: str, window: int, nclients: int, seconds: float, workdir: Path) -> float:
    q: mp.Queue = mp.Queue()
    d = workdir / f"{kind}-{window}-{nclients}"
    d.mkdir(parents=True)
    if kind == "raw":
        server = mp.Process(target=raw_server, args=(str(d / "raw.log"), q))
    else:
        server = mp.Process(target=evo_server, args=(str(d), q, kind == "unchecked"))
    server.start()
    address = q.get(timeout=30)
    out: mp.Queue = mp.Queue()
    go = mp.Event()
    clients = [mp.Process(target=client, args=(address, window, seconds, i, out, go))
               for i in range(nclients)]
    for c in clients:
        c.start()
    time.sleep(0.3)
    go.set()
    results = [out.get(timeout=seconds + 60) for _ in clients]
    for c in clients:
        c.join()
    server.terminate()
    server.join(10)
    total = sum(r[0] for r in results)
    span = max(r[2] for r in results) - min(r[1] for r in results)
    shutil.rmtree(d, ignore_errors=True)
    return total / span


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    ap.add_argument("--quick", action="store_true", help="shorter runs (noisier)")
    ap.add_argument("--dir", default=None, help="where logs are written (a real disk)")
    ap.add_argument("--check-cost", action="store_true",
                    help="also evo with its per-event check replaced by a plain encode")
    args = ap.parse_args()
    seconds = 0.7 if args.quick else args.seconds
    base = Path(args.dir or Path(__file__).parent / "out")
    base.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="ingest-", dir=base))
    print(f"durable acknowledged submits/s; {os.cpu_count()} cores; {seconds:g} s per cell; "
          f"logs on {workdir}")
    extra = f" {'unchecked':>10} {'checked/unchecked':>18}" if args.check_cost else ""
    print(f"{'clients':>7} {'window':>7} {'raw ceiling':>12} {'evo':>10} {'evo/raw':>8}{extra}")
    rows = []
    for nclients in (1, 4):
        for window in (1, 64, 2000):
            raw = measure("raw", window, nclients, seconds, workdir)
            evo = measure("evo", window, nclients, seconds, workdir)
            rows.append((nclients, window, raw, evo))
            line = f"{nclients:>7} {window:>7} {raw:>12,.0f} {evo:>10,.0f} {evo / raw:>8.2f}"
            if args.check_cost:
                bare = measure("unchecked", window, nclients, seconds, workdir)
                line += f" {bare:>10,.0f} {evo / bare:>18.2f}"
            print(line, flush=True)
    shutil.rmtree(workdir, ignore_errors=True)
    worst = min(e / r for n, w, r, e in rows if w in (64, 2000))
    print(f"lowest evo/raw at windows 64 and 2000: {worst:.2f} (target >= 0.5)")


if __name__ == "__main__":
    mp.set_start_method("fork")
    sys.exit(main())
