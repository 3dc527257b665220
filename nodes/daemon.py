"""The node daemon: join, ask for work, run it, report, heartbeat; reconnect when the broker
goes away and carry on with the jobs that still run.

One thread. Each turn of the loop: collect what running attempts did (progress lines, exits),
report it, heartbeat when due, and when a slot is free ask the broker for work with a short
long-poll. Every report names its lease epoch; a report the broker calls stale means the lease
was taken back (the node was silent too long), so the attempt is killed, never finished twice.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

from evo.broker import protocol as p
from evo.cli.client import BrokerUnavailable, Client, CommandRejected
from evo.events.schema import GpuInfo

from .executor import Run
from .probe import probe, sample

log = logging.getLogger("evo.node")


class NodeDaemon:
    def __init__(self, broker: str | None, *, name: str | None = None, labels: list[str] = (),
                 slots: int | None = None, cpus: float | None = None,
                 mem_gb: float | None = None, gpus: int | None = None,
                 vram_gb: float | None = None, work: Path | None = None,
                 heartbeat_s: float = 2.0, util_every_s: float = 5.0,
                 poll_s: float = 0.05) -> None:
        hw = probe()
        self.name = name or hw["hostname"]
        gpu_list: list[GpuInfo] = hw["gpus"]
        if gpus is not None:  # declared GPUs override the probe (tests, headroom)
            probed = {g.index: g for g in gpu_list}
            gpu_list = [GpuInfo(index=i, name=probed[i].name if i in probed else "declared",
                                vram_gb=vram_gb if vram_gb is not None else
                                (probed[i].vram_gb if i in probed else 0.0))
                        for i in range(gpus)]
        elif vram_gb is not None:
            gpu_list = [GpuInfo(index=g.index, name=g.name, vram_gb=vram_gb, uuid=g.uuid)
                        for g in gpu_list]
        self.join_cmd = p.Join(node=self.name, hostname=hw["hostname"],
                               cpus=cpus if cpus is not None else hw["cpus"],
                               mem_gb=mem_gb if mem_gb is not None else hw["mem_gb"],
                               gpus=gpu_list, labels=list(labels),
                               slots=slots or max(1, int(hw["cpus"])),
                               heartbeat_s=heartbeat_s)
        self.slots = self.join_cmd.slots
        self.broker = broker
        self.work = Path(work or Path(os.environ.get("EVO_HOME", ".evo")) / "nodes" / self.name).absolute()
        self.work.mkdir(parents=True, exist_ok=True)
        self.heartbeat_s, self.util_every_s, self.poll_s = heartbeat_s, util_every_s, poll_s
        self.runs: dict[str, Run] = {}
        self.client: Client | None = None
        self._stop = threading.Event()
        self._draining = False
        self._next_hb = 0.0
        self._next_util = 0.0

    # --- connection ---------------------------------------------------------------------------

    def _running(self) -> list[tuple[str, int]]:
        return [(j, r.grant.lease_epoch) for j, r in self.runs.items()]

    def connect(self) -> None:
        """(Re)join, with backoff while the broker is away; keeps running jobs running."""
        delay = 0.2
        while not self._stop.is_set():
            if self.client is not None:
                self.client.close()
            try:
                self.client = Client(self.broker, timeout_s=max(2.0, self.heartbeat_s))
                join = p.Join(**{**_fields(self.join_cmd), "running": self._running()})
                reply = self.client.request(join)
                assert isinstance(reply, p.Leases)
                self._cancel(reply.cancel, "the broker no longer holds its lease")
                log.info("node %s joined %s (%d job(s) carried on)", self.name,
                         self.client.address, len(self.runs) - len(reply.cancel))
                return
            except (BrokerUnavailable, OSError) as exc:
                log.warning("broker unavailable (%s); retrying in %.1fs", exc, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, 5.0)
                self._collect(report=False)  # keep reaping jobs while away

    def _request(self, cmd: p.Command, timeout_s: float | None = None) -> p.Reply | None:
        """A request; None if the broker went away (the caller's turn ends, we reconnect)."""
        assert self.client is not None
        try:
            return self.client.request(cmd, timeout_s)
        except BrokerUnavailable:
            self.connect()
            return None
        except CommandRejected as exc:
            if exc.code == "rejoin":
                self.connect()
                return None
            raise

    # --- the loop -----------------------------------------------------------------------------

    def stop(self, drain: bool = True) -> None:
        self._draining = drain
        self._stop.set()

    def run(self) -> None:
        self.connect()
        try:
            while not self._stop.is_set():
                busy = self.turn()
                if not busy:
                    self._stop.wait(self.poll_s)
        finally:
            self.shutdown()

    def turn(self) -> bool:
        """One pass; True when something happened (so the loop does not sleep)."""
        did = self._collect(report=True)
        now = time.monotonic()
        if now >= self._next_hb:
            self._heartbeat(now)
        if len(self.runs) < self.slots:
            reply = self._request(p.Ready(node=self.name, max_leases=self.slots - len(self.runs),
                                          wait_s=0.0 if did else 0.25), timeout_s=10.0)
            if isinstance(reply, p.Leases):
                self._cancel(reply.cancel, "cancel requested")
                for grant in reply.leases:
                    self._start(grant)
                did = did or bool(reply.leases)
        return did

    def _heartbeat(self, now: float) -> None:
        util, gpus = ({}, [])
        if now >= self._next_util:
            util, gpus = sample()
            self._next_util = now + self.util_every_s
        reply = self._request(p.Heartbeat(node=self.name, running=self._running(), util=util,
                                          gpus=gpus))
        self._next_hb = now + self.heartbeat_s
        if isinstance(reply, p.Leases):
            self._cancel(reply.cancel, "cancel requested")

    def _start(self, grant: p.LeaseGrant) -> None:
        run = Run(grant, self.work, self.name)
        self.runs[grant.job_id] = run
        if run.proc is None:
            return  # reported as failed by _collect
        from evo.nodes.environment import fingerprint

        self._report(run, "started", {"pid": run.pid, "env": fingerprint(grant.spec, run.dir)})

    def _cancel(self, job_ids: list[str], why: str) -> None:
        for job_id in job_ids:
            run = self.runs.get(job_id)
            if run is not None and not run.cancelled:
                log.info("stopping %s: %s", job_id, why)
                run.cancel()

    def _report(self, run: Run, kind: str, data: dict) -> bool:
        """Send one report; False when the broker says the lease is no longer ours."""
        cmd = p.Report(node=self.name, job_id=run.grant.job_id,
                       lease_epoch=run.grant.lease_epoch, kind=kind, data=data)
        try:
            self._request(cmd)
        except CommandRejected as exc:
            if exc.code == "stale":
                log.warning("%s: %s; stopping the attempt", run.grant.job_id, exc)
                run.cancel(grace_s=1.0)
                return False
            log.error("report %s for %s refused: %s", kind, run.grant.job_id, exc)
        return True

    def _collect(self, report: bool) -> bool:
        did = False
        for job_id, run in list(self.runs.items()):
            updates = run.reports()
            rc = run.poll()
            if not report:
                continue
            for rec in updates:
                kind = rec.pop("kind", "progress")
                rec.pop("t", None)
                if not self._report(run, kind, rec):
                    break
                did = True
            if rc is None:
                continue
            run.reports()  # whatever it wrote last
            if run.cancelled:
                self._report(run, "cancelled", {"reason": "stopped by the node"})
            elif rc == 0:
                self._report(run, "completed", {
                    "metrics": run.result.get("metrics", {}),
                    "artifacts": run.result.get("artifacts", {}),
                    "duration_s": time.time() - run.started})
            else:
                error = run.error or f"exit code {rc}"
                tail = run.tail(run.stderr_path)
                self._report(run, "failed", {"error": f"{error}: {tail}" if tail else error,
                                             "exit_code": rc})
            run.finish()
            del self.runs[job_id]
            did = True
        return did

    def shutdown(self) -> None:
        """Drain: let running attempts finish (up to a minute), then leave."""
        deadline = time.monotonic() + (60.0 if self._draining else 0.0)
        while self.runs and time.monotonic() < deadline:
            self._collect(report=True)
            time.sleep(0.05)
        for run in self.runs.values():
            run.cancel(grace_s=2.0)
        if self.client is not None:
            try:
                self.client.request(p.Leave(node=self.name), timeout_s=2.0)
            except Exception:  # noqa: BLE001 - leaving a broker that is gone
                pass
            self.client.close()


def _fields(s) -> dict:  # noqa: ANN001
    return {f: getattr(s, f) for f in s.__struct_fields__ if f != "req"}


def run_node(broker: str | None, **kw) -> None:
    node = NodeDaemon(broker, **kw)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: node.stop(drain=True))
    node.run()
