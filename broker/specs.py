"""What a job spec may say, checked before anything becomes durable: the spec in itself, the
jobs it depends on, and whether any known machine could ever run it. Pure."""

from __future__ import annotations

from evo.errors import BadInput
from evo.events.schema import JobSpec
from evo.names import nul_error

from .cluster import Cluster
from .scheduler import never_fits
from .state import BrokerState


class InvalidSpec(BadInput):
    """Raised when a job spec is invalid in itself; the message names the field path."""


def validate_spec(spec: JobSpec, state: BrokerState | None = None,
                  cluster: Cluster | None = None) -> None:
    """Check what a spec says about itself (and which jobs it depends on)."""
    if (spec.command is None) == (spec.callable is None):
        got = "both" if spec.command is not None else "neither"
        raise InvalidSpec(f"$.spec: expected exactly one of `command` or `callable` (got {got})")
    if spec.command is not None and (not spec.command or not all(spec.command)):
        raise InvalidSpec("$.spec.command: expected a non-empty argv list of non-empty strings")
    if spec.callable is not None and (":" not in spec.callable
                                      or not all(spec.callable.split(":", 1))):
        raise InvalidSpec(f"$.spec.callable: expected `module:function`, got {spec.callable!r}")
    r = spec.resources
    for name in ("cpus", "mem_gb", "gpus", "vram_gb"):
        value = getattr(r, name)
        if not (0 <= value <= 1e9):  # NaN fails this too
            raise InvalidSpec(f"$.spec.resources.{name}: expected a finite number >= 0, "
                              f"got {value}")
    if r.vram_gb > 0 and r.gpus == 0:
        raise InvalidSpec("$.spec.resources.vram_gb: VRAM was asked for without a GPU (gpus=0)")
    for name, lo, hi in (("max_attempts", 1, 1000), ("priority", -(2**31), 2**31 - 1)):
        value = getattr(spec, name)
        if not lo <= value <= hi:
            raise InvalidSpec(f"$.spec.{name}: expected {lo} to {hi}, got {value}")
    if not (0 <= spec.expected_s <= 1e9):
        raise InvalidSpec(f"$.spec.expected_s: expected a finite number of seconds >= 0, "
                          f"got {spec.expected_s}")
    if spec.seed is not None and not -(2**63) <= spec.seed < 2**63:
        raise InvalidSpec(f"$.spec.seed: expected a 64-bit integer, got {spec.seed}")
    bad = _text_error(spec)
    if bad:
        raise InvalidSpec(bad)
    for i, pattern in enumerate(spec.outputs):  # globs in the job's folder, never outside it
        parts = pattern.replace("\\", "/").split("/")
        if not pattern or pattern.startswith("/") or ".." in parts:
            raise InvalidSpec(f"$.spec.outputs[{i}]: expected a glob relative to the job's "
                              f"folder, without '..', got {pattern!r}")
    if state is not None and spec.after:
        for i, dep in enumerate(spec.after):
            if dep not in state.jobs:
                raise InvalidSpec(f"$.spec.after[{i}]: unknown job {dep!r}")


def _text_error(spec: JobSpec) -> str | None:
    """A NUL byte in any argument, name, key or tag (the OS cuts strings there, so a job would
    not run what was recorded), or a data path that is not one."""
    texts: list[tuple[str, str | None]] = [
        ("$.spec.callable", spec.callable), ("$.spec.trainer", spec.trainer),
        ("$.spec.model_type", spec.model_type), ("$.spec.name", spec.name),
        ("$.spec.key", spec.key), ("$.spec.workdir", spec.workdir)]
    texts += [(f"$.spec.command[{i}]", a) for i, a in enumerate(spec.command or ())]
    texts += [(f"$.spec.after[{i}]", a) for i, a in enumerate(spec.after)]
    for k, v in spec.tags.items():
        texts += [(f"$.spec.tags key {k!r}", k), (f"$.spec.tags.{k}", v)]
    texts += [(f"$.spec.data key {k!r}", k) for k in spec.data]
    texts += [(f"$.spec.params key {k!r}", k) for k in spec.params]
    for where, text in texts:
        if text is not None and (bad := nul_error(text, where)):
            return bad
    return None


def fits_somewhere(spec: JobSpec, state: BrokerState, cluster: Cluster) -> None:
    """Refuse a job that no known machine (a node that ever joined, or one the cluster file
    declares) could ever run; with none known yet there is nothing to judge by."""
    r = spec.resources
    if not (r.gpus or r.cpus > 1 or r.mem_gb):
        return  # a 1-CPU job fits anything: skip the scan
    why = never_fits(spec, state, cluster)
    if why is not None:
        raise InvalidSpec(f"$.spec.resources: {why.split('; it waits')[0]}; to queue it for a "
                          "machine that has not joined yet, declare that machine under "
                          "`machines:` in the cluster file")


def unrouted(spec: JobSpec, cluster: Cluster) -> str:
    """What to say of a model type that no routing rule names (it runs wherever it fits)."""
    if spec.model_type is None or not cluster.rules or cluster.rule_for(spec.model_type):
        return ""
    known = ", ".join(r.model_type for r in cluster.rules)
    return (f"model type {spec.model_type!r} has no routing rule (the cluster file has {known}): "
            "any node that fits runs it")
