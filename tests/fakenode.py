"""A fake node for broker tests: the real node core on real sockets, with no processes.

Its jobs "run" until the test ends them (``end``); what the core tells it to stop is recorded
(``kills``). It talks to the broker through the daemon's own link, so the broker sees exactly
what a node sends.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import zmq

from evo.broker import protocol as p
from evo.client import Client
from evo.nodes import core as c
from evo.nodes.link import Link, Reconnect


class FakeNode:
    def __init__(self, address: str, name: str = "fake", *, slots: int = 1, cpus: float = 4.0,
                 mem_gb: float = 8.0, heartbeat_s: float = 0.5, lease_ahead: int = 0,
                 labels: tuple[str, ...] = (), key: str | None = None) -> None:
        self.name = name
        self.core = c.NodeCore(node=name, slots=slots, cpus=cpus, mem_gb=mem_gb,
                               lease_ahead=lease_ahead, heartbeat_s=heartbeat_s,
                               idle_wait_s=0.2)
        self.join_cmd = p.Join(node=name, hostname=name, cpus=cpus, mem_gb=mem_gb, slots=slots,
                               labels=list(labels), heartbeat_s=heartbeat_s)
        self.client = Client(address, timeout_s=5.0, key=key)
        self.link = Link(self.client, name)
        self.started: dict[str, p.LeaseGrant] = {}  # running here, until ended
        self.kills: list[c.Kill] = []
        self.warnings: list[str] = []
        self.rejoins = 0

    def join(self) -> None:
        join = p.Join(**{f: getattr(self.join_cmd, f) for f in self.join_cmd.__struct_fields__
                         if f not in ("req", "running")}, running=self.core.held())
        self._do(c.Disconnected())
        self._do(self.link.join(join))

    def _do(self, event: c.Event) -> None:
        for ins in self.core.handle(event, time.monotonic()):
            if self.link.carry(ins):
                continue
            if isinstance(ins, c.Start):
                self.started[ins.grant.job_id] = ins.grant
                self._do(c.Reported(self._report(ins.grant.job_id, p.StartedReport(pid=1))))
            elif isinstance(ins, c.Kill):
                self.kills.append(ins)
            elif isinstance(ins, c.Warn):
                self.warnings.append(ins.text)

    def _report(self, job_id: str, body: p.AnyReport) -> p.Report:
        grant = self.started[job_id]
        return p.Report(node=self.name, job_id=job_id, lease_epoch=grant.lease_epoch,
                        report=body)

    def progress(self, job_id: str, **metrics: float) -> None:
        self._do(c.Reported(self._report(job_id, p.ProgressReport(metrics=metrics))))

    def end(self, job_id: str, body: p.AnyReport | None = None) -> None:
        """The attempt ends with ``body`` (completed by default): its final report is sent."""
        cmd = self._report(job_id, body or p.CompletedReport(metrics={"loss": 0.1}))
        del self.started[job_id]
        self._do(c.Ended(cmd))

    def stop(self, drain: bool = True) -> None:
        self._do(c.Stop(drain=drain))

    def pump(self, until: Callable[[], object], timeout_s: float = 10.0) -> None:
        """Run the node's loop until ``until()`` is true (rejoining when told to); raises
        TimeoutError at the deadline."""
        deadline = time.monotonic() + timeout_s
        while not until():
            if time.monotonic() > deadline:
                raise TimeoutError(f"fake node {self.name}: condition not met in {timeout_s}s")
            self._do(c.Tick())
            if self.core.left:
                continue
            self.client.sock.poll(20, zmq.POLLIN)
            try:
                for event in self.link.events():
                    self._do(event)
            except Reconnect:
                self.rejoins += 1
                self.join()

    def close(self) -> None:
        if self.client.sock.closed:
            return
        if self.core.left:
            self.client.request(p.Leave(node=self.name))
        self.client.close()
