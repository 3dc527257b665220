"""The scheduler: which queued jobs one node should run now. Pure: state, node and time in,
decisions out (dask's decide_worker is the part worth copying).

Rules, in the order they apply to each queued job:
  * runnable: not cancelled, its not-before time has passed, every ``after`` job completed;
  * routing: a job whose model type has a cluster rule prefers nodes carrying one of the
    rule's labels; a non-preferred node may take it only when no preferred node is alive, or
    when the job has waited past the rule's wait limit (the lease records why);
  * fit: free slots, cpus, memory, GPU count, and VRAM per GPU on this node, counted from the
    resources of the jobs it runs (a GPU job with ``vram_gb=0`` takes whole GPUs; with
    ``vram_gb>0`` it shares a GPU whose free VRAM covers it);
  * time: a node whose allocation ends (a Slurm pilot) takes only jobs expected to end before
    it does (estimates.py: declared, or learned from the jobs like it); a job nothing is known
    about may run, and is retried elsewhere (from its checkpoint) if the allocation ends first;
  * order: higher priority first; among equal priorities, the sweep with the fewest running
    jobs goes first (fair share), then submit order. A job that does not fit is skipped, so
    smaller jobs behind it backfill the node.
"""

from __future__ import annotations

import bisect
import heapq
from collections import defaultdict, deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from evo.events.schema import JobSpec

from .cluster import Cluster, Rule
from .state import ACTIVE, COMPLETED, TERMINAL, BrokerState, Job, Node

EPS = 1e-9


@dataclass(frozen=True)
class GrantLease:
    """Decision: lease ``job_id`` to ``node`` with these GPU devices."""

    job_id: str
    node: str
    devices: tuple[int, ...] = ()
    fallback: str = ""  # why a non-preferred node takes it, if it does
    ahead: bool = False  # queued on the node until a slot frees (see decide)


@dataclass
class Free:
    """What a node has free, derived from the jobs it runs."""

    slots: int
    cpus: float
    mem_gb: float
    gpus: dict[int, float] = field(default_factory=dict)  # index -> free VRAM (GB); absent = taken whole

    def take(self, spec: JobSpec, devices: tuple[int, ...]) -> None:
        r = spec.resources
        self.slots -= 1
        self.cpus -= r.cpus
        self.mem_gb -= r.mem_gb
        for d in devices:
            if r.vram_gb > 0:
                self.gpus[d] -= r.vram_gb
            else:
                self.gpus.pop(d, None)


def free_of(state: BrokerState, node: Node) -> Free:
    """What the broker counts free on a node (leased-ahead jobs take nothing until they start)."""
    return free_for(node.slots, node.cpus, node.mem_gb, {g.index: g.vram_gb for g in node.gpus},
                    [(state.jobs[j].spec, state.jobs[j].devices) for j in node.running
                     if not state.jobs[j].ahead])


def free_for(slots: int, cpus: float, mem_gb: float, vram: dict[int, float],
             running: Iterable[tuple[JobSpec, Sequence[int]]]) -> Free:
    """What is free on a machine of this size running these (spec, devices): the broker's
    count for a node, and the node's own for its admission."""
    free = Free(slots=slots, cpus=cpus, mem_gb=mem_gb, gpus=dict(vram))
    whole: set[int] = set()
    for spec, devices in running:
        r = spec.resources
        free.slots -= 1
        free.cpus -= r.cpus
        free.mem_gb -= r.mem_gb
        for d in devices:
            if r.vram_gb > 0:
                if d in free.gpus:
                    free.gpus[d] -= r.vram_gb
            else:
                whole.add(d)
    for d in whole:
        free.gpus.pop(d, None)
    return free


def fits_on(spec: JobSpec, devices: Sequence[int], free: Free, vram: dict[int, float]) -> bool:
    """Whether a job fits what is free on the devices it was given: a slot, CPUs, memory, and
    on each device its VRAM (shared) or the whole GPU (``vram_gb`` 0). The node admits a lease
    by this rule, the same that chose the devices (pick_devices)."""
    r = spec.resources
    if free.slots < 1 or r.cpus > free.cpus + EPS or r.mem_gb > free.mem_gb + EPS:
        return False
    for d in devices:
        if d not in free.gpus:
            return False  # another job has it whole
        need = r.vram_gb if r.vram_gb > 0 else vram.get(d, 0.0)
        if free.gpus[d] + EPS < need:
            return False
    return True


def pick_devices(spec: JobSpec, free: Free, node: Node) -> tuple[int, ...] | None:
    """GPU indices for the job on this node, or None when they are not free."""
    r = spec.resources
    if r.gpus == 0:
        return ()
    totals = {g.index: g.vram_gb for g in node.gpus}
    if r.vram_gb > 0:
        cands = [d for d, v in free.gpus.items() if v + EPS >= r.vram_gb]
    else:  # whole GPUs: nothing else may be on them
        cands = [d for d, v in free.gpus.items() if v + EPS >= totals.get(d, 0.0)]
    if len(cands) < r.gpus:
        return None
    cands.sort(key=lambda d: (-free.gpus[d], d))
    return tuple(sorted(cands[: r.gpus]))


def misfit(spec: JobSpec, free: Free, node: Node) -> str | None:
    """Why the job does not fit the node's free resources now, or None if it does."""
    r = spec.resources
    if free.slots < 1:
        return f"{node.node} has no free slot ({node.slots} in use)"
    if r.cpus > free.cpus + EPS:
        return f"needs {r.cpus:g} CPUs; {node.node} has {max(free.cpus, 0):g} free"
    if r.mem_gb > free.mem_gb + EPS:
        return f"needs {r.mem_gb:g} GB memory; {node.node} has {max(free.mem_gb, 0):g} GB free"
    if r.gpus:
        if len(node.gpus) < r.gpus:
            return f"needs {r.gpus} GPU(s); {node.node} has {len(node.gpus)}"
        if pick_devices(spec, free, node) is None:
            if r.vram_gb > 0:
                best = max(free.gpus.values(), default=0.0)
                return (f"needs {r.vram_gb:g} GB VRAM on {r.gpus} GPU(s); {node.node} has "
                        f"{best:g} GB free on its best GPU")
            return f"needs {r.gpus} whole GPU(s); {node.node} has {len(free.gpus)} free"
    return None


def capacity_misfit(spec: JobSpec, cpus: float, mem_gb: float, gpus: int, vram_gb: float,
                    name: str) -> str | None:
    """Why the job could never fit a machine of this size, or None."""
    r = spec.resources
    if r.cpus > cpus + EPS:
        return f"{name} has {cpus:g} CPUs, the job needs {r.cpus:g}"
    if r.mem_gb > mem_gb + EPS:
        return f"{name} has {mem_gb:g} GB memory, the job needs {r.mem_gb:g}"
    if r.gpus > gpus:
        return f"{name} has {gpus} GPU(s), the job needs {r.gpus}"
    if r.gpus and r.vram_gb > vram_gb + EPS:
        return f"{name} has {vram_gb:g} GB VRAM per GPU, the job needs {r.vram_gb:g}"
    return None


def never_fits(spec: JobSpec, state: BrokerState, cluster: Cluster) -> str | None:
    """A warning when no known machine (joined nodes, declared machines) could ever run it."""
    reasons = []
    for node in state.nodes.values():
        vram = max((g.vram_gb for g in node.gpus), default=0.0)
        why = capacity_misfit(spec, node.cpus, node.mem_gb, len(node.gpus), vram, node.node)
        if why is None:
            return None
        reasons.append(why)
    for name, m in cluster.machines.items():
        why = capacity_misfit(spec, m.cpus, m.mem_gb, m.gpus, m.vram_gb, name)
        if why is None:
            return None
        reasons.append(why)
    if not reasons:
        return None  # nothing is known yet: nothing to warn about
    return "no known machine fits this job: " + "; ".join(reasons) + "; it waits for one that does"


def blocked(job: Job, state: BrokerState, now: float) -> str | None:
    """Why a queued job cannot run anywhere now, or None."""
    if job.cancel_requested:
        return "a cancel was requested"
    if job.held:
        return f"held (`evo release {job.job_id}` lets it run)"
    if job.not_before > now:
        failed = f" (attempt {job.attempt} failed: {job.error[-300:]})" if job.error else ""
        return (f"retry {job.attempt + 1} is not before {job.not_before - now:.1f}s from now "
                f"(backoff){failed}")
    for dep in job.spec.after:
        d = state.jobs.get(dep)
        if d is None or d.state != COMPLETED:
            return f"waits for {dep} ({d.state if d else 'unknown'})"
    return None


def prefers(rule: Rule | None, labels: Iterable[str]) -> bool:
    """Whether a node with these labels is one the rule prefers (no rule: every node is)."""
    return rule is None or bool(set(rule.route_to) & set(labels))


def routing(job: Job, node: Node, state: BrokerState, cluster: Cluster, now: float,
            memo: dict | None = None) -> tuple[bool, str]:
    """(may this node take the job, why it is a fallback if it is one). ``memo``: one call of
    decide's answers for jobs alike (the learned choice depends on the job's kind alone)."""
    rule = cluster.rule_for(job.spec.model_type)
    if rule is None or prefers(rule, node.labels):
        return True, ""
    preferred_alive = [n.node for n in state.nodes.values()
                       if n.alive and not n.drained and prefers(rule, n.labels)]
    if not preferred_alive:
        return True, f"no node labelled {'/'.join(rule.route_to)} is present"
    waited = now - job.queued_at
    limit = cluster.wait_limit(rule)
    if waited >= limit:
        return True, f"waited {waited:.0f}s for {'/'.join(preferred_alive)} (limit {limit:g}s)"
    if memo is None:
        sooner = sooner_here(job, node, [state.nodes[n] for n in preferred_alive], state, now)
    else:
        sp = job.spec
        kind = (sp.sweep_id, sp.model_type, sp.trainer, sp.callable,
                tuple(sp.command[:2]) if sp.command else None, sp.resources)
        if kind not in memo:
            memo[kind] = sooner_here(job, node, [state.nodes[n] for n in preferred_alive],
                                     state, now)
        sooner = memo[kind]
    if sooner:
        return True, sooner
    return False, ""


def sooner_here(job: Job, node: Node, preferred: list[Node], state: BrokerState,
                now: float) -> str:
    """Why ``node`` is expected to finish the job before any node its rule prefers, when every
    preferred node is busy ("" when not, or when history cannot say).

    The finish on a preferred node is when its first running job is expected to end (each
    job's estimate there, from its start) plus the job's own estimate there; on ``node``, the
    job's estimate from the history of jobs like it on ``node`` itself. Every estimate must be
    known, from each node's own history: an unknown keeps the routing rule's default (wait,
    up to the limit)."""
    here = state.durations.on_node(job.spec, node.node)
    if here is None:
        return ""
    best = None
    for p in preferred:
        free = free_of(state, p)
        if free.slots >= 1 and misfit(job.spec, free, p) is None:
            return ""  # a preferred node takes it as soon as it asks
        ends = []
        for jid in p.running:
            r = state.jobs[jid]
            est = state.durations.on_node(r.spec, p.node)
            if est is None:
                return ""
            ends.append(max((r.started_at or r.leased_at) + est.seconds - now, 0.0))
        there = state.durations.on_node(job.spec, p.node)
        if there is None or not ends:
            return ""
        finish = min(ends) + there.seconds
        if best is None or finish < best[0]:
            best = (finish, p.node, min(ends), there.seconds)
    if best is None or here.seconds >= best[0]:
        return ""
    return (f"expected to finish sooner here: ~{here.seconds:.0f}s on {node.node} ({here.basis}) "
            f"against ~{best[0]:.0f}s on {best[1]}, busy ~{best[2]:.0f}s more, then "
            f"~{best[3]:.0f}s")


def outlasts(job: Job, node: Node, state: BrokerState, now: float) -> str | None:
    """Why the job would not end before the node's allocation does, or None when it would (or
    the node has no end, or nothing is known of how long the job takes)."""
    if not node.ends_at:
        return None
    est = state.durations.estimate(job.spec, node.node)
    left = node.ends_at - now
    if est is None or est.bound <= left:
        return None
    return (f"expected to take up to {est.bound:.0f}s ({est.basis}); {node.node}'s allocation "
            f"ends in {max(left, 0):.0f}s")


def waiting_for(node: Node, state: BrokerState, cluster: Cluster, now: float) -> dict:
    """For a node that is gone: how many queued jobs prefer it (their rule routes to its
    labels), and in how many seconds the last of them may fall back to another node (0: they
    may now, no node they prefer being present). The rule is ``routing``'s."""
    prefer = 0
    fall_back_s = 0.0
    for job_id in state.queue:
        job = state.jobs[job_id]
        rule = cluster.rule_for(job.spec.model_type)
        if rule is None or not prefers(rule, node.labels):
            continue
        prefer += 1
        present = any(n.alive and not n.drained and prefers(rule, n.labels)
                      for n in state.nodes.values())
        if present:  # another preferred node is there: they wait for it, up to the limit
            fall_back_s = max(fall_back_s, cluster.wait_limit(rule) - (now - job.queued_at))
    return {"prefer": prefer, "fall_back_s": round(max(fall_back_s, 0.0), 1)}


class QueueIndex:
    """Queued job ids per sweep, each in (priority desc, submit order): kept across calls.

    Rebuilding the order for every Ready costs O(queue log queue); this index only takes in the
    jobs that entered the queue since the last call (appended when they sort last, as new
    submits do) and drops from each front the jobs that left it.
    """

    def __init__(self) -> None:
        self.groups: dict[str | None, deque[tuple[int, int, str]]] = defaultdict(deque)
        self.known: set[str] = set()

    def sync(self, state: BrokerState) -> None:
        new = state.queue.keys() - self.known
        if not new:
            return
        for job_id in sorted(new, key=lambda j: state.jobs[j].submitted_seq):
            job = state.jobs[job_id]
            key = (-job.spec.priority, job.submitted_seq, job_id)
            g = self.groups[job.spec.sweep_id]
            if not g or key > g[-1]:
                g.append(key)
            else:  # a retry or a higher priority: rare, an insert
                i = bisect.bisect(g, key)
                g.insert(i, key)
            self.known.add(job_id)

    def heads(self, state: BrokerState, key: str | None) -> Iterator[Job]:
        """Queued jobs of one group in order (dropping departed ones from the front)."""
        g = self.groups[key]
        while g and g[0][2] not in state.queue:
            self.known.discard(g.popleft()[2])
        if not g:  # a drained sweep: forget it, or every later call would visit it again
            del self.groups[key]
            return
        for _, _, job_id in g:
            if job_id in state.queue:
                yield state.jobs[job_id]


def _fair_order(state: BrokerState, now: float) -> Iterator[Job]:
    """Runnable queued jobs, lazily: priority first, then the sweep with the fewest running
    jobs (fair share), then submit order."""
    index = state.order_index
    if not isinstance(index, QueueIndex):
        index = state.order_index = QueueIndex()
    index.sync(state)
    running: dict[str | None, int] = defaultdict(int)
    for n in state.nodes.values():
        for jid in n.running:
            running[state.jobs[jid].spec.sweep_id] += 1
    iters: dict[str | None, Iterator[Job]] = {}
    heap = []
    for i, k in enumerate(list(index.groups)):
        it = (j for j in index.heads(state, k) if blocked(j, state, now) is None)
        head = next(it, None)
        if head is None:
            continue
        iters[k] = it
        heap.append((-head.spec.priority, running[k], head.submitted_seq, i, k, head))
    heapq.heapify(heap)
    while heap:
        _, _, _, i, k, job = heapq.heappop(heap)
        yield job
        running[k] += 1
        nxt = next(iters[k], None)
        if nxt is not None:
            heapq.heappush(heap, (-nxt.spec.priority, running[k], nxt.submitted_seq, i, k, nxt))


def next_up(state: BrokerState, now: float, cluster: Cluster, n: int) -> list[tuple[Job, str]]:
    """The first ``n`` queued jobs in the order leases go out (``_fair_order``: priority, fair
    share, submission), then those that cannot run now (held, waiting, backing off), each
    with `evo why`'s words."""
    out: list[tuple[Job, str]] = []
    for job in _fair_order(state, now):
        if len(out) >= n:
            return out
        out.append((job, explain(state, job.job_id, now, cluster)))
    for job_id in state.queue:
        if len(out) >= n:
            break
        job = state.jobs[job_id]
        if blocked(job, state, now) is not None:
            out.append((job, explain(state, job_id, now, cluster)))
    return out


def decide(state: BrokerState, node_name: str, now: float, cluster: Cluster,
           max_leases: int | None = None, ahead: int = 0) -> list[GrantLease]:
    """The leases to grant to one node now.

    First the jobs that fit the node's free resources. Then, when the node offers to queue
    ``ahead`` leases, CPU-only jobs that would fit the node if it were empty, up to ``ahead``
    such leases outstanding on it: the node starts them itself as its slots free.
    """
    node = state.nodes.get(node_name)
    if node is None or not node.alive or node.drained or not state.queue:
        return []
    free = free_of(state, node)
    room = ahead - sum(1 for j in node.running if state.jobs[j].ahead) if ahead > 0 else 0
    if free.slots < 1 and room < 1:
        return []
    empty = Free(slots=1, cpus=node.cpus, mem_gb=node.mem_gb)
    out: list[GrantLease] = []
    memo: dict = {}
    for job in _fair_order(state, now):
        if (free.slots < 1 and room < 1) or (max_leases is not None and len(out) >= max_leases):
            break
        ok, fallback = routing(job, node, state, cluster, now, memo)
        if not ok or (node.ends_at and outlasts(job, node, state, now) is not None):
            continue
        if free.slots >= 1 and misfit(job.spec, free, node) is None:
            devices = pick_devices(job.spec, free, node)
            assert devices is not None
            free.take(job.spec, devices)
            out.append(GrantLease(job.job_id, node.node, devices, fallback))
        elif room >= 1 and job.spec.resources.gpus == 0 and misfit(job.spec, empty, node) is None:
            room -= 1
            out.append(GrantLease(job.job_id, node.node, (), fallback, ahead=True))
    return out


def explain(state: BrokerState, job_id: str, now: float, cluster: Cluster) -> str:
    """Why a job is where it is, in words that name the nodes and what is missing."""
    job = state.jobs.get(job_id)
    if job is None:
        return f"no job {job_id!r}"
    if job.state in TERMINAL:
        extra = f": {job.error}" if job.error and job.state != COMPLETED else ""
        if job.prune and job.state == "pruned":
            extra = f" by its sweep's pruner: {job.prune}"
        tries = f" after {job.attempt} attempts" if job.attempt > 1 else ""
        return f"{job_id} is {job.state}{tries}{extra}"
    if job.state in ACTIVE:
        placed = f"; not a node its rule prefers: {job.fallback}" if job.fallback else ""
        return f"{job_id} is {job.state} on {job.node} (attempt {job.attempt}){placed}"
    why = blocked(job, state, now)
    if why is not None:
        return f"{job_id} is queued: {why}"
    alive = [n for n in state.nodes.values() if n.alive]
    if not alive:
        return f"{job_id} is queued: no node is connected"
    lines = [f"{job_id} is queued; per node:"]
    rule = cluster.rule_for(job.spec.model_type)
    for node in alive:
        if node.drained:
            lines.append(f"  {node.node}: drained, takes nothing new (`evo node resume "
                         f"{node.node}`)")
            continue
        ok, fallback = routing(job, node, state, cluster, now)
        if not ok:
            assert rule is not None
            limit = cluster.wait_limit(rule)
            lines.append(f"  {node.node}: not preferred for {job.spec.model_type} (route to "
                         f"{'/'.join(rule.route_to)}: {rule.reason}); fallback after "
                         f"{max(limit - (now - job.queued_at), 0):.0f}s more")
            continue
        vram = max((g.vram_gb for g in node.gpus), default=0.0)
        cap = capacity_misfit(job.spec, node.cpus, node.mem_gb, len(node.gpus), vram, node.node)
        m = misfit(job.spec, free_of(state, node), node)
        late = outlasts(job, node, state, now)
        if cap is not None:
            lines.append(f"  {node.node}: can never fit: {cap}")
        elif late is not None:
            lines.append(f"  {node.node}: too little time: {late}")
        elif m is not None:
            lines.append(f"  {node.node}: {m}")
        else:
            ahead = sum(1 for j in state.queue if j != job_id)
            lines.append(f"  {node.node}: fits now{' (' + fallback + ')' if fallback else ''}; "
                         f"waits for the node to ask for work ({ahead} other queued)")
    return "\n".join(lines)
