"""Runs a callable job in a fresh process: ``python -m evo.nodes.runner`` with EVO_PARAMS_FILE.

The callable is called with the job's params as keyword arguments; a dict it returns is the
job's final metrics (numbers) and artifacts (strings).
"""

from __future__ import annotations

import importlib
import json
import os
import sys


def call(target: str, params: dict) -> object:
    module, _, func = target.partition(":")
    fn = importlib.import_module(module)
    for part in func.split("."):
        fn = getattr(fn, part)
    return fn(**params)


def main() -> int:
    spec = json.loads(open(os.environ["EVO_PARAMS_FILE"]).read())
    result = call(spec["callable"], spec.get("params") or {})
    metrics, artifacts = {}, {}
    if isinstance(result, dict):
        for k, v in result.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                metrics[k] = float(v)
            else:
                artifacts[k] = str(v)
    with open(os.environ["EVO_REPORT_FILE"], "a") as f:
        f.write(json.dumps({"kind": "result", "metrics": metrics, "artifacts": artifacts}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
