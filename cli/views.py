"""Rich renderings shared by CLI commands."""

from __future__ import annotations

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from evo.broker import protocol as p

console = Console()


def status_view(st: p.StatusReply, show: int = 10) -> Group:
    """Job counts, nodes, running and queued jobs as one renderable (printed or live)."""
    parts: list[RenderableType] = []
    counts = "  ".join(f"{k} {v}" for k, v in sorted(st.jobs.items())) or "no jobs"
    parts.append(Text.from_markup(f"[bold]seq {st.last_seq}[/bold]  jobs: {counts}"))
    if st.nodes:
        t = Table(title="nodes", title_justify="left")
        ends = any("ends_in_s" in n for n in st.nodes)  # a Slurm pilot's time left
        for col in ("node", "alive", "labels", "slots", "running", "cpus", "mem GB", "GPUs",
                    *(("ends in",) if ends else ())):
            t.add_column(col)
        gone = []
        for n in st.nodes:
            alive = ("drained" if n.get("drained") else "yes") if n["alive"] else n.get("gone") or "no"
            left = n.get("ends_in_s")
            t.add_row(n["node"], alive, ",".join(n["labels"]),
                      str(n["slots"]), str(n["running"]), f"{n['cpus']:g}",
                      f"{n['mem_gb']:.1f}", str(n["gpus"]),
                      *((f"{left:.0f}s" if left is not None else "",) if ends else ()))
            if not n["alive"] and n.get("gone") == "lost":
                gone.append(gone_line(n))
        parts.append(t)
        parts += [Text(line, style="yellow") for line in gone]
    for title, rows, cols in (
            ("running", st.running, ("job_id", "node", "attempt", "elapsed_s", "last", "name")),
            ("queued", st.queued, ("job_id", "priority", "attempt", "held", "on", "name")),
            ("failed", st.failed, ("job_id", "attempt", "name", "error"))):
        if rows:
            t = Table(title=title, title_justify="left")
            for col in cols:
                t.add_column(col)
            total = {"queued": st.jobs.get("queued", 0), "failed": st.jobs.get("failed", 0)}.get(
                title, len(rows))
            for r in rows[:show]:
                t.add_row(*(_cell(r.get(c)) for c in cols))
            if total > show:
                t.caption = f"... and {total - show} more {title}"
            parts.append(t)
    return Group(*parts)


def gone_line(n: dict) -> str:
    """``gpu-1 lost at 14:02:11 (5m ago): 12 queued jobs prefer it; they fall back now``."""
    import time

    since = n.get("since") or 0.0
    ago = max(0.0, time.time() - since)
    head = (f"{n['node']} lost at {time.strftime('%H:%M:%S', time.localtime(since))} "
            f"({_ago(ago)} ago)")
    prefer = n.get("prefer", 0)
    if not prefer:
        return f"{head}: no queued job prefers it"
    wait = n.get("fall_back_s", 0.0)
    when = "now (no node they prefer is present)" if not wait else f"in {_ago(wait)}"
    return f"{head}: {prefer} queued job(s) prefer it; they fall back to other nodes {when}"


def _ago(s: float) -> str:
    if s < 90:
        return f"{s:.0f}s"
    if s < 5400:
        return f"{s / 60:.0f}m"
    return f"{s / 3600:.1f}h"


def _cell(v: object) -> str:
    if v is None or v is False:
        return ""
    return "yes" if v is True else str(v)


def render_status(st: p.StatusReply, show: int = 10) -> None:
    console.print(status_view(st, show))
