"""A running migration's record: what ``migrate --resume`` needs to go on after the daemon died,
and its saving (the daemon's ``on_state`` writes it with ublkmig.state).

The machine saves it at every phase change and every ``persist_interval``, and strictly at the
cutover: the cutover's record says the destination is the disk, and without it no switch.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ublkmig import snapshot, state
from ublkmig.migration.options import DEFAULT_DEST_TIMEOUT, MigrationOptions, Mode
from ublkmig.migration.phase import Phase


@dataclass(frozen=True)
class MigrationRecord:
    """What ``--resume`` (and a takeover) needs of a migration whose daemon died: the
    options, ``reach`` (chunks below it may hold copies on the destination) and the cutover's
    state (None; "intent": in sync and switching, the destination is the disk from here on;
    "done").  Saved as JSON with these names (``yield`` for ``yields``)."""

    device: str
    source: str
    dest: str
    mode: str
    chunk_size: int
    speed: int | None
    no_cutover: bool
    verify: bool
    direct: bool
    fallback_wait_ms: float
    yields: bool
    dest_timeout: float
    phase: str
    reach: int
    chunks: int
    cut_over: str | None
    updated: float
    deltas: str | None  # snapshot: where the deltas and their layer map are

    @property
    def switched(self) -> bool:
        """The destination is the disk (the cutover's record was written)."""
        return self.cut_over is not None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["yield"] = d.pop("yields")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: Path | str = "the record") -> MigrationRecord:
        """The record saved as ``d``; state.Damaged (one line, naming the field) if a field is
        missing or of the wrong type: what decides which image is the disk fails closed.
        (Fields a record written before they existed lacks take their old meaning.)"""
        d = {"dest_timeout": DEFAULT_DEST_TIMEOUT, "yield": True, "direct": False,
             "deltas": None, "updated": 0.0, **d}  # fmt: skip
        d["yields"] = d.pop("yield")
        d.pop("version", None)  # (state.write's)
        if isinstance(d.get("cut_over"), bool):  # (a flag before the cutover had two steps)
            d["cut_over"] = "done" if d["cut_over"] else None
        fields: dict[str, Any] = {}
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name not in d:
                raise state.Damaged(f"{where} is damaged: it has no {f.name!r}")
            v = d[f.name]
            if not _typed(v, hints[f.name]):
                raise state.Damaged(f"{where} is damaged: {f.name} is {v!r}")
            fields[f.name] = v
        rec = cls(**fields)
        if rec.reach < 0 or rec.cut_over not in (None, "intent", "done"):
            raise state.Damaged(f"{where} is damaged: reach {rec.reach}, cut_over {rec.cut_over!r}")
        return rec


def _typed(v: Any, t: Any) -> bool:
    """v, from JSON, fits the field type ``t`` (str, int, float, bool, or one of them | None)."""
    args = typing.get_args(t)
    if args:  # X | None
        return v is None or _typed(v, next(a for a in args if a is not type(None)))
    if isinstance(v, bool):  # (a bool is an int to Python, never to the record)
        return t is bool
    if t is float:
        return isinstance(v, (int, float))
    return isinstance(v, t)


def read_record(dev_id: int) -> MigrationRecord | None:
    """The record of /dev/ublkb<dev_id>'s migration; None if there is none; state.Damaged if
    it cannot be read or trusted."""
    path = state.migration_path(dev_id)
    d = state.read(path)
    return None if d is None else MigrationRecord.from_dict(d, path)


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
) -> MigrationRecord:
    """The record of a running migration (MigrationRecord)."""
    return MigrationRecord(
        device=device, source=source, dest=str(o.dest), mode=str(o.mode),
        chunk_size=o.chunk_size, speed=speed, no_cutover=o.no_cutover, verify=o.verify,
        direct=o.direct, fallback_wait_ms=o.fallback_wait_ms, yields=o.busy_depth > 0,
        dest_timeout=o.dest_timeout, phase=str(phase), reach=reach, chunks=chunks,
        cut_over=cut_over, updated=time.time(),
        deltas=(str(snapshot.delta_prefix(source, o.delta_dir))
                if o.mode is Mode.SNAPSHOT else None),
    )  # fmt: skip


class Recorder:
    """Saves the record through ``on_state`` (None, as in tests: nothing is saved)."""

    def __init__(
        self, on_state: Callable[[MigrationRecord], None] | None, *, device: str, log: Any
    ) -> None:
        self.on_state = on_state
        self.device = device
        self.log = log
        self.saved_at = 0.0  # time.monotonic() of the last save
        # The cutover saves from its worker thread while the sampler may save from the
        # event loop: each save makes its record and writes it under the lock, so the
        # file ends with the record made last (the cutover's, not a copy of the state
        # from just before it).
        self._lock = threading.Lock()

    def save(self, record: Callable[[], MigrationRecord], strict: bool = False) -> None:
        """Save ``record()``; a failure is only logged unless ``strict`` (the cutover record:
        the switch waits for it and does not happen without it)."""
        if self.on_state is None:
            return
        try:
            with self._lock:
                self.saved_at = time.monotonic()
                self.on_state(record())
        except OSError as e:
            if strict:
                raise
            # the migration goes on: the source stays the disk, only --resume would miss it
            self.log.warning("migration.state_not_saved", device=self.device, error=str(e))
