"""Runs a callable job in a fresh process: ``python -m evo.nodes.runner`` with EVO_PARAMS_FILE.

Used when a job asks for ``isolate: true`` (warm workers run every other callable). The
callable is called with the job's params as keyword arguments; a dict it returns is the job's
final metrics (numbers) and artifacts (strings), written as one JSON record to EVO_RESULT_FILE
(a file of its own, so that however much the job reports, the result is found at once).
"""

from __future__ import annotations

import json
import os
import sys

from .worker import resolve, seed_everything, split_result


def main() -> int:
    spec = json.loads(open(os.environ["EVO_PARAMS_FILE"]).read())
    seed_everything(spec.get("seed"))
    result = resolve(spec["callable"])(**(spec.get("params") or {}))
    metrics, artifacts = split_result(result)
    with open(os.environ["EVO_RESULT_FILE"], "w") as f:
        f.write(json.dumps({"kind": "result", "metrics": metrics, "artifacts": artifacts}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
