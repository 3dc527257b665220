"""The cluster file: routing rules (model type -> preferred labels, with a reason), the wait
limit before a job falls back to a non-preferred node, and the machines the cluster has.

Decoded with msgspec into frozen Structs; a bad file is a BadInput naming the file, the field
path (``$.rules[2].route_to``) and what was expected.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import msgspec

from evo.errors import BadInput, yaml_problem


class Rule(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    model_type: str
    route_to: list[str]
    reason: str = ""
    wait_limit_s: float | None = None  # None: the cluster's default


class Machine(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    labels: list[str] = []
    cpus: float = 0.0
    mem_gb: float = 0.0
    gpus: int = 0
    vram_gb: float = 0.0  # per GPU
    slots: int = 1


class Cluster(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    wait_limit_s: float = 60.0
    rules: list[Rule] = []
    machines: dict[str, Machine] = {}

    def rule_for(self, model_type: str | None) -> Rule | None:
        if model_type is None:
            return None
        for rule in self.rules:
            if rule.model_type == model_type:
                return rule
        return None

    def wait_limit(self, rule: Rule) -> float:
        return self.wait_limit_s if rule.wait_limit_s is None else rule.wait_limit_s


def load_cluster(path: str | os.PathLike[str] | None = None, home: Path | None = None) -> Cluster:
    """``path``, else ``EVO_HOME/cluster.yaml`` when present, else the packaged default."""
    if path is None and home is not None and (home / "cluster.yaml").is_file():
        path = home / "cluster.yaml"
    if path is None:
        text = resources.files("evo.configs").joinpath("cluster.yaml").read_bytes()
        where = "configs/cluster.yaml (packaged)"
    else:
        try:
            text = Path(path).read_bytes()
        except OSError as exc:
            raise BadInput(f"{path}: cannot read the cluster file ({exc.strerror})") from None
        where = str(path)
    try:
        cluster = msgspec.yaml.decode(text, type=Cluster)
    except msgspec.ValidationError as exc:
        raise BadInput(f"{where}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise BadInput(f"{where}: not valid YAML at {yaml_problem(exc)}") from None
    seen: set[str] = set()
    for i, rule in enumerate(cluster.rules):
        if rule.model_type in seen:
            raise BadInput(f"{where}: $.rules[{i}].model_type: {rule.model_type!r} has a rule already")
        if not rule.route_to:
            raise BadInput(f"{where}: $.rules[{i}].route_to: expected at least one label")
        seen.add(rule.model_type)
    return cluster
