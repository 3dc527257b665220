"""Sweep specs: decode and check a YAML file, expand it into job specs, plan where they go.

A sweep runs a built-in trainer (``trainer: XGBoost``), a callable, or a command with
``{param}`` placeholders over a parameter space: ``method: grid`` takes every combination in
the order written, ``method: random`` draws ``samples`` configurations with the sweep's seed,
``method: tpe`` asks Optuna's TPE sampler for ``samples`` trials one at a time, each when a slot
can take it, learning from the results so far (``sweeps/study.py``), optionally stopping early
trials a ``pruner`` (``asha`` or ``median``) rules out, and stopping the sweep at a
``time_budget_s`` or when a trial's metric reaches ``target``.
``trainer`` may itself be a dimension of the space (the ensemble comparison; not with tpe).

Trials are submitted in the order written. ``order: longest_first`` submits them longest
expected first, so that a sweep of a few long trials does not end with one slot busy and the
others idle: a trial's expected cost is the product of the parameters named in ``cost`` (for
the tree trainers by default ``n_estimators`` x ``max_depth``, for MLP ``epochs``), ties in
the order written. It is not the default: on the seed's grid it showed no gain (there is
almost no tail to save; docs/decisions.md). Everything is
checked before anything is submitted: an unknown trainer, a parameter of the wrong type or out
of bounds, an empty list, an unknown placeholder; each error names the file, the path
(``$.space.max_depth[2]``) and what was expected.
"""

from __future__ import annotations

import itertools
import math
import random
import re
from pathlib import Path
from typing import Any, Literal

import msgspec

from evo.errors import BadInput, yaml_problem
from evo.events.schema import JobSpec, Resources


class Dist(msgspec.Struct, forbid_unknown_fields=True):
    """A range for random search: uniform (or log-uniform) between low and high."""

    low: float
    high: float
    log: bool = False
    int: bool = False


class Pruner(msgspec.Struct, forbid_unknown_fields=True):
    """Early stopping for a learning sweep, by Optuna's rules (see sweeps/study.py): a trial's
    resource is how many values of the sweep's metric it has reported."""

    type: Literal["asha", "median"]
    min_resource: int = 1  # asha: the first rung
    reduction_factor: int = 3  # asha: 1 in this many goes on at each rung
    min_early_stopping_rate: int = 0  # asha
    startup_trials: int = 5  # median: completed trials before any is pruned
    warmup: int = 0  # median: values a trial reports before it can be pruned


class SweepResources(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    cpus: float = 1.0
    mem_gb: float = 0.0
    gpus: int = 0
    vram_gb: float = 0.0


class SweepSpec(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    trainer: str | None = None
    callable: str | None = None
    command: list[str] | None = None
    model_type: str | None = None
    method: Literal["grid", "random", "tpe", "client"] = "grid"  # client: evo.Client.study
    samples: int | None = None
    seed: int = 0
    metric: str = "auc"
    mode: Literal["max", "min"] | None = None
    params: dict[str, Any] = {}
    space: dict[str, list[Any] | Dist] = {}
    resources: SweepResources = SweepResources()
    priority: int = 0
    max_attempts: int = 3
    tags: dict[str, str] = {}
    workdir: str | None = None  # where its jobs run: relative to the sweep file's folder
    order: Literal["longest_first", "written"] | None = None  # default: as written
    cost: list[str] | None = None  # parameters whose product is a trial's expected cost
    inputs: list[str] = []  # files its jobs read, taken with them: relative to the sweep file
    outputs: list[str] = []  # files its jobs make (globs, in their folder) that come home
    pruner: Literal["asha", "median"] | Pruner | None = None  # tpe: stop poor trials early
    time_budget_s: float | None = None  # tpe: ask no trial after this long
    target: float | None = None  # tpe: ask no trial once one reaches this value of `metric`
    startup_trials: int | None = None  # tpe: random trials before the model (Optuna's 10)


_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def load_sweep(path: Path) -> SweepSpec:
    """Decode and check a sweep file; BadInput names the file, the path and the expectation."""
    import yaml

    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise BadInput(f"{path}: cannot read the sweep spec ({exc.strerror or exc})") from None
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise BadInput(f"{path}: not valid YAML at {yaml_problem(exc)}") from None
    try:
        spec = msgspec.convert(data, SweepSpec)
    except msgspec.ValidationError as exc:
        raise BadInput(f"{path}: {exc}") from None
    check(spec, str(path))
    # Its jobs run where it is submitted from, unless it says where (relative to itself).
    workdir = (path.parent / spec.workdir).expanduser() if spec.workdir else Path.cwd()
    if not workdir.is_dir():
        raise BadInput(f"{path}: $.workdir: {str(workdir)!r} is not a directory")
    spec.workdir = str(workdir.absolute())
    for i, given in enumerate(spec.inputs):
        p = (path.parent / given).expanduser().absolute()
        if not p.is_file():
            raise BadInput(f"{path}: $.inputs[{i}]: no such file {str(p)!r}")
        spec.inputs[i] = str(p)
    return spec


def _trainers_of(spec: SweepSpec) -> list[str]:
    if "trainer" in spec.space:
        values = spec.space["trainer"]
        return [str(v) for v in values] if isinstance(values, list) else []
    return [spec.trainer] if spec.trainer else []


def check(spec: SweepSpec, where: str) -> None:
    kinds = sum(x is not None for x in (spec.trainer, spec.callable, spec.command)) \
        + ("trainer" in spec.space)
    if kinds != 1:
        raise BadInput(f"{where}: $: expected exactly one of `trainer`, `callable`, `command` "
                       f"(or `trainer` as a dimension of `space`)")
    if spec.method == "client":
        raise BadInput(f"{where}: $.method: `client` is the method of a study driven by "
                       "evo.Client.study (the user's own sampler); a sweep file takes grid, "
                       "random or tpe")
    if not spec.space:
        raise BadInput(f"{where}: $.space: expected at least one parameter to sweep")
    for name, values in spec.space.items():
        if isinstance(values, list) and not values:
            raise BadInput(f"{where}: $.space.{name}: expected a non-empty list of values")
        if isinstance(values, Dist):
            if spec.method == "grid":
                raise BadInput(f"{where}: $.space.{name}: a range ({{low, high}}) needs "
                               f"`method: random` or `tpe`; a grid needs a list of values")
            if not values.low < values.high or (values.log and values.low <= 0):
                raise BadInput(f"{where}: $.space.{name}: expected low < high"
                               f"{' and low > 0 for log' if values.log else ''}")
    if spec.method != "grid" and (spec.samples is None or spec.samples < 1):
        raise BadInput(f"{where}: $.samples: expected a positive number of samples for "
                       f"`method: {spec.method}`")
    if spec.method == "grid" and spec.samples is not None:
        raise BadInput(f"{where}: $.samples: only for `method: random` or `tpe`")
    _check_learning(spec, where)
    if spec.max_attempts < 1:
        raise BadInput(f"{where}: $.max_attempts: expected >= 1, got {spec.max_attempts}")
    for field in ("cpus", "mem_gb", "gpus", "vram_gb"):
        if getattr(spec.resources, field) < 0:
            raise BadInput(f"{where}: $.resources.{field}: expected >= 0")
    trainers = _trainers_of(spec)
    if trainers:  # (the models' module imports numpy: a sweep of the user's code waits not)
        from evo.trainers.models import PARAMS
    for i, t in enumerate(trainers):
        if t not in PARAMS:
            at = f"$.space.trainer[{i}]" if "trainer" in spec.space else "$.trainer"
            raise BadInput(f"{where}: {at}: unknown trainer {t!r} "
                           f"(expected one of {', '.join(PARAMS)})")
    for t in trainers:
        cls = PARAMS[t]
        fields = set(cls.__struct_fields__)
        for name, value in spec.params.items():
            _check_value(cls, fields, t, name, value, f"$.params.{name}", where)
        for name, values in spec.space.items():
            if name == "trainer":
                continue
            if isinstance(values, Dist):
                for bound in ("low", "high"):
                    v = getattr(values, bound)
                    _check_value(cls, fields, t, name, int(v) if values.int else v,
                                 f"$.space.{name}.{bound}", where)
                continue
            for i, v in enumerate(values):
                _check_value(cls, fields, t, name, v, f"$.space.{name}[{i}]", where)
    for i, name in enumerate(spec.cost or []):
        if name not in spec.space and name not in spec.params:
            names = ", ".join(sorted({*spec.space, *spec.params}))
            raise BadInput(f"{where}: $.cost[{i}]: {name!r} is not a parameter (expected one "
                           f"of {names})")
    if spec.order == "longest_first" and not cost_params(spec):
        raise BadInput(f"{where}: $.order: longest_first needs `cost` (the parameters whose "
                       "product is a trial's expected cost)")
    if spec.command is not None:
        known = set(spec.space) | set(spec.params) | {"seed"}
        for i, arg in enumerate(spec.command):
            for name in _PLACEHOLDER.findall(arg):
                if name not in known:
                    raise BadInput(f"{where}: $.command[{i}]: placeholder {{{name}}} is not a "
                                   f"parameter (expected one of {', '.join(sorted(known))})")


_DATA_PARAMS = ("data", "rows", "data_seed")  # fingerprinted at submit: not suggested


def _check_learning(spec: SweepSpec, where: str) -> None:
    """What only a learning sweep takes, and what it cannot."""
    own = {"pruner": spec.pruner, "time_budget_s": spec.time_budget_s, "target": spec.target,
           "startup_trials": spec.startup_trials}
    if spec.method == "client":  # the user's sampler: only the pruner and the stops apply
        if spec.startup_trials is not None:
            raise BadInput(f"{where}: $.startup_trials: only for `method: tpe`")
    elif spec.method != "tpe":
        for name, value in own.items():
            if value is not None:
                raise BadInput(f"{where}: $.{name}: only for `method: tpe` (a sweep that "
                               "learns from its trials)")
        return
    if spec.method == "client":
        return
    if "trainer" in spec.space:
        raise BadInput(f"{where}: $.space.trainer: `method: tpe` runs one trainer (set "
                       "`trainer:`); compare trainers with a grid")
    for name in _DATA_PARAMS:
        if name in spec.space and spec.trainer:
            raise BadInput(f"{where}: $.space.{name}: the data is fingerprinted when the sweep "
                           "is submitted; with `method: tpe` set it under `params:`")
    if spec.order is not None or spec.cost is not None:
        at = "order" if spec.order is not None else "cost"
        raise BadInput(f"{where}: $.{at}: a tpe sweep asks for its trials one at a time; it "
                       "has no order to set")
    for name, values in spec.space.items():
        choices = values if isinstance(values, list) else []
        for i, v in enumerate(choices):
            if not (v is None or isinstance(v, (bool, int, float, str))):
                raise BadInput(f"{where}: $.space.{name}[{i}]: `method: tpe` chooses among "
                               f"numbers, strings, booleans or null, got {v!r}")
    if spec.time_budget_s is not None and not 0 < spec.time_budget_s < 1e9:
        raise BadInput(f"{where}: $.time_budget_s: expected a positive number of seconds")
    if spec.target is not None and not math.isfinite(spec.target):
        raise BadInput(f"{where}: $.target: expected a finite number")
    if spec.startup_trials is not None and spec.startup_trials < 0:
        raise BadInput(f"{where}: $.startup_trials: expected >= 0")
    p = spec.pruner
    if isinstance(p, Pruner):
        for name, low in (("min_resource", 1), ("reduction_factor", 2),
                          ("min_early_stopping_rate", 0), ("startup_trials", 0), ("warmup", 0)):
            if getattr(p, name) < low:
                raise BadInput(f"{where}: $.pruner.{name}: expected >= {low}, got "
                               f"{getattr(p, name)}")


def learning(spec: SweepSpec | dict[str, Any]) -> bool:
    """Whether the sweep's trials are asked for one at a time, from what it learnt so far (by
    the broker's sampler, or by the user's through evo.Client.study)."""
    method = spec.get("method") if isinstance(spec, dict) else spec.method
    return method in ("tpe", "client")


def check_recorded(spec: dict[str, Any]) -> SweepSpec:
    """A learning sweep's record (SweepSubmitted.spec), checked as the broker must before it
    asks a sampler for anything: BadInput names the path."""
    data = {k: v for k, v in spec.items() if k != "file"}
    try:
        out = msgspec.convert(data, SweepSpec)
    except msgspec.ValidationError as exc:
        raise BadInput(f"$.spec: {exc}") from None
    if not out.space and out.method != "client":
        raise BadInput("$.spec.space: expected at least one parameter to sweep")
    for name, values in out.space.items():
        if isinstance(values, list) and not values:
            raise BadInput(f"$.spec.space.{name}: expected a non-empty list of values")
        if isinstance(values, Dist) and (not values.low < values.high
                                         or (values.log and values.low <= 0)):
            raise BadInput(f"$.spec.space.{name}: expected low < high (and low > 0 for log)")
    if out.samples is None or out.samples < 1:
        raise BadInput("$.spec.samples: expected a positive number of samples")
    _check_learning(out, "$.spec")
    return out


def _check_value(cls: type, fields: set[str], trainer: str, name: str, value: Any, at: str,
                 where: str) -> None:
    if name not in fields:
        known = ", ".join(sorted(fields))
        raise BadInput(f"{where}: {at}: {trainer} has no parameter {name!r} (expected one of "
                       f"{known})")
    try:
        msgspec.convert({name: value}, cls)
    except msgspec.ValidationError as exc:
        expected = str(exc).split(" - at ")[0].split(", got ")[0]  # ours names the value
        expected = expected[:1].lower() + expected[1:]
        raise BadInput(f"{where}: {at}: {trainer}.{name}: {expected}, got {value!r}") from None


def cost_params(spec: SweepSpec) -> list[str]:
    """The parameters whose product is a trial's expected cost ([] when none is known): the
    sweep's ``cost``, else its trainer's (not across trainers: their costs do not compare)."""
    from evo.trainers.registry import COST

    if spec.cost is not None:
        return list(spec.cost)
    trainers = _trainers_of(spec)
    return list(COST.get(trainers[0], ())) if len(trainers) == 1 else []


def expected_cost(params: dict[str, Any], names: list[str]) -> float:
    """The product of the named parameters (a value that is not a number counts 1)."""
    out = 1.0
    for n in names:
        v = params.get(n)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out *= float(v)
    return out


def configurations(spec: SweepSpec) -> list[dict[str, Any]]:
    """The parameter sets, in a stable order: grid order as written or the seeded draws'
    order, or longest expected first when the sweep asks for it (see the module)."""
    confs = _drawn(spec)
    names = cost_params(spec)
    if spec.order != "longest_first" or not names:
        return confs
    return sorted(confs, key=lambda conf: -expected_cost({**spec.params, **conf}, names))


def _drawn(spec: SweepSpec) -> list[dict[str, Any]]:
    names = list(spec.space)
    if spec.method == "grid":
        lists = [spec.space[n] for n in names]
        return [dict(zip(names, combo)) for combo in itertools.product(*lists)]  # type: ignore[arg-type]
    rng = random.Random(spec.seed)
    out = []
    for _ in range(spec.samples or 0):
        conf = {}
        for n in names:
            v = spec.space[n]
            if isinstance(v, Dist):
                if v.log:
                    x = math.exp(rng.uniform(math.log(v.low), math.log(v.high)))
                else:
                    x = rng.uniform(v.low, v.high)
                conf[n] = int(round(x)) if v.int else float(f"{x:.6g}")
            else:
                conf[n] = v[rng.randrange(len(v))]
        out.append(conf)
    return out


def data_fingerprint(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Resolve the data a trainer job reads (a CSV path made absolute, or synthetic games) and
    its sha256, recorded in the job spec."""
    from evo.trainers.data import SYNTHETIC, load, sha256_file

    data = str(params.get("data", SYNTHETIC))
    if data == SYNTHETIC:
        ds = load(SYNTHETIC, rows=int(params.get("rows", 5000)),
                  data_seed=int(params.get("data_seed", 2024)))
        return params, {ds.source: ds.sha256}
    path = Path(data).expanduser().absolute()
    if not path.is_file():
        raise BadInput(f"$.params.data: no such file {str(path)!r} (give a CSV path, or `games`)")
    return {**params, "data": str(path)}, {str(path): sha256_file(path)}


def job_specs(spec: SweepSpec) -> list[JobSpec]:
    from evo.trainers.registry import resolve_trainer

    res = Resources(cpus=spec.resources.cpus, mem_gb=spec.resources.mem_gb,
                    gpus=spec.resources.gpus, vram_gb=spec.resources.vram_gb)
    from evo.client import input_files

    out = []
    prints: dict[str, tuple[dict, dict]] = {}
    inputs = input_files(spec.inputs)
    for conf in ([{}] if learning(spec) else configurations(spec)):
        params = {**spec.params, **conf}
        trainer = params.pop("trainer", None) or spec.trainer
        common: dict[str, Any] = dict(
            resources=res, priority=spec.priority, max_attempts=spec.max_attempts,
            seed=spec.seed, tags=dict(spec.tags), workdir=spec.workdir,
            outputs=list(spec.outputs))
        if spec.command is not None:
            argv = list(spec.command) if learning(spec) else _fill(spec.command, params, spec.seed)
            out.append(JobSpec(command=argv, params=params, model_type=spec.model_type,
                               name=_label(spec.name, conf), data=dict(inputs), **common))
            continue
        data: dict[str, str] = {}
        if trainer is not None:
            key = repr((params.get("data"), params.get("rows"), params.get("data_seed")))
            if key not in prints:
                prints[key] = data_fingerprint(params)
            resolved, data = prints[key]
            params["data"] = resolved.get("data", params.get("data", "games"))
        out.append(JobSpec(
            callable=resolve_trainer(trainer) if trainer else spec.callable, trainer=trainer,
            params=params, model_type=spec.model_type or trainer, data={**data, **inputs},
            name=_label(trainer or spec.name, conf), **common))
    return out


def _fill(command: list[str], params: dict[str, Any], seed: int | None) -> list[str]:
    values = {**params, "seed": seed}
    return [_PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), a) for a in command]


def trial_spec(template: JobSpec, conf: dict[str, Any]) -> JobSpec:
    """A learning sweep's trial: its template with the suggested parameters (in its command's
    placeholders too) and a name that says them."""
    params = {**template.params, **conf}
    command = _fill(template.command, params, template.seed) if template.command else None
    head = (template.name or "").split(" ")[0] or template.trainer or "trial"
    return msgspec.structs.replace(template, params=params, command=command,
                                   name=_label(head, conf))


def _label(head: str, conf: dict[str, Any]) -> str:
    parts = [f"{k}={v}" for k, v in conf.items() if k != "trainer"]
    return f"{head} {' '.join(parts)}".strip()[:120]


def record(spec: SweepSpec, path: Path) -> dict[str, Any]:
    """The sweep as recorded in SweepSubmitted."""
    out = msgspec.to_builtins(spec)
    out["file"] = str(path)
    return out
