"""The ``ublkmig`` command line (click).

Errors a user can cause are printed as one line, ``ublkmig: error: <message>``,
with exit status 1 (2 for usage errors); never a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from ublkmig import __version__, control, log, native, state
from ublkmig.errors import UblkmigError, UserError
from ublkmig.native import DataPath
from ublkmig.units import format_duration, format_rate, format_size, parse_rate, parse_size

_DEVICE_RE = re.compile(r"(?:/dev/)?(?:ublkb)?(\d+)")


class DeviceId(click.ParamType):
    """``/dev/ublkbN``, ``ublkbN`` or ``N`` -> N."""

    name = "DEVICE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        m = _DEVICE_RE.fullmatch(str(value).strip())
        if not m:
            self.fail(f"{value!r} is not a ublk device (expected /dev/ublkbN or N)", param, ctx)
        return int(m.group(1))


class Size(click.ParamType):
    """``256M``, ``1G``, ``4096``... -> bytes."""

    name = "SIZE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(str(value))
        except UserError as e:
            self.fail(str(e), param, ctx)


class Rate(click.ParamType):
    """``100M``, ``100M/s``, ``1.5G/s``... -> bytes per second."""

    name = "BYTES/S"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_rate(str(value))
        except UserError as e:
            self.fail(str(e), param, ctx)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--log-level",
    type=click.Choice(log.LEVELS, case_sensitive=False),
    default=None,
    help=f"Log level (default: ${log.ENV_LEVEL} or {log.DEFAULT_LEVEL}).",
)
@click.option("--log-json", is_flag=True, help="Logs as JSON lines instead of key=value.")
@click.version_option(__version__, prog_name="ublkmig")
def cli(log_level: str | None, log_json: bool) -> None:
    """Serve a disk image as a Linux block device (/dev/ublkbN) through ublk and io_uring."""
    log.configure(log_level, json=log_json)


@cli.command()
@click.argument("image", metavar="IMAGE")
@click.option(
    "--queues",
    type=click.IntRange(1, native.MAX_QUEUES),
    default=native.DeviceConfig.queues,
    show_default=True,
    help="Hardware queues (one thread and io_uring each).",
)
@click.option(
    "--depth",
    type=click.IntRange(1, native.MAX_DEPTH),
    default=native.DeviceConfig.depth,
    show_default=True,
    help="Requests in flight per queue.",
)
@click.option("--read-only", is_flag=True, help="Serve the image read-only.")
@click.option(
    "--logical-block-size",
    type=click.Choice([str(n) for n in native.LOGICAL_BLOCK_SIZES]),
    default=str(native.DeviceConfig.logical_block_size),
    show_default=True,
    help="Logical block size of the device, in bytes.",
)
@click.option("--direct", is_flag=True, help="Open the image with O_DIRECT (no page cache).")
@click.option(
    "--data-path",
    type=click.Choice([p.label for p in DataPath]),
    default=DataPath.AUTO.label,
    hidden=True,
    help="Force a data path (auto, auto-zc, zc, copy).",
)
@click.option(
    "--recover",
    type=DeviceId(),
    default=None,
    help="Take over DEVICE (/dev/ublkbN or N), whose daemon died, serving IMAGE (the image it "
    "served: after a completed migration, its destination); it keeps its queues, depth and "
    "block size.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Serve IMAGE even though a completed migration left it (another image is the disk: "
    "this copy lacks every write since), or recover without a record of what the device "
    "served.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(0.1, 3600),
    default=native.DEFAULT_NBD_TIMEOUT,
    show_default=True,
    metavar="SECONDS",
    help="An NBD IMAGE: the longest wait for the server (a reply, connecting, the handshake). "
    "Past it the connection counts as lost.",
)
@click.option(
    "--reconnect-wait",
    type=click.FloatRange(0.1, 3600),
    default=native.DEFAULT_RECONNECT_WAIT,
    show_default=True,
    metavar="SECONDS",
    help="An NBD export serving the device (IMAGE, or a migration's destination after the "
    "cutover) lost its connection: the daemon dials it again, and each guest request waits "
    "this long for that before it fails.",
)
def serve(
    image: str,
    queues: int,
    depth: int,
    read_only: bool,
    logical_block_size: str,
    direct: bool,
    data_path: str,
    recover: int | None,
    force: bool,
    timeout: float,
    reconnect_wait: float,
) -> int:
    """Serve IMAGE as /dev/ublkbN in the foreground.

    IMAGE is a file, a block device, or an NBD export (nbd://HOST[:PORT]/EXPORT,
    nbd+unix:///EXPORT?socket=PATH).  The device path is the first line on
    stdout, printed once the device accepts I/O.  SIGINT/SIGTERM (or `ublkmig
    stop`) stop it cleanly.  If the daemon dies instead, the device stays,
    holding its I/O (the requests the daemon had are issued again) until
    `serve IMAGE --recover DEVICE` takes it over, or `ublkmig stop DEVICE`
    removes it.
    """
    from ublkmig import daemon, migration

    opts = daemon.ServeOptions(
        image=image if migration.is_nbd_uri(image) else Path(image),
        queues=queues,
        depth=depth,
        read_only=read_only,
        logical_block_size=int(logical_block_size),
        direct=direct,
        data_path=DataPath.from_label(data_path),
        recover=recover,
        force=force,
        timeout=timeout,
        reconnect_wait=reconnect_wait,
    )
    return daemon.serve(opts)


@cli.command("list")
@click.option("--json", "as_json", is_flag=True, help="The daemons' info as a JSON array.")
def list_cmd(as_json: bool) -> int:
    """Devices this host's ublkmig daemons serve."""
    daemons = control.list_daemons()
    if as_json:
        click.echo(json.dumps(daemons, indent=2))
        return 0
    if not daemons:
        click.echo("no devices", err=True)
        return 0
    header = ("ID", "DEVICE", "IMAGE", "SIZE", "QUEUES", "DEPTH", "DATA-PATH", "STATE", "PID")
    rows = [header]
    for d in daemons:
        if "error" in d:
            rows.append(("?", "?", "?", "?", "?", "?", "?", d["error"], "?"))
            continue
        mode = "ro" if d.get("read_only") else "rw"
        rows.append((
            str(d["id"]), d["path"], d["image"], format_size(d["size"]), str(d["queues"]),
            str(d["depth"]), d["data_path"], f"{d['state']},{mode}", str(d["pid"]),
        ))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


@cli.command()
@click.argument("device", type=DeviceId())
@click.option(
    "--timeout", type=float, default=60.0, show_default=True, help="Seconds to wait for the stop."
)
@click.option("--no-wait", is_flag=True, help="Return once the daemon accepted the request.")
def stop(device: int, timeout: float, no_wait: bool) -> int:
    """Stop the daemon serving DEVICE (/dev/ublkbN or N): in-flight I/O completes, the device
    is removed.  A device whose daemon died is removed, failing the I/O it holds."""
    path = control.socket_path(device)
    node = f"/dev/ublkb{device}"
    try:
        answer = control.request(path, "stop")
    except control.DaemonGone:
        from ublkmig import daemon

        with contextlib.suppress(OSError):
            path.unlink()  # a dead daemon's socket
        if not daemon.ublk_device_exists(device):
            raise UserError(f"no ublkmig daemon serves {node}") from None
        try:
            native.Device.remove_orphan(device)
        except native.NativeError as e:
            raise UserError(f"no ublkmig daemon serves {node}, and it stays: {e.detail}") from None
        state.forget(device)
        click.echo(f"removed {node}, whose daemon had died (the I/O it held failed)")
        return 0
    pid = answer.get("pid")
    if not no_wait and not control.wait_gone(path, pid if isinstance(pid, int) else None, timeout):
        raise UserError(f"the daemon of {node} did not stop within {timeout:g} s")
    click.echo(f"stopped {node}" if not no_wait else f"stopping {node}")
    return 0


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="As a JSON object.")
def features(as_json: bool) -> int:
    """What the running kernel's ublk driver offers, and which data path serve will use."""
    from ublkmig import daemon

    daemon.ensure_driver()
    try:
        mask = native.features()
    except native.NativeError as e:
        if e.errno in (errno.EACCES, errno.EPERM):
            raise UserError(f"permission denied on {daemon.CONTROL_DEVICE}: run as root") from None
        raise
    auto = native.choose_path(mask)
    offered = native.paths_offered(mask)
    release = os.uname().release
    if as_json:
        click.echo(json.dumps({
            "kernel": release,
            "features": mask,
            "flags": native.decode_features(mask),
            "data_paths": [p.label for p in offered],
            "data_path": native.path_name(auto),
        }, indent=2))  # fmt: skip
        return 0
    click.echo(f"kernel      Linux {release}")
    click.echo(f"features    {mask:#x}")
    click.echo(f"data path   {native.path_name(auto)} (auto)")
    click.echo(f"offered     {', '.join(native.path_name(p) for p in offered)}")
    known = set(native.FEATURE_NAMES.values())
    for bit, name in native.FEATURE_NAMES.items():
        click.echo(f"  {'yes' if mask >> bit & 1 else ' - '}  UBLK_F_{name}")
    for name in native.decode_features(mask):
        if name not in known:
            click.echo(f"  yes  {name} (unknown to this ublkmig)")
    return 0


@cli.command()
@click.option(
    "--size", type=Size(), default="256M", show_default=True, help="Size of the demo image."
)
@click.option("--in-vm", is_flag=True, hidden=True, help="Run here even without ublk (VM side).")
def demo(size: int, in_vm: bool) -> int:
    """Serve a fresh image, put ext4 on it, write, remount, verify, fsck, stop.

    Without a ublk driver on this host, runs itself inside a kernel VM.
    """
    from ublkmig import demo as demo_mod

    return demo_mod.run(size=size, in_vm=in_vm)


@cli.command()
@click.option("--scenario", "scenario", multiple=True, metavar="NAME",
              help="datapath, idle, load, slow or qemu (repeatable); default: all.")
@click.option("--quick", is_flag=True, help="The small smoke run (what CI runs).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where results.json, report.md and the plots go.  [default: "
              "bench-results/<time>]")
@click.option("--inside", is_flag=True, hidden=True, help="Run here (the VM side).")
@click.option("--command", "command", hidden=True, default=None)
def bench(scenario: tuple[str, ...], quick: bool, out: Path | None, inside: bool,
          command: str | None) -> int:  # fmt: skip
    """Benchmark the data path and migration against the raw file, kublk and dd.

    Without a ublk driver on this host, runs inside the kernel VM.  A full run (every
    scenario, without --quick) also rewrites docs/BENCHMARKS.md.
    """
    from ublkmig.bench import run as bench_run

    out = out or Path("bench-results") / time.strftime("%Y%m%d-%H%M%S")
    return bench_run.main(scenario, quick, out.absolute(), inside,
                          command or bench_run.default_command())


# --- migration ---------------------------------------------------------------------------------

# ublkmig.migration.Mode (not imported: it needs anyio)
MODES = ("auto", "mirror", "dbt", "snapshot")
ENDED = ("completed", "cancelled", "failed")
FOLLOW_INTERVAL = 0.5


def _node(device: int) -> str:
    return f"/dev/ublkb{device}"


# a cancel or a resume may wait for a migration's start: its destination's dial and handshake
# (bounded by its --dest-timeout, 30 s by default)
START_WAIT = 90.0


def _ask(device: int, cmd: str, **args: Any) -> dict[str, Any]:
    """One control request to the daemon of DEVICE; UserError if there is none."""
    path = control.socket_path(device)
    try:
        return control.request(path, cmd, **args)
    except control.DaemonGone:
        with contextlib.suppress(OSError):
            path.unlink()  # a dead daemon's socket
        raise UserError(f"no ublkmig daemon serves {_node(device)}") from None


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
    "then a short pause.  snapshot: guest writes go to a delta while the base is copied, "
    "deltas folded until small, then a short pause.",
)
@click.option(
    "--fallback-wait",
    type=float,
    default=20.0,
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
    "then yields the source to the guest: it reads 1 chunk at a time (not 4) and rests after "
    "each read as long as the read took.",
)
@click.option(
    "--no-cutover",
    is_flag=True,
    help="Stay in sync instead of switching; `ublkmig cutover DEVICE` switches.",
)
@click.option(
    "--verify",
    is_flag=True,
    help="Compare the destination with the disk before switching, guest I/O paused (in mirror "
    "mode too: this adds a pause there).  A difference fails the migration.",
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
        extra = {"speed": speed} if speed is not None else {}
        answer = _ask(device, "migrate", resume=True, timeout=START_WAIT, **extra)
    elif dest is None:
        raise UserError("migrate needs --to DEST (or --resume)")
    else:
        to = dest if is_nbd_uri(dest) else os.path.abspath(dest)
        # (its start waits for the destination: a dial and handshake, within dest_timeout)
        answer = _ask(
            device, "migrate", to=to, mode=mode, chunk_size=chunk_size, speed=speed,
            no_cutover=no_cutover, verify=verify, fallback_wait_ms=fallback_wait,
            dest_timeout=dest_timeout, timeout=dest_timeout + 10, **{"yield": not no_yield},
        )  # fmt: skip
    mig = answer["migration"]
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
    st = _ask(device, "status")
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
    _ask(device, "cutover")
    if no_wait:
        click.echo(f"cutting over {_node(device)}")
        return 0
    return _finish_follow(device, _follow(device, stop_in_sync=False, quiet=True))


@cli.command()
@click.argument("device", type=DeviceId())
@click.option("--no-wait", is_flag=True, help="Return once the daemon accepted the request.")
def cancel(device: int, no_wait: bool) -> int:
    """Stop the migration of DEVICE: the source stays authoritative and untouched."""
    # (one still starting is cancelled once its destination answered, or timed out)
    _ask(device, "cancel", timeout=START_WAIT)
    if no_wait:
        click.echo(f"cancelling the migration of {_node(device)}")
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
    _ask(device, "speed", speed=value)
    click.echo(
        f"speed of {_node(device)}'s migration: {format_rate(value) if value else 'unlimited'}"
    )
    return 0


def _percent(mig: dict[str, Any]) -> float:
    size = mig.get("size") or 0
    if mig.get("phase") == "completed" or not size:
        return 100.0 if mig.get("phase") == "completed" else 0.0
    return max(0.0, min(100.0, 100.0 * (size - mig.get("bytes_to_copy", size)) / size))


def _progress_text(mig: dict[str, Any]) -> str:
    parts = [
        f"{format_size(max(0, mig['size'] - mig['bytes_to_copy']))} of {format_size(mig['size'])}",
        f"{mig['dirty_chunks']} dirty",
    ]
    if mig["mode"] == "snapshot":
        parts.append(f"delta {mig['generation']}: {mig['delta_chunks']} chunks")
    if mig.get("rate"):
        parts.append(format_rate(mig["rate"]))
    if mig.get("eta_seconds") and mig["phase"] not in ENDED:
        parts.append(f"ETA {format_duration(mig['eta_seconds'])}")
    return ", ".join(parts)


def _phase_line(mig: dict[str, Any]) -> str:
    pass_no = f" (pass {mig['pass']}: {mig['pass_kind']})" if mig.get("pass") else ""
    return (
        f"{time.strftime('%H:%M:%S')} {mig['device']} {mig['mode']} {mig['phase']}{pass_no}: "
        f"{_progress_text(mig)}"
    )


def _ms(value: float | None) -> str:
    return "-" if value is None else format_duration(value / 1000)


def _status_lines(st: dict[str, Any]) -> list[str]:
    lines = [
        f"{st['path']}  {st['image']}  {format_size(st['size'])}  {st['state']}",
    ]
    io = st.get("stats") or {}
    mig = st.get("migration")
    gone = st.get("interrupted")
    if mig is None and gone and "damaged" in gone:
        lines.append(f"interrupted    a migration, whose saved state is damaged: {gone['damaged']}")
    elif mig is None and gone:
        lines.append(
            f"interrupted    {gone['mode']} migration to {gone['dest']} ({gone['phase']}) when "
            f"the last daemon died: `ublkmig migrate {st['path']} --resume` goes on with it"
        )
    elif mig is None:
        lines.append("no migration")
    else:
        pass_no = f", pass {mig['pass']} ({mig['pass_kind']})" if mig.get("pass") else ""
        lines += [
            f"migration      {mig['mode']} to {mig['dest']}: {mig['phase']}{pass_no}",
            f"progress       {_percent(mig):.1f}%: {_progress_text(mig)}",
            f"copied         {format_size(mig['bytes_copied'])} written, "
            f"{format_size(mig['bytes_skipped'])} skipped (holes, zeroes), "
            f"{format_size(mig['bytes_to_copy'])} to copy; cursor {format_size(mig['cursor'])}"
            + (f"; resumed: {format_size(mig['bytes_matched'])} already there"
               if mig.get("resumed") else ""),
            f"chunks         {mig['chunks_copied']} of {mig['chunks']} copied "
            f"({format_size(mig['chunk_size'])} each), {mig['dirty_chunks']} dirty, "
            f"{mig['hot_chunks']} hot",
        ]
        if mig["mode"] == "snapshot":
            lines.append(
                f"delta          generation {mig['generation']}, {mig['delta_chunks']} chunks"
            )
        limit = format_rate(mig["speed"]) if mig.get("speed") else "unlimited"
        eta = mig.get("eta_seconds")
        if mig["phase"] in ENDED:
            eta = None
        yielding = (
            f"yielded to guest I/O for {format_duration(mig.get('yielded_seconds', 0))}"
            if mig.get("busy_depth") else "not yielding to guest I/O"
        )
        lines.append(
            f"rate           {format_rate(mig['rate'])} (limit {limit}; {yielding}), "
            f"ETA {'-' if eta is None else format_duration(eta)}, "
            f"elapsed {format_duration(mig['elapsed'])}"
        )
        lines.append(
            f"guest writes   {mig['mirrored_writes']} mirrored, {mig['tracked_writes']} tracked, "
            f"{mig['parked']} parked; longest I/O {_ms(mig.get('max_latency_ms'))}"
        )
        if mig.get("cutover_pause_ms") is not None or mig.get("final_pause_ms") is not None:
            lines.append(
                f"switch         cutover pause {_ms(mig.get('cutover_pause_ms'))}, slowest "
                f"request around it {_ms(mig.get('cutover_stall_ms'))}, final pause "
                f"{_ms(mig.get('final_pause_ms'))}"
            )
        if mig.get("reconnects") or mig.get("dest_down"):
            lines.append(
                f"destination    {mig.get('dest_down', 0)} connections lost now, reconnected "
                f"{mig.get('reconnects', 0)} times"
            )
        if mig.get("verify_mismatches") is not None:
            lines.append(f"verify         {mig['verify_mismatches']} chunks differ")
        if mig.get("error"):
            lines.append(f"error          {mig['error']}")
        io = mig.get("io") or io
    dev_io = st.get("stats") or {}
    if dev_io.get("conn_down") or dev_io.get("conn_waits") or st.get("reconnects"):
        lines.append(
            f"connection     {dev_io.get('conn_down', 0)} lost now, reconnected "
            f"{st.get('reconnects', 0)} times; guest requests waiting "
            f"{dev_io.get('conn_waiting', 0)} now, {dev_io.get('conn_waits', 0)} in all, "
            f"{dev_io.get('conn_failed', 0)} failed after --reconnect-wait"
        )
    if io:
        keys = ("reads", "writes", "flushes", "discards", "write_zeroes", "errors", "inflight",
                "parked")  # fmt: skip
        lines.append("guest I/O      " + ", ".join(f"{k} {io[k]}" for k in keys if k in io))
    return lines


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
    try:
        while True:
            try:
                st = _ask(device, "status", timeout=10.0)
            except UserError:
                raise UserError(f"the daemon of {_node(device)} went away") from None
            mig = st.get("migration")
            if mig is None:
                raise UserError(f"no migration is running on {_node(device)}")
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
            if phase in ENDED or (stop_in_sync and phase == "in-sync"):
                return mig
            time.sleep(FOLLOW_INTERVAL)
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


def _one_line(text: str) -> str:
    return "; ".join(part.strip() for part in text.strip().splitlines() if part.strip())


def _error(message: str) -> None:
    print(f"ublkmig: error: {_one_line(message)}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: runs the CLI and turns user-caused errors into one line and an exit status."""
    try:
        rv = cli.main(
            args=list(argv) if argv is not None else None,
            prog_name="ublkmig",
            standalone_mode=False,
        )
    except click.exceptions.NoArgsIsHelpError as e:
        e.show()
        return e.exit_code
    except click.UsageError as e:
        hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
        _error(e.format_message() + hint)
        return e.exit_code
    except click.ClickException as e:
        _error(e.format_message())
        return e.exit_code
    except click.Abort:
        _error("aborted")
        return 1
    except UblkmigError as e:
        _error(str(e))
        return 1
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except BrokenPipeError:  # e.g. `ublkmig list | head -1`
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return rv if isinstance(rv, int) else 0
