"""`evo log check` and `evo log salvage`: what is damaged in a log, and going on from its prefix."""

from __future__ import annotations

from pathlib import Path

import typer

from evo.errors import BadInput, EvoError
from evo.home import evo_home

log_app = typer.Typer(no_args_is_help=True, help="Check the event log; save its valid prefix.")


def _log_dir() -> Path:
    d = evo_home() / "log"
    if not d.is_dir():
        raise BadInput(f"no event log at {d} (give --home or set EVO_HOME)")
    return d


@log_app.command("check")
def check_cmd(fold: bool = typer.Option(True, "--fold/--no-fold",
                                        help="also fold every event into the state (slower)")) -> None:
    """Scan every segment; one line per problem (segment, offset, last good seq, what is
    wrong). Exit 1 when anything is damaged."""
    from evo.events.damage import check, projection_seq

    d = _log_dir()
    found = check(d, fold=fold)
    for p in found.problems:
        typer.echo(p.line())
    seen = projection_seq(evo_home())
    if seen is not None and seen > found.last_seq:
        typer.echo(f"the projection ({evo_home() / 'evo.duckdb'}) has applied events up to seq "
                   f"{seen}, but the log ends at seq {found.last_seq}: events "
                   f"{found.last_seq + 1}..{seen} are missing (a last segment deleted or cut?)")
        found.problems.append(None)  # type: ignore[arg-type]
    for note in found.notes:
        typer.echo(f"note: {note}")
    if fold and not found.problems:  # the broker's snapshots: each the fold of the log to it
        from evo.broker.snapshot import verify
        from evo.events.log import SegmentLog

        for line, same in verify(evo_home(), SegmentLog(d, readonly=True)):
            typer.echo(line)
            if not same:
                found.problems.append(None)  # type: ignore[arg-type]
    summary = (f"{d}: {found.segments} segment(s), {found.events:,} event(s) read back, "
               f"seqs 1..{found.last_seq}")
    if not found.problems:
        typer.echo(f"{summary}: no damage")
        return
    typer.echo(f"{summary}: {len(found.problems)} problem(s); the whole prefix is seqs "
               f"1..{found.prefix} (`evo log salvage --to DIR` writes it as a new log)")
    raise typer.Exit(1)


@log_app.command("salvage")
def salvage_cmd(to: Path = typer.Option(..., "--to", help="a new, empty home for the saved log")) -> None:
    """Write the longest valid prefix of the log (seq 1 on, whole, decodable, folding) as a new
    log under DIR, byte for byte. The damaged log is left as it was."""
    from evo.events.damage import check, salvage

    d = _log_dir()
    to = to.absolute()
    if to == evo_home():
        raise BadInput("--to: give a new home, not the one being salvaged")
    found = check(d)
    if not found.problems:
        typer.echo(f"{d} has no damage; nothing to salvage (copy it if you want a second one)")
        return
    try:
        n = salvage(d, to / "log", found.prefix)
    except FileExistsError as exc:
        raise BadInput(f"--to: {exc}") from None
    except OSError as exc:
        raise EvoError(f"salvage to {to}: {exc}") from None
    first = found.problems[0]
    typer.echo(f"wrote seqs 1..{found.prefix} ({n:,} events) to {to / 'log'}; left out: from "
               f"{first.segment} offset {first.offset} on ({first.what})")
    typer.echo(f"go on from it with: evo --home {to} broker   (the projections are rebuilt "
               f"from the log; job output stays in {evo_home() / 'logs'})")
