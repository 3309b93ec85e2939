"""A running migration's record: what ``migrate --resume`` needs to go on after the daemon died,
and its saving (the daemon's ``on_state`` writes it with ublkmig.state).

The machine saves it at every phase change and every ``persist_interval``, and strictly at the
cutover: the cutover's record says the destination is the disk, and without it no switch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ublkmig import snapshot
from ublkmig.migration.options import MigrationOptions, Mode
from ublkmig.migration.phase import Phase


def resume_state(
    o: MigrationOptions,
    *,
    device: str,
    source: str,
    speed: int | None,
    phase: Phase,
    reach: int,
    chunks: int,
    cut_over: str | None,
) -> dict[str, Any]:
    """What ``--resume`` needs to go on after the daemon died (ublkmig.state): the options,
    ``reach`` (chunks below it may hold copies on the destination) and the cutover's state
    (None, "intent": in sync and switching, "done")."""
    return {
        "device": device, "source": source, "dest": str(o.dest),
        "mode": str(o.mode), "chunk_size": o.chunk_size, "speed": speed,
        "no_cutover": o.no_cutover, "verify": o.verify, "direct": o.direct,
        "fallback_wait_ms": o.fallback_wait_ms, "yield": o.busy_depth > 0,
        "dest_timeout": o.dest_timeout,
        "phase": str(phase),
        "reach": reach, "chunks": chunks,
        "cut_over": cut_over, "updated": time.time(),
        # snapshot: where the deltas and their layer map are (a takeover folds them back)
        "deltas": (str(snapshot.delta_prefix(source, o.delta_dir))
                   if o.mode is Mode.SNAPSHOT else None),
    }  # fmt: skip


class Recorder:
    """Saves the record through ``on_state`` (None, as in tests: nothing is saved)."""

    def __init__(
        self, on_state: Callable[[dict[str, Any]], None] | None, *, device: str, log: Any
    ) -> None:
        self.on_state = on_state
        self.device = device
        self.log = log
        self.saved_at = 0.0  # time.monotonic() of the last save

    def save(self, record: Callable[[], dict[str, Any]], strict: bool = False) -> None:
        """Save ``record()``; a failure is only logged unless ``strict`` (the cutover record:
        the switch waits for it and does not happen without it)."""
        if self.on_state is None:
            return
        self.saved_at = time.monotonic()
        try:
            self.on_state(record())
        except OSError as e:
            if strict:
                raise
            # the migration goes on: the source stays the disk, only --resume would miss it
            self.log.warning("migration.state_not_saved", device=self.device, error=str(e))
