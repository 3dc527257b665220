"""The answer to `evo status`: counts, nodes, and the newest running, queued and failed jobs,
from the broker's state. Pure."""

from __future__ import annotations

from evo.events.schema import JobSpec

from . import protocol as p
from .cluster import Cluster
from .scheduler import blocked, next_up, outlasts, waiting_for
from .state import ACTIVE, BrokerState, Job, Node


def startable(state: BrokerState, within_s: float, now: float) -> bool:
    """Whether a queued job could start on a new node whose allocation lasts ``within_s``: not
    held, waiting for others or backing off (``blocked``), and not expected to outlast it
    (``outlasts``' rule, for a node with no history of its own). The first such job ends the
    search, so a long queue of runnable jobs costs one look."""
    probe = Node(node="", ends_at=now + within_s)
    return any(blocked(state.jobs[j], state, now) is None
               and outlasts(state.jobs[j], probe, state, now) is None for j in state.queue)


def status_of(state: BrokerState, req: int = 0, *, limit: int = 50,
              now: float = 0.0, cluster: Cluster | None = None,
              within_s: float = 0.0, heard: dict[str, float] | None = None,
              order: int = 0) -> p.StatusReply:
    """Counts, nodes, and the newest jobs running, queued and failed (a lease taken ahead of a
    free slot is queued on its node, not running: it is listed with the queued). A node that
    is gone says since when, and what of the queue waits for it (``waiting_for``); one that is
    alive, how long ago it was last heard from (``heard``: node -> seconds, the desk's clock)."""
    nodes = []
    for n in state.nodes.values():
        row = {"node": n.node, "alive": n.alive, "labels": n.labels, "slots": n.slots,
               "cpus": n.cpus, "mem_gb": n.mem_gb, "gpus": len(n.gpus), "drained": n.drained,
               "running": sum(not state.jobs[j].ahead for j in n.running)}
        if n.drained and n.drained_at:
            row["drained_since"] = n.drained_at
        if heard is not None and n.alive and n.node in heard:
            row["heard_s"] = heard[n.node]
        if n.ends_at and n.alive:
            row["ends_in_s"] = round(max(n.ends_at - now, 0.0), 1)
        if not n.alive:
            row.update(gone=n.gone, since=n.gone_at)
            if cluster is not None:
                row.update(waiting_for(n, state, cluster, now))
        nodes.append(row)
    running: list[dict] = []
    queued: list[dict] = []
    failed: list[dict] = []
    # From the indexes, not a scan of every job: what runs is on the nodes, what waits is the
    # queue (and the leases queued ahead on nodes), what failed is the state's recent list.
    on_nodes = [state.jobs[j] for n in state.nodes.values() for j in n.running]
    active = sorted((j for j in on_nodes if j.state in ACTIVE and not j.ahead),
                    key=lambda j: j.submitted_seq, reverse=True)[:limit]
    for job in active:
        running.append({"job_id": job.job_id, "state": job.state, "node": job.node,
                        "attempt": job.attempt, "name": _name(job.spec),
                        "elapsed_s": round(now - job.started_at, 1) if job.started_at else None,
                        "last": _last(job.metrics)})
    newest_queued: list[Job] = []
    for job_id in reversed(state.queue):
        if len(newest_queued) >= limit:
            break
        newest_queued.append(state.jobs[job_id])
    waiting = sorted({j.job_id: j for j in [*newest_queued, *(j for j in on_nodes if j.ahead)]
                      }.values(), key=lambda j: j.submitted_seq, reverse=True)[:limit]
    for job in waiting:
        queued.append({"job_id": job.job_id, "priority": job.spec.priority,
                       "attempt": job.attempt, "name": _name(job.spec),
                       "held": job.held, "on": job.node if job.ahead else None})
    for job_id in reversed(state.failed_recent[-limit:]):
        job = state.jobs[job_id]
        failed.append({"job_id": job.job_id, "attempt": job.attempt, "name": _name(job.spec),
                       "error": job.error[-200:]})
    running.reverse()
    queued.reverse()
    counts = {k: v for k, v in state.counts.items() if v}
    return p.StatusReply(req=req, last_seq=state.last_seq, jobs=counts, nodes=nodes,
                         running=running, queued=queued, failed=failed,
                         asking=sum(state.sweeps[s].spec.get("method") == "tpe"
                                    for s in state.learning),
                         startable=startable(state, within_s, now) if within_s else False,
                         order=[{"job_id": j.job_id, "sweep_id": j.spec.sweep_id,
                                 "name": _name(j.spec), "priority": j.spec.priority,
                                 "attempts": j.attempt, "held": j.held, "why": why}
                                for j, why in next_up(state, now, cluster, order)]
                         if order and cluster is not None else [])


def _last(metrics: dict[str, float], n: int = 2) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in list(metrics.items())[-n:])


def _name(spec: JobSpec) -> str:
    if spec.name:
        return spec.name
    if spec.trainer:
        return spec.trainer
    if spec.command:
        return " ".join(spec.command)[:60]
    return spec.callable or ""
