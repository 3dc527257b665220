"""Shared fixtures: real brokers (in a thread or as a process) on loopback, always stopped."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from evo.broker.server import Broker
from evo.client import Client

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def core_invariants(monkeypatch):
    """After every test: the invariants of each broker state and node core it used hold
    (the broker desk's state as it is at the end, after any restore)."""
    from evo.broker.desk import Desk
    from evo.nodes.core import NodeCore

    made: list = []
    for cls in (Desk, NodeCore):
        def init(self, *a, _init=cls.__init__, **kw) -> None:  # noqa: ANN001, ANN002, ANN003
            _init(self, *a, **kw)
            made.append(self)
        monkeypatch.setattr(cls, "__init__", init)
    yield
    problems = [f"{type(obj).__name__}: {text}" for obj in made
                for text in (obj.state if isinstance(obj, Desk) else obj).problems()]
    assert not problems, "invariants broken:\n" + "\n".join(problems)


class ThreadBroker:
    """A real Broker serving from a thread of the test process (real sockets, real fsyncs)."""

    def __init__(self, home: Path, **kw) -> None:
        self.home = home
        self.broker = Broker(home, **kw)
        self.address = self.broker.address
        self.thread = threading.Thread(target=self.broker.serve_forever, kwargs={"poll_ms": 20},
                                       daemon=True)
        self.thread.start()

    def client(self, **kw) -> Client:
        return Client(self.address, **kw)

    def stop(self) -> None:
        self.broker.stop()
        self.thread.join(10)
        assert not self.thread.is_alive(), "broker thread did not stop"


@pytest.fixture
def tbroker(tmp_path):
    brokers: list[ThreadBroker] = []

    def start(home: Path | None = None, **kw) -> ThreadBroker:
        b = ThreadBroker(home or tmp_path / "home", **kw)
        brokers.append(b)
        return b

    yield start
    for b in brokers:
        if b.thread.is_alive():
            b.stop()


def evo_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "evo.cli.app", *args]


class ProcBroker:
    """`evo broker` as a real subprocess; kill() is kill -9."""

    def __init__(self, home: Path, *extra: str, env: dict | None = None,
                 prefix: list[str] | None = None) -> None:
        """``env``: added to this environment; ``prefix``: how to run `evo` (default: this
        Python, ``-m evo.cli.app``)."""
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        self.logfile = open(home / f"broker-{time.monotonic_ns()}.log", "wb")  # noqa: SIM115
        e = {**os.environ, **(env or {})}
        e.pop("EVO_BROKER", None)
        self.proc = subprocess.Popen([*(prefix or evo_cmd()), "--home", str(home), "broker", *extra],
                                     stdout=self.logfile, stderr=subprocess.STDOUT,
                                     start_new_session=True, env=e)
        self.address = self._wait_ready()

    def _wait_ready(self, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"broker exited with {self.proc.returncode}: "
                                   f"{Path(self.logfile.name).read_text()}")
            try:
                info = json.loads((self.home / "broker.json").read_text())
                if info.get("pid") == self.proc.pid:
                    return info["address"]
            except (FileNotFoundError, json.JSONDecodeError):
                pass
            time.sleep(0.02)
        raise TimeoutError("broker did not start")

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.logfile.close()
        return self.proc.returncode

    def output(self) -> str:
        self.logfile.flush()
        return Path(self.logfile.name).read_text()


@pytest.fixture
def pbroker(tmp_path):
    procs: list[ProcBroker] = []

    def start(home: Path | None = None, *extra: str, **kw) -> ProcBroker:
        b = ProcBroker(home or tmp_path / "home", *extra, **kw)
        procs.append(b)
        return b

    yield start
    for b in procs:
        b.kill()
        b.logfile.close()


def run_evo(*args: str, home: Path | None = None, timeout: float = 60, input: str | None = None,
            env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e.pop("EVO_BROKER", None)
    if home is not None:
        e["EVO_HOME"] = str(home)
    e.update(env or {})
    return subprocess.run(evo_cmd(*args), capture_output=True, text=True, timeout=timeout,
                          input=input, env=e, cwd=cwd)


def wait_until(cond, timeout: float = 30.0, what: str = "a condition", every: float = 0.02):  # noqa: ANN001, ANN201
    """Poll ``cond()`` until it is true (returning its value) or ``timeout`` passes (failing,
    naming ``what``): a deadline on a condition, never a sleep standing in for one."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(every)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def nodes():
    """``nodes(home, name, *args)``: `evo node` processes, each with its own EVO_HOME (another
    machine's, when it is not the broker's); killed at the end."""
    from tests.test_nodes import NodeProc

    made: list = []

    def start(home: Path, name: str, *args: str):  # noqa: ANN202
        home.mkdir(parents=True, exist_ok=True)
        n = NodeProc(home, name, *args)
        made.append(n)
        return n

    yield start
    for n in made:
        n.kill()


# --- two machines ---------------------------------------------------------------------------


def _netns_ok() -> str:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return "needs root and iproute2 for network namespaces"
    if shutil.which("unshare") is None:
        return "needs unshare (util-linux) for a node that cannot see the client's files"
    r = subprocess.run(["ip", "netns", "add", "evo-probe"], capture_output=True, text=True)
    if r.returncode != 0:
        return f"cannot make a network namespace: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", "evo-probe"], capture_output=True)
    return ""


@pytest.fixture
def two_machines():
    """Two network namespaces joined by a veth pair: A at 10.77.0.1, B at 10.77.0.2."""
    why = _netns_ok()
    if why:
        pytest.skip(why)
    tag = f"{os.getpid() % 10000}"
    a, b = f"evo-a{tag}", f"evo-b{tag}"
    sh = lambda *cmd: subprocess.run(cmd, check=True, capture_output=True)  # noqa: E731
    sh("ip", "netns", "add", a)
    sh("ip", "netns", "add", b)
    try:
        sh("ip", "link", "add", f"va{tag}", "netns", a, "type", "veth", "peer", "name",
           f"vb{tag}", "netns", b)
        for ns, dev, ip in ((a, f"va{tag}", "10.77.0.1/24"), (b, f"vb{tag}", "10.77.0.2/24")):
            sh("ip", "-n", ns, "addr", "add", ip, "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield a, b, f"va{tag}"  # the namespaces, and machine A's interface
    finally:
        subprocess.run(["ip", "netns", "del", a], capture_output=True)
        subprocess.run(["ip", "netns", "del", b], capture_output=True)
