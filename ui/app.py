"""`evo ui`: a read-only page over the projections and the live event relay (Starlette, Jinja2
templates, Plotly's JavaScript from its Python package: nothing is fetched from the network).

Pages are HTML shells; their data comes from the JSON routes under /api, each answered from
the broker's projection by the queries of ui/queries.py (bind parameters, DuckDB doing the
aggregation) and timed in a Server-Timing header. /api/stream is the relay as server-sent
events: a page refreshes what an event touches, without a reload.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import shlex
import threading
import time
from pathlib import Path
from typing import Any

import msgspec
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import (FileResponse, HTMLResponse, PlainTextResponse, Response,
                                 StreamingResponse)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from evo.direction import mode_in_sweep, sweep_metric
from evo.projections.files import json_cell

from . import queries as q
from .live import Relay

HERE = Path(__file__).resolve().parent
COMMANDS_SHOWN = ("why", "logs", "retry", "cancel")
LOOPBACK = ["127.0.0.1", "localhost", "::1", "[::1]"]
TOKEN_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def plotly_js() -> Path:
    import plotly

    return Path(plotly.__file__).parent / "package_data" / "plotly.min.js"


class Source:
    """The broker, one client per server thread (a zmq socket is not shared by threads)."""

    def __init__(self, broker: str | None, home: Any = None) -> None:
        self.broker, self.home = broker, home
        self.local = threading.local()
        self.made: list[Any] = []  # every thread's client, closed with the app
        self.lock = threading.Lock()

    def client(self):  # noqa: ANN201
        c = getattr(self.local, "client", None)
        if c is None:
            from evo.client import Client

            c = self.local.client = Client(self.broker, home=self.home, timeout_s=5)
            with self.lock:
                self.made.append(c)
        return c

    def drop(self) -> None:
        """Forget this thread's client (its broker went away): the next request finds the
        broker again (EVO_BROKER, broker.json), so a restarted broker is served."""
        c = getattr(self.local, "client", None)
        if c is not None:
            self.local.client = None
            with self.lock:
                if c in self.made:
                    self.made.remove(c)
            c.close()

    def close(self) -> None:
        with self.lock:
            for c in self.made:
                c.close()
            self.made.clear()

    def rows(self, query: q.Q) -> list[dict[str, Any]]:
        from evo.projections.files import from_ipc

        sql, params = query
        # a page waits 15 s at most: a query's own limit (300 s) is for `evo sql`
        return from_ipc(self.client().query(sql, params, timeout_s=15).arrow).to_pylist()

    def one(self, query: q.Q) -> dict[str, Any] | None:
        rows = self.rows(query)
        return rows[0] if rows else None


_encoder = msgspec.json.Encoder()


def answer(data: Any, started: float, status: int = 200) -> Response:
    ms = (time.perf_counter() - started) * 1000
    return Response(_encoder.encode(data), status_code=status, media_type="application/json",
                    headers={"Server-Timing": f"app;dur={ms:.1f}", "Cache-Control": "no-store"})


def guarded(src: Source, handler: Any) -> Any:
    """A route whose broker may be away: one line of JSON (503) instead of a traceback, and
    the next request looks for the broker afresh."""
    from evo.errors import EvoError

    @functools.wraps(handler)
    def route(request: Request) -> Response:
        try:
            return handler(request)
        except EvoError as exc:
            src.drop()
            return answer({"error": f"the broker: {exc}"}, time.perf_counter(), status=503)
    return route


def make_app(broker: str | None = None, home: Any = None, token: str | None = None,
             relay: bool = True, hosts: list[str] | None = None) -> Starlette:
    """``hosts``: the Host headers served (default loopback's names: a page on another site
    that points its own name at 127.0.0.1 is refused); ``token``: asked of every request."""
    src = Source(broker, home)
    live = Relay(broker, home) if relay else None
    env = Environment(loader=FileSystemLoader(HERE / "templates"),
                      autoescape=select_autoescape(["html"]))

    def page(name: str, **context: Any):  # noqa: ANN202
        async def render(request: Request) -> HTMLResponse:
            args = {k: request.path_params.get(k, "") for k in ("job_id", "sweep_id")}
            return HTMLResponse(env.get_template(f"{name}.html").render(
                page=name, **args, **context))
        return render

    # --- the JSON routes (run in Starlette's thread pool: each blocks on the broker) ---------

    def overview(request: Request) -> Response:
        t0 = time.perf_counter()
        from evo.broker import protocol as p

        c = src.client()
        # the queue as the scheduler will take it, each job with `evo why`'s words
        status = c.request(p.Status(order=q.QUEUE))
        assert isinstance(status, p.StatusReply)
        queue = status.order
        summary = {r["node"]: r for r in src.rows(q.node_summary())}
        nodes = []
        for n in status.nodes:
            s = summary.get(n["node"], {})
            state = ("drained" if n.get("drained") else "alive") if n["alive"] else (
                n.get("gone") or "left")
            nodes.append({**n, "state": state, "busy_fraction": s.get("busy_fraction"),
                          "jobs_completed": s.get("jobs_completed", 0)})
        return answer({"seq": status.last_seq, "counts": status.jobs, "queue": queue,
                       "nodes": nodes, "cpu": src.rows(q.cpu_series()),
                       "gpu": src.rows(q.gpu_series()), "now": time.time()}, t0)

    def jobs(request: Request) -> Response:
        t0 = time.perf_counter()
        filters = {k: request.query_params.get(k) or None for k in q.FILTERS}
        size = max(1, min(_int(request.query_params.get("size"), q.PAGE), 500))
        total = (src.one(q.jobs_total(filters)) or {}).get("n", 0)
        page_no = max(0, min(_int(request.query_params.get("page"), 0), (total - 1) // size))
        rows = src.rows(q.jobs_page(filters, page_no, size))
        options: dict[str, list] = {k: [] for k in q.FILTERS}
        for r in src.rows(q.choices()):
            if r["v"] is not None:
                options[r["k"]].append(r["v"])
        return answer({"rows": rows, "total": total, "page": page_no, "size": size,
                       "filters": filters, "options": options}, t0)

    def job(request: Request) -> Response:
        t0 = time.perf_counter()
        job_id = request.path_params["job_id"]
        row = src.one(q.job(job_id))
        if row is None:
            return answer({"error": f"no job {job_id!r}"}, t0)
        for k in ("params", "metrics", "artifacts", "command", "tags", "spec"):
            row[k] = json_cell(row[k])
        tries = src.rows(q.attempts(job_id))
        for a in tries:
            a["devices"], a["env"] = json_cell(a["devices"]), json_cell(a["env"])
        spec = row.get("spec") or {}
        quoted = shlex.quote(job_id)
        commands = [f"evo {verb} {quoted}" for verb in COMMANDS_SHOWN]
        if row.get("state") == "completed":
            commands.append(f"evo audit {quoted}")
        if row.get("sweep_id"):
            commands.append(f"evo leaderboard {shlex.quote(row['sweep_id'])}")
        return answer({"job": row, "attempts": tries, "curves": src.rows(q.curves([job_id])),
                       "checkpoints": src.rows(q.checkpoints(job_id)),
                       "output": _tail(src, job_id),
                       "fingerprints": {"code": spec.get("code") or {},
                                        "data": spec.get("data") or {},
                                        "tree": spec.get("tree") or ""},
                       "commands": commands}, t0)

    def sweeps(request: Request) -> Response:
        t0 = time.perf_counter()
        return answer({"rows": src.rows(q.sweeps())}, t0)

    def sweep(request: Request) -> Response:
        t0 = time.perf_counter()
        sweep_id = request.path_params["sweep_id"]
        row = src.one(q.sweep(sweep_id))
        if row is None:
            return answer({"error": f"no sweep {sweep_id!r}"}, t0)
        spec = json_cell(row.pop("spec")) or {}
        metric = request.query_params.get("metric") or sweep_metric(spec)
        top = max(1, min(_int(request.query_params.get("top"), 50), 10_000))
        board = src.rows(q.leaderboard(sweep_id, metric, top)) if metric else []
        for r in board:
            r["params"] = json_cell(r["params"]) or {}
        ranked = (src.one(q.ranked(sweep_id, metric)) or {}).get("n", 0) if metric else 0
        from evo.sweeps.summary import best_so_far

        mode = mode_in_sweep(metric, spec)
        sid = shlex.quote(sweep_id)
        literal = sweep_id.replace("'", "''")
        return answer({"sweep": row, "metric": metric, "mode": spec.get("mode"),
                       "lower_is_better": mode == "min",
                       "method": spec.get("method") or "grid", "space": spec.get("space") or {},
                       "pruner": spec.get("pruner"),
                       "leaderboard": board, "ranked": ranked, "top": top,
                       "convergence": [{"trial": t, "value": v, "best": b} for t, _, _, v, b in
                                       best_so_far(src.rows(q.convergence(sweep_id, metric)),
                                                   mode)],
                       "pruned": src.rows(q.pruned_by_rung(sweep_id)),
                       "commands": [f"evo leaderboard {sid}",
                                    f"evo report {sid} --out {shlex.quote('report-' + sweep_id)}",
                                    f"evo audit {sid}" if spec.get("method") == "tpe"
                                    else "evo sql " + shlex.quote(
                                        f"SELECT * FROM leaderboard WHERE sweep_id = '{literal}'")]},
                      t0)

    from evo.home import evo_home

    reports = Path(evo_home(home)) / "ui" / "reports"
    writing = threading.Lock()

    def report(request: Request) -> Response:
        """The sweep's report (`evo report`'s files), written on first asking into
        EVO_HOME/ui/reports/<sweep>-<its finished count>, so a sweep that moved on gets a new
        one; the answer lists the files, served under /reports/."""
        t0 = time.perf_counter()
        from evo.errors import EvoError
        from evo.trainers.report import write_report

        if not _same_origin(request):  # it writes files: only this page's own button
            return answer({"error": "the report is written for this page's own requests"}, t0,
                          status=403)

        sweep_id = request.path_params["sweep_id"]
        row = src.one(q.sweep(sweep_id))
        if row is None:
            return answer({"error": f"no sweep {sweep_id!r}"}, t0)
        done = sum(row.get(k) or 0 for k in ("completed", "failed", "cancelled", "pruned"))
        folder = reports / f"{sweep_id}-{done}"
        notes: list[str] = []
        with writing:  # one report at a time: each takes seconds of matplotlib
            if not (folder / ".done").exists():
                try:
                    _, notes = write_report(sweep_id, lambda sql, ps=(): src.client().sql(sql, ps),
                                            folder)
                except EvoError as exc:
                    return answer({"error": str(exc)}, t0)
                (folder / ".done").write_text("\n".join(notes))
            else:
                notes = [n for n in (folder / ".done").read_text().splitlines() if n]
        files = sorted(str(f.relative_to(reports)) for f in folder.rglob("*")
                       if f.is_file() and f.name != ".done")
        return answer({"files": [f"/reports/{f}" for f in files], "notes": notes}, t0)

    def curves(request: Request) -> Response:
        t0 = time.perf_counter()
        ids = [j for j in (request.query_params.get("jobs") or "").split(",") if j][:50]
        return answer({"curves": src.rows(q.curves(ids)) if ids else []}, t0)

    def events(request: Request) -> Response:
        t0 = time.perf_counter()
        type_ = request.query_params.get("type") or None
        job_id = request.query_params.get("job") or None
        from evo.events.schema import EVENT_TYPES

        return answer({"rows": src.rows(q.events(type_, job_id)),
                       "types": sorted(EVENT_TYPES)}, t0)

    async def stream(request: Request) -> Response:
        if live is None:
            return PlainTextResponse("no relay", status_code=404)
        relay_ = live

        async def feed():  # noqa: ANN202
            queue = relay_.subscribe()  # here, so whatever ends the stream unsubscribes it
            try:
                yield b"retry: 1000\n\n"
                if relay_.away:  # a page that comes while the broker is away is told so
                    yield b"data: " + _encoder.encode({"type": "BrokerAway",
                                                       "error": relay_.away}) + b"\n\n"
                while True:
                    try:
                        item = await asyncio.wait_for(queue.get(), 15.0)
                    except asyncio.TimeoutError:
                        yield b": keep-alive\n\n"  # and a gone page is noticed
                        continue
                    yield b"data: " + _encoder.encode(item) + b"\n\n"
            finally:
                relay_.unsubscribe(queue)

        return StreamingResponse(feed(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store"})

    async def plotly(request: Request) -> FileResponse:
        return FileResponse(plotly_js(), media_type="text/javascript",
                            headers={"Cache-Control": "max-age=86400"})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):  # noqa: ANN202
        if live is not None:
            live.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            if live is not None:
                live.stop.set()
            src.close()

    overview, jobs, job, sweeps, sweep, report, curves, events = (
        guarded(src, h) for h in (overview, jobs, job, sweeps, sweep, report, curves, events))
    routes = [
        Route("/", page("overview")),
        Route("/jobs", page("jobs")),
        Route("/jobs/{job_id}", page("job")),
        Route("/sweeps", page("sweeps")),
        Route("/sweeps/{sweep_id}", page("sweep")),
        Route("/events", page("events")),
        Route("/api/overview", overview),
        Route("/api/jobs", jobs),
        Route("/api/jobs/{job_id}", job),
        Route("/api/sweeps", sweeps),
        Route("/api/sweeps/{sweep_id}", sweep),
        Route("/api/sweeps/{sweep_id}/report", report, methods=["POST"]),
        Route("/api/curves", curves),
        Route("/api/events", events),
        Route("/api/stream", stream),
        Route("/static/plotly.min.js", plotly),
        Route("/favicon.ico", lambda request: Response(status_code=204)),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        Mount("/reports", StaticFiles(directory=reports, check_dir=False), name="reports"),
    ]
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=hosts or LOOPBACK)]
    if token:
        middleware.append(Middleware(TokenGate, token=token))
    return Starlette(routes=routes, middleware=middleware, lifespan=lifespan)


def _same_origin(request: Request) -> bool:
    """A request the page's own script made: a browser names the origin of a cross-site POST
    (Origin, Sec-Fetch-Site), and a form on another site cannot hide it."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    origin = request.headers.get("origin")
    return origin is None or origin.split("://", 1)[-1] == request.headers.get("host", "")


def _int(value: str | None, default: int) -> int:
    try:
        return int(value) if value is not None else default
    except ValueError:
        return default


def _tail(src: Source, job_id: str, size: int = 16_384) -> dict[str, Any]:
    """The last ``size`` bytes of the job's stdout and stderr, as the broker stores them."""
    from evo.errors import EvoError

    out: dict[str, Any] = {}
    for stream in ("stdout", "stderr"):
        try:
            c = src.client()
            head = c.logs(job_id, stream=stream, limit=0)
            chunk = c.logs(job_id, stream=stream, offset=max(head.size - size, 0), limit=size)
            out[stream] = chunk.data.decode("utf-8", "replace")
        except EvoError:
            out[stream] = ""
    return out


class TokenGate:
    """Off loopback the page asks for its token: ``?token=`` once (then a cookie). Plain
    ASGI, so the event stream passes through it unbuffered."""

    def __init__(self, app: Any, token: str) -> None:
        self.app, self.token = app, token

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":  # nothing else is served
            return
        request = Request(scope)
        port = (scope.get("server") or ("", 0))[1]
        name = f"evo_token_{port}"  # cookies are not kept per port: one per `evo ui`
        offered = request.query_params.get("token")
        given = offered or request.cookies.get(name) or ""
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            await PlainTextResponse("evo ui: this page needs its token (?token=...)",
                                    status_code=403)(scope, receive, send)
            return
        if not offered:
            await self.app(scope, receive, send)
            return

        async def with_cookie(message: Any) -> None:
            if message["type"] == "http.response.start":
                cookie = f"{name}={self.token}; HttpOnly; SameSite=Strict; Path=/"
                message = {**message, "headers": [*message.get("headers", []),
                                                   (b"set-cookie", cookie.encode())]}
            await send(message)

        await self.app(scope, receive, with_cookie)
