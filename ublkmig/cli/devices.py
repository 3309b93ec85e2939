"""The device commands: ``serve``, ``list``, ``stop``, ``features``."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import click

from ublkmig import control, native, state
from ublkmig.cli.group import cli
from ublkmig.cli.params import DeviceId
from ublkmig.client import Client, DaemonGone
from ublkmig.errors import UserError
from ublkmig.native import DataPath
from ublkmig.units import format_size


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
    target = Client(device)
    node = target.node
    try:
        answer = target.stop()
    except DaemonGone:
        from ublkmig import daemon

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
    pid = pid if isinstance(pid, int) else None
    if not no_wait and not control.wait_gone(target.path, pid, timeout):
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
