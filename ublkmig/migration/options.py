"""What a migration is asked to do: its mode and options, their defaults, and the checks of
what a user gives (one line, UserError, for anything wrong).

Imports no anyio: the CLI checks its arguments with these on every migration command, and
its start-up time matters.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

from ublkmig import native, snapshot
from ublkmig.errors import UserError
from ublkmig.units import format_size

DEFAULT_CHUNK_SIZE = 1 << 20
# chunks the copier reads from the source at a time while the guest has requests in
# flight (4 in flight otherwise)
DEFAULT_BUSY_DEPTH = 1
# auto: fall back to dbt when mirrored writes wait this long (ms) on average for the destination
DEFAULT_FALLBACK_WAIT_MS = 20.0
DEFAULT_DEST_TIMEOUT = native.DEFAULT_NBD_TIMEOUT  # seconds
MIN_DEST_TIMEOUT, MAX_DEST_TIMEOUT = 0.1, 3600.0
MAX_SPEED = (1 << 63) - 1  # what the data plane's uint64 holds with room to spare


class Mode(enum.StrEnum):
    AUTO = "auto"  # mirror, falling back to dbt while the destination is too slow
    MIRROR = "mirror"
    DBT = "dbt"
    SNAPSHOT = "snapshot"

    @property
    def native(self) -> native.MigMode:
        """The data plane's mode to start in (auto starts mirroring)."""
        return native.MigMode.from_label("mirror" if self is Mode.AUTO else self.value)


def is_nbd_uri(text: str) -> bool:
    """Whether a destination names an NBD export (the data plane parses and checks it)."""
    return text.startswith(("nbd://", "nbd+unix://", "nbds://", "nbds+unix://"))


@dataclass(frozen=True)
class MigrationOptions:
    dest: Path | str  # a str: an NBD export's URI
    mode: Mode = Mode.AUTO
    chunk_size: int = DEFAULT_CHUNK_SIZE
    speed: int | None = None  # copier bytes/s; None: unlimited
    no_cutover: bool = False
    verify: bool = False
    dest_zeroed: bool = False  # a new sparse file: holes need no copy
    direct: bool = False
    copy_depth: int = 0
    # chunks the copier copies at a time while the guest has requests in flight, resting
    # between them as the pacer says (the guest keeps 3/4 of its rate): it yields the disk
    # to the guest (0: no yielding, copy_depth chunks at a time and no rest)
    busy_depth: int = DEFAULT_BUSY_DEPTH
    delta_dir: Path | None = None
    # auto: fall back to dbt when mirrored writes wait this long on average for the
    # destination (after the source was done), sustained
    fallback_wait_ms: float = DEFAULT_FALLBACK_WAIT_MS
    # resuming (--resume): chunks below this may hold an earlier copy on the destination:
    # compared before they are written
    resumed: bool = False
    check_below: int = 0
    # an NBD destination: the longest wait for the server (a reply, the dial, the handshake);
    # then the connection counts as lost (guest writes complete from the source, the chunks
    # go dirty, the migration reconnects)
    dest_timeout: float = DEFAULT_DEST_TIMEOUT
    dest_fd: int = 0  # > 0: a file destination's checked, locked descriptor (not saved)

    def native_config(self, source: str) -> native.MigrationConfig:
        return native.MigrationConfig(
            dest=self.dest,
            mode=self.mode.native,
            dest_zeroed=self.dest_zeroed,
            chunk_size=self.chunk_size,
            speed=self.speed or 0,
            direct=self.direct,
            copy_depth=self.copy_depth,
            busy_depth=self.busy_depth,
            delta_path=snapshot.delta_prefix(source, self.delta_dir),
            check_below=self.check_below,
            dest_timeout_ms=round(self.dest_timeout * 1000),
            dest_fd=self.dest_fd,
        )


def check_chunk_size(n: int) -> int:
    lo, hi = native.MIN_CHUNK_SIZE, native.MAX_CHUNK_SIZE
    if not lo <= n <= hi or n & (n - 1):
        raise UserError(
            f"chunk size must be a power of two from {format_size(lo)} to {format_size(hi)}, "
            f"not {n} bytes"
        )
    return n


def check_speed(n: int | None) -> int | None:
    if n is not None and n <= 0:
        raise UserError("speed must be more than 0 bytes/s (leave it out for no limit)")
    if n is not None and n > MAX_SPEED:
        raise UserError(f"speed must be at most {MAX_SPEED} bytes/s, not {n}")
    return n


def check_dest_timeout(seconds: float) -> float:
    if not MIN_DEST_TIMEOUT <= seconds <= MAX_DEST_TIMEOUT:
        raise UserError(
            f"the destination timeout must be from {MIN_DEST_TIMEOUT} to {MAX_DEST_TIMEOUT} "
            f"seconds, not {seconds}"
        )
    return seconds


def check_fallback_wait(ms: float) -> float:
    if not ms > 0:
        raise UserError(f"the fallback wait must be a positive number of milliseconds, not {ms}")
    return ms


def check_mode(text: str) -> Mode:
    try:
        return Mode(text)
    except ValueError:
        known = ", ".join(m.value for m in Mode)
        raise UserError(f"unknown migration mode {text!r} (known: {known})") from None
