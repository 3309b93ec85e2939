"""One control request to the daemon of a device, as the commands make it."""

from __future__ import annotations

import contextlib
from typing import Any

from ublkmig import control
from ublkmig.errors import UserError


def _node(device: int) -> str:
    return f"/dev/ublkb{device}"


def _ask(device: int, cmd: str, **args: Any) -> dict[str, Any]:
    """One control request to the daemon of DEVICE; UserError if there is none."""
    path = control.socket_path(device)
    try:
        return control.request(path, cmd, **args)
    except control.DaemonGone:
        with contextlib.suppress(OSError):
            path.unlink()  # a dead daemon's socket
        raise UserError(f"no ublkmig daemon serves {_node(device)}") from None
