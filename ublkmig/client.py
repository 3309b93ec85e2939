"""The one client of a device's daemon: each control command as a typed method, and the one
way to follow a migration until it ends (or until a condition holds).

The CLI, the demo, the bench and the tests all talk to a daemon through :class:`Client`;
the wire (JSON lines on a unix socket) and its errors are control.py's.  Nothing here
imports anyio or loads the data plane, so a command starts fast.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ublkmig import control
from ublkmig.control import ControlError, DaemonGone
from ublkmig.errors import UblkmigError
from ublkmig.migration.options import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_DEST_TIMEOUT,
    DEFAULT_FALLBACK_WAIT_MS,
)
from ublkmig.migration.phase import ENDED

__all__ = ["ControlError", "Client", "DaemonGone", "MigrateRequest", "WaitTimeout"]

Status = dict[str, Any]  # a migration's status, as ``status`` answers it (status.py)

# a cancel or a resume may wait for a migration's start: its destination's dial and handshake
# (bounded by its dest_timeout, 30 s by default)
START_WAIT = 90.0


class WaitTimeout(UblkmigError):
    """A wait on a migration ran out of time; ``last`` is the last status seen (or None)."""

    def __init__(self, message: str, last: Status | None) -> None:
        super().__init__(message)
        self.last = last


@dataclass(frozen=True)
class MigrateRequest:
    """A ``migrate`` command's options (the daemon checks them again: it is the authority)."""

    to: str
    mode: str = "auto"
    chunk_size: int = DEFAULT_CHUNK_SIZE
    speed: int | None = None  # bytes/s, None for no limit
    no_cutover: bool = False
    verify: bool = False
    yields: bool = True  # the copier yields the source to guest I/O (not --no-yield)
    fallback_wait_ms: float = DEFAULT_FALLBACK_WAIT_MS
    dest_timeout: float = DEFAULT_DEST_TIMEOUT

    def args(self) -> dict[str, Any]:
        return {"to": self.to, "mode": self.mode, "chunk_size": self.chunk_size,
                "speed": self.speed, "no_cutover": self.no_cutover, "verify": self.verify,
                "fallback_wait_ms": self.fallback_wait_ms, "dest_timeout": self.dest_timeout,
                "yield": self.yields}  # fmt: skip


def device_id(device: int | str) -> int:
    """N from N, "N" or /dev/ublkbN (ValueError otherwise)."""
    if isinstance(device, int):
        return device
    digits = device.removeprefix("/dev/ublkb")
    if not digits.isdigit():
        raise ValueError(f"not a ublk device: {device!r}")
    return int(digits)


class Client:
    """The daemon serving /dev/ublkbN, reached over its control socket.

    Every method raises DaemonGone if no daemon listens, ControlError if it refuses (its
    one-line reason) or does not answer within the timeout.
    """

    def __init__(self, device: int | str, *, timeout: float = 10.0) -> None:
        self.id = device_id(device)
        self.node = f"/dev/ublkb{self.id}"
        self.path: Path = control.socket_path(self.id)
        self.timeout = timeout

    def call(self, cmd: str, *, timeout: float | None = None, **args: Any) -> dict[str, Any]:
        """One command; the daemon's answer (without "ok")."""
        try:
            return control.request(self.path, cmd, timeout=timeout or self.timeout, **args)
        except DaemonGone:
            with contextlib.suppress(OSError):
                self.path.unlink()  # a dead daemon's socket (a live one listens before it
                # tells anyone its device: nobody asks it between its bind and its listen)
            raise DaemonGone(f"no ublkmig daemon serves {self.node}") from None

    # --- the device -------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        return self.call("info")

    def status(self) -> dict[str, Any]:
        """The device and its migration (``ublkmig status DEVICE --json``)."""
        return self.call("status")

    def stop(self) -> dict[str, Any]:
        return self.call("stop")

    # --- its migration ----------------------------------------------------------------------
    def migration(self) -> Status | None:
        """The migration's status, None if the device has had none."""
        mig = self.status().get("migration")
        return dict(mig) if mig is not None else None

    def migrate(self, request: MigrateRequest) -> Status:
        """Start a migration; its first status.  (The start waits for the destination: a dial
        and handshake, within its dest_timeout.)"""
        answer = self.call("migrate", timeout=request.dest_timeout + 10, **request.args())
        return dict(answer["migration"])

    def resume(self, speed: int | None = None) -> Status:
        """Go on with the migration this device's last daemon left unfinished."""
        extra = {"speed": speed} if speed is not None else {}
        return dict(self.call("migrate", resume=True, timeout=START_WAIT, **extra)["migration"])

    def cutover(self) -> dict[str, Any]:
        return self.call("cutover")

    def cancel(self) -> dict[str, Any]:
        # (one still starting is cancelled once its destination answered, or timed out)
        return self.call("cancel", timeout=START_WAIT)

    def set_speed(self, speed: int | None) -> dict[str, Any]:
        return self.call("speed", speed=speed)

    def wait_migration(
        self,
        until: Callable[[Status], bool] | None = None,
        *,
        interval: float = 0.5,
        timeout: float | None = None,
        on_status: Callable[[Status], None] | None = None,
        before_start: bool = False,
    ) -> Status:
        """Poll the migration until it ends or ``until(status)`` holds, whichever comes first;
        its last status (the caller tells which by its phase).

        ``on_status`` sees every status polled.  With ``before_start``, no migration yet is
        waited for; otherwise it is a ControlError.  WaitTimeout past ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        mig: Status | None = None
        while True:
            mig = self.migration()
            if mig is None:
                if not before_start:
                    raise ControlError(f"no migration is running on {self.node}")
            else:
                if on_status is not None:
                    on_status(mig)
                if mig["phase"] in ENDED or (until is not None and until(mig)):
                    return mig
            if deadline is not None and time.monotonic() > deadline:
                what = "did not end" if until is None else "did not get there"
                raise WaitTimeout(
                    f"the migration of {self.node} {what} within {timeout:.0f} s: {mig}", mig
                )
            time.sleep(interval)
