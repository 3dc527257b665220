"""`evo ui` in a real headless browser (Debian's chromium and chromedriver through Selenium;
`make test` installs them as root where missing), against a real broker, node and sweeps.
Where no browser can start, these tests skip and say why.

Set EVO_UI_SCREENSHOT=FILE to keep the sweep page's screenshot (the README's)."""

from __future__ import annotations

import csv
import io
import os
import select
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from evo.broker import protocol as p
from evo.client import Client
from tests.conftest import ProcBroker, evo_cmd, free_port, run_evo, wait_until
from tests.test_nodes import PY, NodeProc

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"

# A trial that waits for a gate file (GATE, put before it), so the test decides when the
# sweep moves on.
GATED = """\
import os, sys, time, evo
lr, depth = float(sys.argv[1]), int(sys.argv[2])
while not os.path.exists(GATE):
    time.sleep(0.05)
loss = 1.0
for step in range(1, 6):
    loss = loss * (0.6 + abs(lr - 0.03) * 3) + 0.01 * depth
    evo.report(step=step, loss=loss)
    if depth == 3 and step == 3:  # the job page's test: a checkpoint to show
        (evo.checkpoint_dir() / "state.txt").write_text(str(loss))
        evo.checkpoint("state.txt", step=step)
print(f"trial lr={lr} depth={depth}: loss {loss:.4f}")
evo.result(loss=loss)
"""


@pytest.fixture(scope="module")
def browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (the dev extra)")
    if not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)):
        pytest.skip("no headless browser: apt-get install chromium chromium-driver "
                    "(`make test` does it as root)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1280,1500", "--disable-gpu"):
        opts.add_argument(arg)
    try:
        driver = webdriver.Chrome(options=opts, service=Service(DRIVER))
    except Exception as exc:  # noqa: BLE001 - the reason is the skip's
        pytest.skip(f"chromium did not start: {str(exc).splitlines()[0]}")
    # a deadline for every page: pages left behind that keep their event streams open would
    # use up the browser's six connections to the host, and the next page would wait for one
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


class Stack:
    """A broker, a node with two slots and `evo ui`, as a user starts them."""

    def __init__(self, root: Path) -> None:
        self.home = root / "home"
        self.broker = ProcBroker(self.home)
        self.node = NodeProc(self.home, "worker", "--slots", "2")
        self.port = free_port()
        self.log = open(root / "ui.log", "wb")  # noqa: SIM115
        env = {**os.environ, "EVO_HOME": str(self.home)}
        env.pop("EVO_BROKER", None)
        self.ui = subprocess.Popen(evo_cmd("ui", "--port", str(self.port)), stdout=self.log,
                                   stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"
        wait_until(self._answers, 30, "evo ui to answer")

    def _answers(self) -> bool:
        assert self.ui.poll() is None, (self.home.parent / "ui.log").read_text()
        try:
            with urllib.request.urlopen(self.url + "/api/sweeps", timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        for proc in (self.ui,):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
        self.log.close()
        self.node.kill()
        self.broker.kill()
        self.broker.logfile.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("ui"))
    yield s
    s.stop()


def sweep(stack: Stack, folder: Path, yaml: str, gate: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.py").write_text(f"GATE = {str(gate)!r}\n" + GATED)
    (folder / "sweep.yaml").write_text(yaml)
    r = run_evo("sweep", "sweep.yaml", home=stack.home, cwd=folder)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()[-1]


def js(driver, expr: str):  # noqa: ANN001, ANN201
    return driver.execute_script("return " + expr)


def chip(driver, key: str) -> str:  # noqa: ANN001
    text = js(driver, f"document.querySelector('#progress .chip[data-key=\"{key}\"]')?.textContent")
    return text.split()[-1] if text else ""


def rows(driver, table: str) -> list[list[str]]:  # noqa: ANN001
    """The table's cells as text, read in one go (the page redraws tables as events come)."""
    return js(driver, f"[...document.querySelectorAll('{table} tbody tr')]"
                      ".map(r => [...r.cells].map(c => c.textContent))")


def text(driver, id_: str) -> str:  # noqa: ANN001
    return js(driver, f"document.getElementById('{id_}').textContent")


def test_a_running_sweeps_progress_appears_without_a_reload(stack, browser, tmp_path):
    gate = tmp_path / "go"
    sid = sweep(stack, tmp_path / "proj", f"name: live\ncommand: [{PY}, train.py, '{{lr}}', '{{depth}}']\n"
                "metric: loss\nmode: min\nspace:\n  lr: [0.001, 0.01, 0.03, 0.1]\n  depth: [2, 4]\n",
                gate)
    browser.get(f"{stack.url}/sweeps/{sid}")
    wait_until(lambda: chip(browser, "jobs") == "8", 30, "the sweep's page to load")
    assert chip(browser, "completed") == "0"
    wait_until(lambda: js(browser, "document.getElementById('live').textContent") == "live", 30,
               "the page to join the event stream")
    loaded = js(browser, "window.evoLoadedAt")
    gate.write_text("")  # the trials run now
    wait_until(lambda: chip(browser, "completed") == "8", 120, "8 completions on the page")
    wait_until(lambda: len(rows(browser, "#board")) == 8, 30, "the leaderboard's 8 rows")
    assert js(browser, "window.evoLoadedAt") == loaded  # the same page: updated, not reloaded
    first = rows(browser, "#board")[0][2]
    with Client(stack.broker.address) as c:
        best = c.sql("SELECT job_id FROM leaderboard WHERE sweep_id = ? AND rank = 1",
                     [sid]).to_pylist()[0]["job_id"]
    assert first == best  # rank 1 on the page is the projection's rank 1 (mode: min)
    # the convergence plot has a point per trial, its best-so-far line never rises (min)
    best_so_far = js(browser, "document.getElementById('convergence').data[1].y")
    assert len(best_so_far) == 8 and best_so_far == sorted(best_so_far, reverse=True)
    js(browser, "document.querySelector('#board tbody input[type=checkbox]').click()")
    wait_until(lambda: js(browser, "(document.getElementById('curves').data || []).length") == 1,
               30, "the ticked trial's curve")
    if os.environ.get("EVO_UI_SCREENSHOT"):
        browser.execute_script("window.scrollTo(0, 0)")
        browser.save_screenshot(os.environ["EVO_UI_SCREENSHOT"])


def test_a_lost_node_shows_as_lost(stack, browser):
    with Client(stack.broker.address) as c:
        c.request(p.Join(node="ghost", hostname="elsewhere", cpus=4, mem_gb=8, slots=1,
                         heartbeat_s=0.5))
        browser.get(stack.url + "/")

        def state_of_ghost() -> str:
            return next((r[1] for r in rows(browser, "#nodes") if r[0] == "ghost"), "")

        def beating_and_alive() -> bool:  # heartbeats until the page has shown it alive
            c.request(p.Heartbeat(node="ghost"))
            return state_of_ghost() == "alive"

        wait_until(beating_and_alive, 30, "the new node, alive", every=0.2)
        loaded = js(browser, "window.evoLoadedAt")
        # it sends no heartbeat: the broker declares it lost, and the page says so by itself
        wait_until(lambda: state_of_ghost() == "lost", 60, "the node shown as lost")
        assert js(browser, "window.evoLoadedAt") == loaded
        assert any(n["node"] == "ghost" and not n["alive"] for n in c.status().nodes)
    worker = [r for r in rows(browser, "#nodes") if r[0] == "worker"]
    assert worker and worker[0][1] == "alive" and worker[0][4].endswith("/ 2")


def test_a_drained_node_and_the_queue_with_the_schedulers_reasons(stack, browser):
    browser.get(stack.url + "/")
    worker = lambda: next((r for r in rows(browser, "#nodes") if r[0] == "worker"), [])  # noqa: E731
    wait_until(lambda: worker()[1:2] == ["alive"], 30, "the worker, alive")
    with Client(stack.broker.address) as c:
        c.request(p.Drain(node="worker"))
        wait_until(lambda: worker()[1:2] == ["drained"], 30, "the worker shown drained")
        assert worker()[2].endswith(" ago")  # since when
        jobs = [c.submit([PY, "-c", "pass"], name=f"waits-{i}", priority=i) for i in range(3)]
        # the queue as the scheduler takes it: the highest priority first, each with its reason
        wait_until(lambda: [r[0] for r in rows(browser, "#queue")] == jobs[::-1], 30,
                   "the queue in scheduling order")
        assert all("drained" in r[5] for r in rows(browser, "#queue")), rows(browser, "#queue")
        c.request(p.Drain(node="worker", resume=True))
        wait_until(lambda: rows(browser, "#queue") == [], 60, "the queue emptied on the page")
        assert worker()[1] == "alive"


def test_the_parallel_coordinates_filter_changes_what_is_drawn(stack, browser, tmp_path):
    gate = tmp_path / "go"
    gate.write_text("")
    sid = sweep(stack, tmp_path / "proj",
                f"name: pc\ncommand: [{PY}, train.py, '{{lr}}', '{{depth}}']\nmetric: loss\n"
                "mode: min\nmethod: random\nsamples: 6\nseed: 3\n"
                "space:\n  lr: {low: 0.001, high: 0.1, log: true}\n  depth: [2, 4, 8]\n", gate)
    with Client(stack.broker.address) as c:
        wait_until(lambda: c.sql("SELECT count(*) AS n FROM leaderboard WHERE sweep_id = ?",
                                 [sid]).to_pylist()[0]["n"] == 6, 120, "6 ranked trials")
    browser.get(f"{stack.url}/sweeps/{sid}")
    lines = lambda: len(browser.find_elements("css selector", "#pc .pc-line"))  # noqa: E731
    wait_until(lambda: lines() == 6, 30, "a line per trial")
    kinds = dict(js(browser, "[...document.querySelectorAll('#pc .axis')]"
                             ".map(a => [a.dataset.axis, a.dataset.kind])"))
    assert kinds == {"lr": "log", "depth": "linear", "loss": "linear"}
    top = browser.find_element("id", "top")  # typed into, as a user does
    top.clear()
    top.send_keys("3\n")
    wait_until(lambda: lines() == 3, 30, "only the best 3 drawn")
    drawn = set(js(browser, "[...document.querySelectorAll('#pc .pc-line')].map(e => e.dataset.job)"))
    with Client(stack.broker.address) as c:
        best3 = {r["job_id"] for r in c.sql(
            "SELECT job_id FROM leaderboard WHERE sweep_id = ? AND rank <= 3", [sid]).to_pylist()}
    assert drawn == best3
    # the report's files, written on asking and linked
    js(browser, "document.getElementById('report').click()")
    links = "[...document.querySelectorAll('#reportfiles a')].map(a => a.href)"
    wait_until(lambda: any(h.endswith("/comparison.csv") for h in js(browser, links)), 60,
               "links to the report's files")
    href = next(h for h in js(browser, links) if h.endswith("/comparison.csv"))
    with urllib.request.urlopen(href, timeout=10) as r:
        table = list(csv.DictReader(io.StringIO(r.read().decode())))
    assert best3 <= {row["job_id"] for row in table}


LEARNS = """\
import math, sys, time, evo
lr, width = float(sys.argv[1]), int(sys.argv[2])
loss = 2.0
for epoch in range(1, 10):
    loss = loss * (0.8 + 2 * abs(math.log10(lr) + 2) / 10) + 0.002 * width
    evo.report(step=epoch, loss=loss)
    time.sleep(0.1)  # an epoch's work: a pruned trial is stopped before it ends
evo.result(loss=loss)
"""


def test_a_learning_sweep_shows_its_convergence_and_pruning_per_rung(stack, browser, tmp_path):
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "learn.py").write_text(LEARNS)
    (proj / "tpe.yaml").write_text(
        f"name: learns\ncommand: [{PY}, learn.py, '{{lr}}', '{{width}}']\nmethod: tpe\n"
        "samples: 16\nseed: 1\nstartup_trials: 4\nmetric: loss\nmode: min\npruner: asha\n"
        "space:\n  lr: {low: 0.0001, high: 0.1, log: true}\n  width: [16, 32, 64]\n")
    r = run_evo("sweep", "tpe.yaml", "--wait", home=stack.home, cwd=proj, timeout=110)
    assert r.returncode == 0, r.stderr
    sid = next(w for w in r.stdout.split() if w.startswith("s") and w[1:].isdigit())
    with Client(stack.broker.address) as c:
        rungs = {row["r"]: row["n"] for row in c.sql(
            "SELECT CAST(e.payload ->> '$.resource' AS INTEGER) AS r, count(*) AS n FROM events e "
            "JOIN jobs j USING (job_id) WHERE e.type = 'PruneRequested' AND j.sweep_id = ? "
            "AND j.state = 'pruned' GROUP BY 1", [sid]).to_pylist()}
        best = c.sql("SELECT value FROM leaderboard WHERE sweep_id = ? AND rank = 1",
                     [sid]).to_pylist()[0]["value"]
    assert rungs, "the sweep pruned nothing: the test shows nothing"
    browser.get(f"{stack.url}/sweeps/{sid}")
    bars = "document.getElementById('pruned').data"
    wait_until(lambda: js(browser, f"({bars} || []).length") == 1, 30, "the pruning chart")
    drawn = dict(zip(js(browser, bars + "[0].x"), js(browser, bars + "[0].y")))
    assert drawn == {str(k): v for k, v in rungs.items()}  # the pruner's rungs, not last reports
    assert chip(browser, "pruned") == str(sum(rungs.values()))
    line = js(browser, "document.getElementById('convergence').data[1]")
    assert line["x"] == list(range(1, 17))  # every trial asked, in order
    assert line["y"][-1] == best
    assert "evo audit" in text(browser, "commands")


def test_a_job_page_shows_its_curves_and_output(stack, browser, tmp_path):
    gate = tmp_path / "go"
    sid = sweep(stack, tmp_path / "proj", f"name: one\ncommand: [{PY}, train.py, '{{lr}}', '{{depth}}']\n"
                "metric: loss\nspace:\n  lr: [0.02]\n  depth: [3]\n", gate)
    with Client(stack.broker.address) as c:
        job_id = wait_until(lambda: c.sql("SELECT job_id FROM jobs WHERE sweep_id = ?", [sid])
                            .to_pylist(), 30, "the job")[0]["job_id"]
    browser.get(f"{stack.url}/jobs/{job_id}")
    wait_until(lambda: text(browser, "state") in ("queued", "leased", "running"), 30,
               "the job's page")
    loaded = js(browser, "window.evoLoadedAt")
    gate.write_text("")
    wait_until(lambda: text(browser, "state") == "completed", 60,
               "the job completed, on the page")
    curve = "(document.getElementById('curves').data || [])"
    wait_until(lambda: js(browser, curve + ".length") == 1, 30, "the loss curve")
    assert js(browser, curve + "[0].x") == [1, 2, 3, 4, 5]
    assert js(browser, curve + "[0].name") == "loss"
    wait_until(lambda: "trial lr=0.02 depth=3" in text(browser, "stdout"), 30,
               "the job's output")
    assert js(browser, "window.evoLoadedAt") == loaded
    commands = text(browser, "commands")
    assert f"evo retry {job_id}" in commands and f"evo audit {job_id}" in commands
    assert rows(browser, "#attempts")[0][:2] == ["1", "worker"]
    wait_until(lambda: [r[1:3] for r in rows(browser, "#checkpoints")] == [["3", "state.txt"]],
               30, "the job's checkpoint")
    assert '"tree"' in text(browser, "fingerprints")  # its code's digest


def test_the_jobs_list_filters_and_pages_on_the_server(stack, browser):
    with Client(stack.broker.address) as c:
        for i in range(7):  # enough for three pages of three, whatever ran before
            c.submit([PY, "-c", "pass"], name=f"paged-{i}")
        wait_until(lambda: c.sql("SELECT count(*) AS n FROM jobs WHERE state IN "
                                 "('queued', 'leased', 'running')").to_pylist()[0]["n"] == 0,
                   60, "every job ended")
        ids = [r["job_id"] for r in c.sql("SELECT job_id FROM jobs WHERE state = 'completed' "
                                          "ORDER BY submitted_seq DESC").to_pylist()]
    browser.get(stack.url + "/jobs?state=completed&size=3")
    wait_until(lambda: text(browser, "range") == f"1-3 of {len(ids)}", 30, "the first page")
    assert [r[0] for r in rows(browser, "#jobs")] == ids[:3]  # newest first
    js(browser, "document.getElementById('next').click()")
    wait_until(lambda: text(browser, "range") == f"4-6 of {len(ids)}", 30, "the second page")
    assert [r[0] for r in rows(browser, "#jobs")] == ids[3:6]
    assert {r[4] for r in rows(browser, "#jobs")} == {"completed"}
    # a filter that matches nothing: an empty page, said so
    browser.get(stack.url + "/jobs?state=failed")
    wait_until(lambda: text(browser, "range") == "0-0 of 0", 30, "no failed jobs")
    assert rows(browser, "#jobs") == []


def test_events_page_tails_live_and_the_assets_are_local(stack, browser):
    browser.get(stack.url + "/events")
    wait_until(lambda: js(browser, "document.getElementById('live').textContent") == "live", 30,
               "the event stream")
    new = "[...document.querySelectorAll('#events tbody tr.new')].map(r => r.textContent)"
    before = len(js(browser, new))
    with Client(stack.broker.address) as c:
        job = c.submit([PY, "-c", "print(1)"])
    wait_until(lambda: any(job in r for r in js(browser, new)), 30,
               "the new job's events on the page")
    assert before == 0  # what is marked new came by the stream, after the page loaded
    # every script and stylesheet comes from the page's own server (no CDN)
    srcs = js(browser, "[...document.querySelectorAll('script[src], link[href]')]"
                       ".map(e => e.src || e.href)")
    assert srcs and all(s.startswith(stack.url) for s in srcs)


def test_bad_options_are_one_line_and_exit_2(tmp_path):
    for args, named in ((["--port", "70000"], "--port"), (["--token", "a b;c"], "--token"),
                        (["--bind", "no-such-host.invalid"], "--bind")):
        r = run_evo("ui", *args, home=tmp_path / "nohome", timeout=30)
        assert r.returncode == 2 and named in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_the_page_waits_for_a_broker_that_is_not_up_yet(tmp_path, browser):
    """`evo broker & evo ui` (as `make demo` prints it): the page may come first."""
    home = tmp_path / "home"
    home.mkdir()
    port = free_port()
    env = {**os.environ, "EVO_HOME": str(home)}
    env.pop("EVO_BROKER", None)
    proc = subprocess.Popen(evo_cmd("ui", "--port", str(port)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=env, start_new_session=True)
    broker = None
    try:
        assert select.select([proc.stderr], [], [], 30)[0], "evo ui printed nothing"
        assert "no broker answers yet" in proc.stderr.readline().decode()
        url = f"http://127.0.0.1:{port}"
        assert _get(url + "/api/sweeps")[0] == 503
        browser.get(url + "/")
        live = lambda: js(browser, "document.getElementById('live').textContent")  # noqa: E731
        wait_until(lambda: live() == "broker away", 30, "the page to say there is no broker")
        broker = ProcBroker(home)
        wait_until(lambda: live() == "live", 60, "the page to find the broker")
        assert _get(url + "/api/sweeps")[0] == 200
    finally:
        proc.terminate()
        proc.wait(10)
        if broker is not None:
            broker.kill()
            broker.logfile.close()


def test_off_loopback_the_page_needs_its_token(stack):
    port = free_port()
    env = {**os.environ, "EVO_HOME": str(stack.home)}
    proc = subprocess.Popen(evo_cmd("ui", "--port", str(port), "--bind", "0.0.0.0"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                            start_new_session=True)
    try:
        assert select.select([proc.stderr], [], [], 30)[0], "evo ui printed nothing"
        line = proc.stderr.readline().decode()
        assert "?token=" in line, line
        token = line.split("?token=")[1].split()[0]
        base = f"http://127.0.0.1:{port}"
        for path in ("/api/sweeps", "/api/stream", f"/api/sweeps?token={token}x", "/"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(base + path, timeout=10)
            assert refused.value.code == 403, path
        with urllib.request.urlopen(f"{base}/api/sweeps?token={token}", timeout=10) as r:
            assert r.status == 200
            cookie = r.headers["Set-Cookie"].split(";")[0]
        assert cookie == f"evo_token_{port}={token}"
        with urllib.request.urlopen(urllib.request.Request(
                base + "/api/sweeps", headers={"Cookie": cookie}), timeout=10) as r:
            assert r.status == 200  # the cookie alone, from then on
    finally:
        proc.terminate()
        proc.wait(10)


def _get(url: str, headers: dict | None = None, method: str = "GET") -> tuple[int, dict]:
    import json

    req = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:  # a broker away: 5 s to say so
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, {}


def test_routes_clamp_pages_and_refuse_other_sites(stack):
    """Without a browser: the JSON routes as any client sees them."""
    status, first = _get(stack.url + "/api/jobs?page=-5&size=2")
    assert status == 200 and first["page"] == 0 and len(first["rows"]) == 2
    status, last = _get(stack.url + "/api/jobs?page=999999&size=2")
    assert last["page"] == (last["total"] - 1) // 2 and 1 <= len(last["rows"]) <= 2
    assert _get(stack.url + "/api/sweeps/nope")[1] == {"error": "no sweep 'nope'"}
    # another site's name pointed at 127.0.0.1 (DNS rebinding) gets nothing
    assert _get(stack.url + "/api/jobs", {"Host": "evil.example"})[0] == 400
    # the report is written only for the page's own POST
    sweep_id = _get(stack.url + "/api/sweeps")[1]["rows"][0]["sweep_id"]
    route = f"{stack.url}/api/sweeps/{sweep_id}/report"
    assert _get(route)[0] == 405
    assert _get(route, {"Origin": "http://evil.example"}, "POST")[0] == 403
    assert _get(route, {"Sec-Fetch-Site": "cross-site"}, "POST")[0] == 403
    status, made = _get(route, {"Origin": stack.url}, "POST")
    assert status == 200 and any(f.endswith("/comparison.csv") for f in made["files"])


def test_the_page_follows_a_broker_that_restarts(stack, browser, tmp_path):
    """Last in this module: it replaces the stack's broker."""
    browser.get(stack.url + "/")
    live = lambda: js(browser, "document.getElementById('live').textContent")  # noqa: E731
    wait_until(lambda: live() == "live", 30, "the event stream")
    stack.broker.kill()
    wait_until(lambda: live() == "broker away", 60, "the page to say the broker is away")
    assert _get(stack.url + "/api/sweeps")[0] == 503
    stack.broker = ProcBroker(stack.home)  # a new broker on the same log, at another port
    wait_until(lambda: live() == "live", 60, "the page to find the new broker")
    with Client(stack.broker.address) as c:
        job = c.submit([PY, "-c", "pass"], name="after-restart")
    browser.get(stack.url + "/events")
    wait_until(lambda: any(job == r[3] for r in rows(browser, "#events")), 30,
               "the new broker's events on the page")
    assert _get(stack.url + "/api/sweeps")[0] == 200
