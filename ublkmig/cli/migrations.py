"""The migration commands: ``migrate``, ``status``, ``cutover``, ``cancel``, ``speed``.

What they print of a migration is in render.py; following one until it ends (``--wait``,
``--watch``, a cutover or a cancel) is in follow.py.
"""

from __future__ import annotations

import json
import os

import click

from ublkmig import native
from ublkmig.cli.follow import _finish_follow, _follow
from ublkmig.cli.group import cli
from ublkmig.cli.params import DeviceId, Rate, Size
from ublkmig.cli.render import ENDED, _status_lines
from ublkmig.client import Client, MigrateRequest
from ublkmig.errors import UserError
from ublkmig.migration.options import DEFAULT_FALLBACK_WAIT_MS, Mode
from ublkmig.units import format_rate, format_size, parse_rate

MODES = tuple(str(m) for m in Mode)


@cli.command()
@click.argument("device", type=DeviceId())
@click.option(
    "--to",
    "dest",
    default=None,
    help="Destination: a file (created at the source's size if missing), a block device, or "
    "an NBD export: nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH.",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Instead of --to: go on with the migration DEVICE's last daemon left when it died "
    "(same destination and options; --speed may change).  What the destination already "
    "holds is compared, and only what differs is written.",
)
@click.option(
    "--mode",
    type=click.Choice(MODES),
    default="auto",
    show_default=True,
    help="auto: mirror, falling back to dirty tracking while mirrored writes wait too long "
    "for the destination, mirroring again to converge; no pause.  mirror: one pass, guest "
    "writes mirrored, no pause.  dbt: dirty block tracking, passes until few dirty chunks, "
    "then the writes mirrored for a last pass; no pause.  snapshot: guest writes go to a "
    "delta while the base is copied, deltas folded until small, then the writes mirrored "
    "for a last pass; no pause.",
)
@click.option(
    "--fallback-wait",
    type=float,
    default=DEFAULT_FALLBACK_WAIT_MS,
    show_default=True,
    metavar="MS",
    help="auto: fall back to dirty tracking when mirrored writes wait this many "
    "milliseconds on average for the destination after the source is done (sustained).",
)
@click.option(
    "--dest-timeout",
    type=float,
    default=native.DEFAULT_NBD_TIMEOUT,
    show_default=True,
    metavar="SECONDS",
    help="An NBD destination: the longest wait for the server (a reply, connecting, the "
    "handshake).  Past it the connection counts as lost: guest writes complete from the "
    "source, their chunks are copied again, and the migration reconnects.",
)
@click.option(
    "--chunk-size",
    type=Size(),
    default="1M",
    show_default=True,
    help="Copy unit: a power of two from 64K to 64M.",
)
@click.option(
    "--speed", type=Rate(), default=None, help="Copier speed limit in bytes/s (e.g. 200M); none."
)
@click.option(
    "--no-yield",
    is_flag=True,
    help="Copy at full speed even while the guest has I/O in flight; by default the copier "
    "then yields to the guest: it copies a chunk at a time (not 4) and rests between chunks "
    "as long as it takes for the guest to keep 3/4 of its rate (measured while it rests), "
    "at most 3 times as long as it copies.",
)
@click.option(
    "--no-cutover",
    is_flag=True,
    help="Stay in sync instead of switching; `ublkmig cutover DEVICE` switches.",
)
@click.option(
    "--verify",
    is_flag=True,
    help="Compare the destination with the disk before switching, guest I/O paused (this adds "
    "a pause: no mode has one otherwise).  A difference fails the migration.",
)
@click.option(
    "--wait",
    is_flag=True,
    help="Follow the migration until it ends (with --no-cutover: until in sync); exit 1 if it "
    "failed or was cancelled.",
)
@click.pass_context
def migrate(
    ctx: click.Context,
    device: int,
    dest: str | None,
    resume: bool,
    mode: str,
    fallback_wait: float,
    dest_timeout: float,
    chunk_size: int,
    speed: int | None,
    no_yield: bool,
    no_cutover: bool,
    verify: bool,
    wait: bool,
) -> int:
    """Move the data of DEVICE (/dev/ublkbN or N) to DEST while the guest keeps using it.

    When the copy is in sync the device switches to DEST: the same /dev/ublkbN goes on
    serving, now from DEST.  A cancelled or failed migration leaves the source as it was.
    """
    from ublkmig.migration import (
        check_chunk_size,
        check_dest_timeout,
        check_fallback_wait,
        check_speed,
        is_nbd_uri,
    )

    check_chunk_size(chunk_size)
    check_speed(speed)
    check_fallback_wait(fallback_wait)
    check_dest_timeout(dest_timeout)
    if resume:
        given = [f"--{n.replace('_', '-')}" for n in
                 ("dest", "mode", "fallback_wait", "dest_timeout", "chunk_size", "no_yield",
                  "no_cutover", "verify")
                 if ctx.get_parameter_source(n) is click.core.ParameterSource.COMMANDLINE]
        if given:
            what = ", ".join(g.replace("--dest", "--to") for g in given)
            raise UserError(f"--resume takes the interrupted migration's options: not {what}")
        mig = Client(device).resume(speed)
    elif dest is None:
        raise UserError("migrate needs --to DEST (or --resume)")
    else:
        to = dest if is_nbd_uri(dest) else os.path.abspath(dest)
        mig = Client(device).migrate(MigrateRequest(
            to=to, mode=mode, chunk_size=chunk_size, speed=speed, no_cutover=no_cutover,
            verify=verify, yields=not no_yield, fallback_wait_ms=fallback_wait,
            dest_timeout=dest_timeout,
        ))  # fmt: skip
    no_cutover = bool(mig.get("no_cutover", no_cutover))
    limit_to = mig.get("speed", speed)
    limit = f", at most {format_rate(limit_to)}" if limit_to else ""
    click.echo(
        f"{'resuming the migration of' if resume else 'migrating'} {mig['device']} to "
        f"{mig['dest']} ({mig['mode']}, chunks of {format_size(mig['chunk_size'])}{limit})"
    )
    if not wait:
        return 0
    return _finish_follow(device, _follow(device, stop_in_sync=no_cutover))


@cli.command()
@click.argument("device", type=DeviceId())
@click.option("--json", "as_json", is_flag=True, help="As a JSON object.")
@click.option("--watch", is_flag=True, help="A live progress bar until the migration ends.")
def status(device: int, as_json: bool, watch: bool) -> int:
    """The device and its migration: mode, phase, pass, cursor, bytes copied / to copy, dirty
    chunks, rate, ETA, guest I/O counters."""
    st = Client(device).status()
    mig = st.get("migration")
    if watch and mig is not None and mig["phase"] not in ENDED:
        return _finish_follow(device, _follow(device, stop_in_sync=False))
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return 0
    for line in _status_lines(st):
        click.echo(line)
    return 0


@cli.command()
@click.argument("device", type=DeviceId())
@click.option("--no-wait", is_flag=True, help="Return once the daemon accepted the request.")
def cutover(device: int, no_wait: bool) -> int:
    """Switch DEVICE to its destination now (a migration started with --no-cutover, in sync)."""
    client = Client(device)
    client.cutover()
    if no_wait:
        click.echo(f"cutting over {client.node}")
        return 0
    return _finish_follow(device, _follow(device, stop_in_sync=False, quiet=True))


@cli.command()
@click.argument("device", type=DeviceId())
@click.option("--no-wait", is_flag=True, help="Return once the daemon accepted the request.")
def cancel(device: int, no_wait: bool) -> int:
    """Stop the migration of DEVICE: the source stays authoritative and untouched."""
    client = Client(device)
    client.cancel()
    if no_wait:
        click.echo(f"cancelling the migration of {client.node}")
        return 0
    mig = _follow(device, stop_in_sync=False, quiet=True)
    if mig.get("phase") == "cancelled":
        click.echo(f"cancelled: {mig['device']} keeps serving {mig['source']}")
        return 0
    return _finish_follow(device, mig)


@cli.command()
@click.argument("device", type=DeviceId())
@click.argument("limit", metavar="BYTES/S")
def speed(device: int, limit: str) -> int:
    """Change the copier's speed limit of DEVICE's migration (``unlimited`` to lift it)."""
    from ublkmig.migration import check_speed

    value = None if limit.strip().lower() in ("unlimited", "none") else parse_rate(limit)
    check_speed(value)
    client = Client(device)
    client.set_speed(value)
    click.echo(
        f"speed of {client.node}'s migration: {format_rate(value) if value else 'unlimited'}"
    )
    return 0
