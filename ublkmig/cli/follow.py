"""Following a running migration until it ends (or is in sync): a live progress bar on a
terminal, else a line per phase, then its end as one line."""

from __future__ import annotations

import sys
from typing import Any

import click

from ublkmig.cli.render import _ms, _percent, _phase_line, _progress_text
from ublkmig.client import Client, DaemonGone
from ublkmig.errors import UserError
from ublkmig.units import format_duration

FOLLOW_INTERVAL = 0.5


def _follow(device: int, *, stop_in_sync: bool, quiet: bool = False) -> dict[str, Any]:
    """Poll the migration of DEVICE until it ends (or, with stop_in_sync, is in sync): a live
    progress bar on a terminal, else a line per phase (none with quiet).  Returns its last
    status."""
    tty = sys.stdout.isatty() and not quiet
    last_phase = ""
    progress = task = None
    if tty:
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

        progress = Progress(
            TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
            TextColumn("{task.fields[detail]}"),
        )  # fmt: skip
        progress.start()
        task = progress.add_task("", total=100.0, detail="")

    def show(mig: dict[str, Any]) -> None:
        nonlocal last_phase
        phase = mig["phase"]
        if progress is not None and task is not None:
            progress.update(
                task, completed=_percent(mig), description=f"{mig['mode']} {phase}",
                detail=_progress_text(mig),
            )  # fmt: skip
            if phase != last_phase:
                progress.console.print(_phase_line(mig), markup=False, highlight=False)
        elif phase != last_phase and not quiet:
            click.echo(_phase_line(mig))
        last_phase = phase

    client = Client(device)
    try:
        return client.wait_migration(
            (lambda mig: mig["phase"] == "in-sync") if stop_in_sync else None,
            interval=FOLLOW_INTERVAL, on_status=show,
        )  # fmt: skip
    except DaemonGone:
        raise UserError(f"the daemon of {client.node} went away") from None
    finally:
        if progress is not None:
            progress.stop()


def _finish_follow(device: int, mig: dict[str, Any]) -> int:
    """The end of a followed migration, as one line; UserError if it failed or was cancelled."""
    phase = mig["phase"]
    if phase == "completed":
        details = [f"in {format_duration(mig['elapsed'])}"]
        if mig.get("cutover_pause_ms") is not None:
            details.append(f"cutover pause {_ms(mig['cutover_pause_ms'])}")
        if mig.get("cutover_stall_ms") is not None:
            details.append(f"cutover stall {_ms(mig['cutover_stall_ms'])}")
        if mig.get("final_pause_ms") is not None:
            details.append(f"final pause {_ms(mig['final_pause_ms'])}")
        click.echo(f"completed: {mig['device']} now serves {mig['dest']} ({', '.join(details)})")
        return 0
    if phase == "in-sync":
        click.echo(
            f"in sync: {mig['device']} is kept in sync with {mig['dest']}; `ublkmig cutover "
            f"{mig['device']}` switches"
        )
        return 0
    if phase == "cancelled":
        raise UserError(
            f"the migration of {mig['device']} was cancelled; it keeps serving {mig['source']}"
        )
    raise UserError(
        f"the migration of {mig['device']} failed: {mig.get('error') or 'unknown error'}; "
        f"it keeps serving {mig['source']}"
    )
