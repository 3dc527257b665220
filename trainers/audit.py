"""`evo audit JOB`: re-run a completed job from its record and compare.

The record is the log: the JobSubmitted spec (callable, params, seed, data fingerprints), the
JobStarted environment and the JobCompleted metrics. The job runs again here, in a fresh
process on the CPU (``python -m evo.nodes.runner``, the runner of ``isolate: true`` jobs), and
every metric must match bit for bit; timings (``train_s``) are not compared. The data is
fingerprinted again: a changed or missing file is named. Environment differences (the job's
code against its fingerprint at submit, python, package versions, git commit) are listed;
they explain a mismatch but are not one.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from evo.errors import BadInput, EvoError
from evo.projections.files import json_cell

VOLATILE = {"train_s", "duration_s"}


def _j(v):  # noqa: ANN001, ANN202
    return json_cell(v, {})


def rerun(spec: dict, timeout_s: float = 1800) -> dict:
    """Run a callable job's spec in a fresh process; its result (metrics, artifacts)."""
    with tempfile.TemporaryDirectory(prefix="evo-audit-") as tmp:
        d = Path(tmp)
        (d / "params.json").write_text(json.dumps({"callable": spec["callable"],
                                                   "params": spec.get("params") or {},
                                                   "seed": spec.get("seed")}))
        env = dict(os.environ, EVO_PARAMS_FILE=str(d / "params.json"),
                   EVO_REPORT_FILE=str(d / "reports.jsonl"), EVO_RESULT_FILE=str(d / "result.json"),
                   EVO_CHECKPOINT_DIR=str(d / "ckpt"),
                   CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
        if spec.get("seed") is not None:
            env["EVO_SEED"] = str(spec["seed"])
        if spec.get("workdir"):
            cwd = spec["workdir"]
        else:
            cwd = str(d)
        r = subprocess.run([sys.executable, "-m", "evo.nodes.runner"], cwd=cwd, env=env,
                           capture_output=True, text=True, timeout=timeout_s)
        if r.returncode != 0:
            raise EvoError(f"the re-run failed (exit {r.returncode}): {r.stderr.strip()[-600:]}")
        try:
            return json.loads((d / "result.json").read_text())
        except (FileNotFoundError, ValueError):
            pass
    raise EvoError("the re-run returned no result")


def check_data(spec: dict) -> list[str]:
    """Differences between the data fingerprints in the spec and the data as it is now."""
    from evo.trainers.data import load, sha256_file

    out = []
    params = spec.get("params") or {}
    for source, sha in (spec.get("data") or {}).items():
        if source.startswith("games("):
            now = load("games", rows=int(params.get("rows", 5000)),
                       data_seed=int(params.get("data_seed", 2024))).sha256
        elif Path(source).is_file():
            now = sha256_file(Path(source))
        else:
            out.append(f"data {source}: missing (recorded sha256 {sha[:12]}...)")
            continue
        if now != sha:
            out.append(f"data {source}: changed (sha256 recorded {sha[:12]}..., now {now[:12]}...)")
    return out


def env_differences(recorded: dict) -> list[str]:
    from evo.events.schema import JobSpec
    from evo.nodes.environment import fingerprint

    now = fingerprint(JobSpec(command=["audit"]), Path.cwd())
    out = []
    if recorded.get("python") and recorded.get("python") != now.get("python"):
        out.append(f"python {recorded.get('python')} -> {now.get('python')}")
    rp, np_ = recorded.get("packages") or {}, now.get("packages") or {}
    for name in sorted(set(rp) | set(np_)):
        if rp.get(name) != np_.get(name):
            out.append(f"{name} {rp.get(name, 'absent')} -> {np_.get(name, 'absent')}")
    rg, ng = recorded.get("git") or {}, now.get("git") or {}
    if rg and rg != ng:
        out.append(f"git {rg.get('commit', '?')[:10]}{'+dirty' if rg.get('dirty') else ''} -> "
                   f"{ng.get('commit', '?')[:10] if ng else 'none'}{'+dirty' if ng.get('dirty') else ''}")
    return out


def same(a: float, b: float) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float)
                      and math.isnan(a) and math.isnan(b))


def code_difference(spec: dict, manifest_of: Callable | None = None) -> str:
    """How the code ``spec`` recorded at submit differs from its folder now ("" when it does
    not), by the same rule that chose the files that went with it; ``manifest_of(digest)``
    (the broker's stored manifest, or None) names the files that differ."""
    from evo.content import build_tree, code_changes, code_record, tree_digest
    from evo.home import evo_home

    recorded, workdir = spec["code"], spec["workdir"]
    after = None
    if "tree" in recorded:
        try:
            after, _ = build_tree(workdir, exclude=(evo_home(),))
        except (BadInput, OSError) as exc:
            return f"its folder could not be read again ({exc})"
    now = code_record(workdir, after, tree_digest(after) if after is not None else "")
    before = None
    if after is not None and manifest_of is not None and recorded["tree"] != now.get("tree"):
        before = manifest_of(recorded["tree"])
    return code_changes(recorded, now, before, after)


def audit_job(job: str, sql: Callable,
              manifest_of: Callable | None = None) -> tuple[bool, list[str]]:
    rows = sql("SELECT state, spec, metrics FROM jobs WHERE job_id = ?", [job]).to_pylist()
    if not rows:
        raise BadInput(f"no job {job!r}")
    row = rows[0]
    if row["state"] != "completed":
        raise BadInput(f"job {job} is {row['state']}: only a completed job can be audited")
    spec, recorded = _j(row["spec"]), _j(row["metrics"])
    if not spec.get("callable"):
        raise BadInput(f"job {job} is a command job: audit re-runs callables and built-in "
                       f"trainers (their results are returned, not printed)")
    envs = sql("SELECT env FROM attempts WHERE job_id = ? AND outcome = 'completed' "
               "ORDER BY attempt DESC LIMIT 1", [job]).to_pylist()
    env = _j(envs[0]["env"]) if envs else {}
    lines = [f"audit {job}: {spec.get('trainer') or spec['callable']} seed={spec.get('seed')} "
             f"params={json.dumps(spec.get('params') or {}, sort_keys=True)}"]
    data_diff = check_data(spec)
    result = rerun(spec)
    new = result.get("metrics", {})
    diffs = []
    for name in sorted(set(recorded) | set(new)):
        if name in VOLATILE:
            continue
        a, b = recorded.get(name), new.get(name)
        if a is None or b is None:
            diffs.append(f"  {name}: recorded {a}, re-run {b}")
        elif not same(a, b):
            diffs.append(f"  {name}: recorded {a!r}, re-run {b!r} (diff {b - a:+.3g})")
    env_diff = env_differences(env)
    if spec.get("code") and spec.get("workdir"):
        changed = code_difference(spec, manifest_of)
        if changed:  # the likeliest reason for a mismatch; by itself not one
            env_diff.insert(0, f"code changed since it was submitted: {changed}")
    ok = not diffs and not data_diff
    compared = len([n for n in recorded if n not in VOLATILE])
    if ok:
        lines.append(f"match: {compared} metrics identical bit for bit; data unchanged")
    else:
        lines.append(f"MISMATCH: {len(diffs)} of {compared} metrics differ"
                     + (f"; {len(data_diff)} data difference(s)" if data_diff else ""))
        lines += diffs
        lines += [f"  {d}" for d in data_diff]
    if env_diff:
        lines.append("environment differences (recorded -> now):")
        lines += [f"  {d}" for d in env_diff]
    else:
        lines.append("environment: same code, python and package versions"
                     if spec.get("code") else "environment: same python and package versions")
    return ok, lines
