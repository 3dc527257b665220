"""`python -m evo.cli.spine_demo`: the event spine end to end, with real processes, in a fresh
EVO_HOME (the first demo; `make demo` now runs the model comparison).

1. start `evo broker` (a real process) and submit a handful of training jobs through the CLI,
   one of them twice with the same idempotency key;
2. kill -9 the broker in the middle of a burst of pipelined submits from the Python client;
3. restart it: the log's torn tail (if any) is truncated, state is folded back from the log,
   and every acknowledged submit is there exactly once;
4. `evo status`, a cancel, and `evo tail` of the whole history.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from evo.cli.demo import wait_broker

HOME = Path(os.environ.get("EVO_DEMO_HOME", ".evo-spine-demo")).absolute()


def evo(*args: str, check: bool = True) -> str:
    env = dict(os.environ, EVO_HOME=str(HOME))
    env.pop("EVO_BROKER", None)
    r = subprocess.run([sys.executable, "-m", "evo.cli.app", *args], capture_output=True,
                       text=True, env=env)
    if check and r.returncode != 0:
        raise SystemExit(f"evo {' '.join(args)} failed ({r.returncode}): {r.stderr}")
    if r.stderr.strip():
        print(f"    (stderr) {r.stderr.strip()}")
    return r.stdout


def start_broker() -> subprocess.Popen:
    log = open(HOME / "broker.out", "ab")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "evo.cli.app", "--home", str(HOME), "broker"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    wait_broker(proc, HOME, "broker.out", timeout_s=20)
    return proc


def step(title: str) -> None:
    print(f"\n== {title}")


def main() -> None:
    from evo.cli.client import BrokerUnavailable, Client
    from evo.events.schema import JobSpec

    shutil.rmtree(HOME, ignore_errors=True)
    HOME.mkdir(parents=True)
    os.environ["EVO_HOME"] = str(HOME)
    os.environ.pop("EVO_BROKER", None)
    step(f"broker up in {HOME}")
    broker = start_broker()
    print("    " + (HOME / "broker.json").read_text().replace("\n", " "))

    step("submit: a model comparison, routed by model type")
    for model, extra in (("GLM", ["--cpus", "2"]), ("RandomForest", ["--cpus", "4"]),
                         ("XGBoost", ["--gpus", "1", "--vram-gb", "8"]),
                         ("NeuralNetwork", ["--gpus", "1", "--vram-gb", "12"])):
        jid = evo("submit", "--model-type", model, *extra, "--key", f"demo-{model}",
                  "--tag", "study=chapter4", "--", "python", "train.py", "--model", model).strip()
        print(f"    {model:<14} -> {jid}")
    again = evo("submit", "--key", "demo-GLM", "--", "python", "train.py").strip()
    print(f"    GLM again with the same --key -> {again} (nothing new queued)")
    bad = subprocess.run([sys.executable, "-m", "evo.cli.app", "submit", "--cpus", "-1", "--",
                          "x"], capture_output=True, text=True, env=dict(os.environ, EVO_HOME=str(HOME)))
    print(f"    a bad spec is refused with exit {bad.returncode}: {bad.stderr.strip()}")

    step("kill -9 the broker in the middle of a burst of pipelined submits")
    acked: dict[str, str] = {}
    with Client(timeout_s=2) as c:
        from evo.broker import protocol as p

        def killer() -> None:
            time.sleep(0.4)
            os.killpg(broker.pid, signal.SIGKILL)

        threading.Thread(target=killer).start()
        i = 0
        try:
            while True:
                reqs = []
                for _ in range(32):
                    key = f"burst-{i}"
                    i += 1
                    reqs.append((key, c.send(p.Submit(spec=JobSpec(command=["trial", key], key=key)))))
                for key, req in reqs:
                    acked[key] = c.receive(req).job_id  # type: ignore[attr-defined]
        except BrokerUnavailable:
            pass
    broker.wait()
    print(f"    {len(acked)} submits acknowledged before the kill; {i - len(acked)} in flight")

    step("restart: fold the log back into state")
    broker = start_broker()
    out = (HOME / "broker.out").read_text()
    torn = [ln for ln in out.splitlines() if "torn tail" in ln]
    print("    " + (torn[-1].split(" WARNING ")[-1] if torn else "no torn tail to truncate"))
    with Client() as c:
        seen = {ev.spec.key: ev.job_id for ev in c.read_all(1) if type(ev).__name__ == "JobSubmitted"}
    lost = [k for k in acked if seen.get(k) != acked[k]]
    print(f"    acknowledged submits found after restart: {len(acked) - len(lost)}/{len(acked)}"
          f" (lost: {len(lost)})")
    if lost:
        raise SystemExit("an acknowledged submit was lost")

    step("status, cancel, and the history")
    print(evo("status"))
    print("    " + evo("cancel", "j1", "--reason", "demo").strip())
    lines = evo("tail").splitlines()
    for line in lines[:6]:
        print("    " + line[:150])
    print(f"    ... {len(lines) - 8} more ...")
    for line in lines[-2:]:
        print("    " + line[:150])
    broker.send_signal(signal.SIGTERM)
    broker.wait(10)
    print(f"\nbroker stopped cleanly (exit {broker.returncode}); the log stays in {HOME / 'log'}; "
          f"try: EVO_HOME={HOME} .venv/bin/evo tail --json --from 1 | head")


if __name__ == "__main__":
    main()
