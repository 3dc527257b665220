"""How fast files travel to and from the broker's store, beside raw ZeroMQ, in one run.

1. A file of --mb MB (random bytes, like a checkpoint) is put into the store of a real broker
   with CURVE keys (`evo keys init`, then `evo broker`; loopback) through evo.Client's
   send_files, and fetched back with Client.fetch into a new file (checked against its
   digest). The ceiling is a bare CURVE DEALER/ROUTER pair in this process moving the same bytes
   in the same 4 MiB chunks with the same window, writing them to a file and syncing it once,
   with no evo code: MB/s each way and evo/raw.
2. The per-job cost of staging code that is already on the node: ``staging.place`` for a tree of
   --files files, (a) run in place (the folder there, every digest known), (b) from a copy in
   the cache (made once before timing): median of --runs calls.

    python bench/staging.py [--mb 200] [--files 200] [--runs 200]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import zmq  # noqa: E402

from evo.broker.protocol import BLOB_CHUNK  # noqa: E402
from evo.client import Client  # noqa: E402
from evo.content import HashCache, build_tree, digest_bytes, encode_manifest, hash_file  # noqa: E402
from evo.events.schema import JobSpec  # noqa: E402
from evo.home import read_broker_file  # noqa: E402
from evo.nodes.cache import Cache  # noqa: E402
from evo.nodes.staging import place  # noqa: E402

WINDOW = 8


def evo(*args: str) -> list[str]:
    return [sys.executable, "-m", "evo.cli.app", *args]


def raw_curve(src: Path, dest: Path) -> tuple[float, float]:
    """Seconds to move ``src`` to ``dest`` over bare CURVE sockets: (up, down)."""
    ctx = zmq.Context()
    spub, ssec = zmq.curve_keypair()
    cpub, csec = zmq.curve_keypair()
    server = ctx.socket(zmq.ROUTER)
    server.curve_server = True
    server.curve_publickey, server.curve_secretkey = spub, ssec
    port = server.bind_to_random_port("tcp://127.0.0.1")
    client = ctx.socket(zmq.DEALER)
    client.curve_serverkey, client.curve_publickey, client.curve_secretkey = spub, cpub, csec
    client.connect(f"tcp://127.0.0.1:{port}")
    size = src.stat().st_size
    chunks = (size + BLOB_CHUNK - 1) // BLOB_CHUNK

    def serve_up() -> None:
        with open(dest, "wb") as f:
            for _ in range(chunks):
                ident, data = server.recv_multipart()
                f.write(data)
                server.send_multipart([ident, b"ok"])
            f.flush()
            os.fsync(f.fileno())

    def timed(serve, send, recv) -> float:  # noqa: ANN001
        t = threading.Thread(target=serve)
        t.start()
        t0 = time.perf_counter()
        inflight = 0
        for i in range(chunks):
            send(i)
            inflight += 1
            if inflight >= WINDOW:
                recv()
                inflight -= 1
        for _ in range(inflight):
            recv()
        t.join()
        return time.perf_counter() - t0

    with open(src, "rb") as f:
        up = timed(serve_up, lambda i: client.send(f.read(BLOB_CHUNK)), client.recv)

    def serve_down() -> None:
        with open(src, "rb") as f:
            for _ in range(chunks):
                ident, off = server.recv_multipart()
                f.seek(int(off))
                server.send_multipart([ident, f.read(BLOB_CHUNK)])

    out = open(dest.with_suffix(".down"), "wb")  # noqa: SIM115
    down = timed(serve_down, lambda i: client.send(str(i * BLOB_CHUNK).encode()),
                 lambda: out.write(client.recv()))
    out.flush()
    os.fsync(out.fileno())
    out.close()
    ctx.destroy(linger=0)
    return up, down


def staging_cost(work: Path, files: int, runs: int) -> tuple[float, float]:
    """Median ms of ``place`` for a cached tree: (in place, from the cache's copy)."""
    proj = work / "proj"
    for i in range(files):
        d = proj / f"pkg{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"mod{i}.py").write_text(f"X = {i}\n" * 40)
    manifest, where = build_tree(proj)
    blobs = {e.digest: where[e.digest] for e in manifest.files}
    raw = encode_manifest(manifest)
    tree = digest_bytes(raw)

    def fetch(digest: str, dest: Path) -> int:
        shutil.copyfile(blobs[digest], dest)
        return dest.stat().st_size

    cache = Cache(work / "cache", 1 << 30)
    hashes = HashCache()
    spec_here = JobSpec(command=["true"], workdir=str(proj), tree=tree)
    spec_away = JobSpec(command=["true"], workdir=str(work / "not-here"), tree=tree)
    out = []
    for spec in (spec_here, spec_away):
        place(spec, cache, hashes, fetch, lambda _: manifest)  # warm: hashed, or copied once
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            place(spec, cache, hashes, fetch, lambda _: manifest)
            times.append(time.perf_counter() - t0)
        out.append(statistics.median(times) * 1000)
    return out[0], out[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--files", type=int, default=200)
    ap.add_argument("--runs", type=int, default=200)
    args = ap.parse_args()
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="staging-", dir=out))
    home = work / "home"
    env = dict(os.environ, EVO_HOME=str(home), PYTHONPATH=str(ROOT))
    env.pop("EVO_BROKER", None)
    broker = None
    try:
        src = work / "checkpoint.bin"
        with open(src, "wb") as f:
            for _ in range(args.mb):
                f.write(os.urandom(1 << 20))
        digest, size = hash_file(src)
        subprocess.run(evo("keys", "init"), env=env, check=True, capture_output=True)
        broker = subprocess.Popen(evo("broker"), env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not (info := read_broker_file(home)) or info.get("pid") != broker.pid:
            if time.monotonic() > deadline:
                raise SystemExit("the broker did not start")
            time.sleep(0.05)
        with Client(info["address"], home=home, timeout_s=60) as c:
            assert c.key is not None, "the bench needs a broker with keys (CURVE)"
            t0 = time.perf_counter()
            c.send_files({digest: str(src)})
            up = time.perf_counter() - t0
            back = work / "fetched.bin"
            t0 = time.perf_counter()
            c.fetch(digest, back)
            down = time.perf_counter() - t0
        assert hashlib.sha256(back.read_bytes()).hexdigest() == digest
        raw_up, raw_down = raw_curve(src, work / "raw.bin")
        mb = size / 1e6
        print(f"{mb:,.0f} MB through CURVE on loopback, {BLOB_CHUNK >> 20} MiB chunks, window "
              f"{WINDOW}; the ceiling is bare CURVE sockets with no evo code")
        for name, t, raw in (("upload (send_files -> store)", up, raw_up),
                             ("fetch (store -> fetch)", down, raw_down)):
            print(f"  {name:<30} evo {mb / t:7.1f} MB/s   raw {mb / raw:7.1f} MB/s   "
                  f"evo/raw {raw / t:4.2f}   (target >= 0.5)")
        here, away = staging_cost(work, args.files, args.runs)
        print(f"staging a cached tree of {args.files} files, median of {args.runs}: in place "
              f"{here:.2f} ms, from the cache's copy {away:.2f} ms   (target < 2 ms)")
    finally:
        if broker is not None:
            broker.terminate()
            broker.wait(30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
