"""What the daemon is asked for: ``serve``'s options (ServeOptions), the fields of a
``migrate`` request, checked (parse_migrate_args), and a resumed migration's, from its record
(resume_options)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ublkmig import migration, native
from ublkmig.control import ControlError
from ublkmig.errors import UserError
from ublkmig.native import DataPath


@dataclass(frozen=True)
class ServeOptions:
    """What ``serve`` was asked for (ranges: see native.MAX_QUEUES etc., checked by the CLI
    and again by the data plane)."""

    image: Path | str  # a str: an NBD export's URI
    queues: int = native.DeviceConfig.queues
    depth: int = native.DeviceConfig.depth
    read_only: bool = False
    logical_block_size: int = native.DeviceConfig.logical_block_size
    direct: bool = False
    data_path: DataPath = DataPath.AUTO
    recover: int | None = None  # take over /dev/ublkb<N>, whose daemon died
    force: bool = False  # serve an image a record says is not the disk (or recover without one)
    timeout: float = native.DEFAULT_NBD_TIMEOUT  # an NBD image: the longest wait for its server
    reconnect_wait: float = native.DEFAULT_RECONNECT_WAIT  # a request waits for a lost connection


def _int_arg(args: dict[str, Any], key: str, *, optional: bool = False) -> Any:
    value = args.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise UserError(f"{key} must be an integer, not {value!r}")
    return value


def parse_migrate_args(args: dict[str, Any], direct: bool = False) -> migration.MigrationOptions:
    """The ``migrate`` request's fields -> MigrationOptions (UserError, one line, if bad)."""
    to = args.get("to")
    if not isinstance(to, str) or not to:
        raise UserError('migrate needs "to": the destination path')
    mode = migration.check_mode(str(args.get("mode", migration.Mode.AUTO)))
    chunk_size = args.get("chunk_size")
    chunk_size = (
        migration.DEFAULT_CHUNK_SIZE if chunk_size is None else _int_arg(args, "chunk_size")
    )
    speed = migration.check_speed(_int_arg(args, "speed", optional=True))
    for flag, default in (("no_cutover", False), ("verify", False), ("yield", True)):
        if not isinstance(args.get(flag, default), bool):
            raise UserError(f"{flag} must be true or false")
    wait = args.get("fallback_wait_ms", migration.DEFAULT_FALLBACK_WAIT_MS)
    if not isinstance(wait, int | float) or isinstance(wait, bool):
        raise UserError("fallback_wait_ms must be a number")
    timeout = args.get("dest_timeout", migration.DEFAULT_DEST_TIMEOUT)
    if not isinstance(timeout, int | float) or isinstance(timeout, bool):
        raise UserError("dest_timeout must be a number of seconds")
    return migration.MigrationOptions(
        dest=to if migration.is_nbd_uri(to) else Path(to),
        mode=mode,
        chunk_size=migration.check_chunk_size(chunk_size),
        speed=speed,
        no_cutover=bool(args.get("no_cutover", False)),
        verify=bool(args.get("verify", False)),
        direct=direct,
        busy_depth=migration.DEFAULT_BUSY_DEPTH if args.get("yield", True) else 0,
        fallback_wait_ms=migration.check_fallback_wait(float(wait)),
        dest_timeout=migration.check_dest_timeout(float(timeout)),
    )


def resume_options(
    saved: migration.MigrationRecord | None,
    args: dict[str, Any],
    *,
    image: Path | str,
    node: str,
) -> migration.MigrationOptions:
    """``migrate --resume``: the options of the migration NODE's last daemon left unfinished
    (its record, ``saved``), serving ``image``; ``args`` may bring a new speed.  ControlError
    (one line) if there is none, it had cut over, it was from another image, or its options
    are not valid any more."""
    if saved is None:
        raise ControlError(f"no interrupted migration of {node} to resume")
    if saved.switched:
        raise ControlError(
            f"the migration of {node} to {saved.dest} had cut over: there is nothing to resume"
        )
    with contextlib.suppress(OSError):
        if not os.path.samefile(saved.source, image):
            raise ControlError(
                f"the interrupted migration of {node} was from {saved.source}, but this "
                f"daemon serves {image}"
            )
    request = {
        "to": saved.dest, "mode": saved.mode, "chunk_size": saved.chunk_size,
        "speed": args["speed"] if "speed" in args else saved.speed,  # a new limit for the rest
        "no_cutover": saved.no_cutover, "verify": saved.verify,
        "fallback_wait_ms": saved.fallback_wait_ms, "dest_timeout": saved.dest_timeout,
        "yield": saved.yields,
    }  # fmt: skip
    try:
        opts = parse_migrate_args(request, direct=saved.direct)
    except UserError as e:
        raise ControlError(
            f"the saved state of {node}'s interrupted migration is damaged ({e})"
        ) from None
    # every chunk the last one may have written is compared (and fixed) before use
    return dataclasses.replace(opts, resumed=True, check_below=saved.reach)
