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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from ublkmig import __version__, control, log, native
from ublkmig.errors import UblkmigError, UserError
from ublkmig.native import DataPath
from ublkmig.units import format_size, parse_size

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
@click.argument("image", type=click.Path(path_type=Path, readable=False))
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
def serve(
    image: Path,
    queues: int,
    depth: int,
    read_only: bool,
    logical_block_size: str,
    direct: bool,
    data_path: str,
) -> int:
    """Serve IMAGE as /dev/ublkbN in the foreground.

    The device path is the first line on stdout, printed once the device
    accepts I/O.  SIGINT/SIGTERM (or `ublkmig stop`) stop it cleanly.
    """
    from ublkmig import daemon

    opts = daemon.ServeOptions(
        image=image,
        queues=queues,
        depth=depth,
        read_only=read_only,
        logical_block_size=int(logical_block_size),
        direct=direct,
        data_path=DataPath.from_label(data_path),
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
    is removed."""
    path = control.socket_path(device)
    node = f"/dev/ublkb{device}"
    try:
        answer = control.request(path, "stop")
    except control.DaemonGone:
        with contextlib.suppress(OSError):
            path.unlink()  # a dead daemon's socket
        if Path(node).exists():
            raise UserError(f"{node} exists but no ublkmig daemon serves it") from None
        raise UserError(f"no ublkmig daemon serves {node}") from None
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
