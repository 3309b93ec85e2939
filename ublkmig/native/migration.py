"""Migration (the "migration" section of ubm.h): modes, passes, the configuration, the
counters, and the migration calls of a device or a simulator (struct ubm_target)."""

from __future__ import annotations

import ctypes
import enum
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ublkmig.native.library import _P, NativeError, Prototypes, _check, _lib, last_error

if TYPE_CHECKING:
    from ublkmig.native.device import Device
    from ublkmig.native.sim import Sim


# enum ubm_cutover_step
CUTOVER_CANCEL, CUTOVER_COMMIT, CUTOVER_FORCE = 0, 1, 2


class MigMode(enum.IntEnum):
    """enum ubm_mig_mode."""

    MIRROR = 0  # writes go to both sides, but for those ahead of the copier
    DBT = 1  # writes go to the source; the chunks they touch go dirty
    SNAPSHOT = 2  # writes go to a delta; the copier folds frozen deltas

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def from_label(cls, label: str) -> MigMode:
        return cls[label.upper()]


class Pass(enum.IntEnum):
    """enum ubm_pass: which chunks a copy pass takes."""

    ALL = 0  # every chunk not yet copied, and dirty ones
    DIRTY = 1  # dirty chunks, except hot ones
    FINAL = 2  # every dirty chunk, hot ones included (guest I/O paused)

    @property
    def label(self) -> str:
        return self.name.lower()


MIN_CHUNK_SIZE = 64 << 10
MAX_CHUNK_SIZE = 64 << 20


class _MigConfig(ctypes.Structure):
    _fields_ = [
        ("dest_path", ctypes.c_char_p),
        ("mode", ctypes.c_uint32),
        ("dest_zeroed", ctypes.c_uint32),
        ("chunk_size", ctypes.c_uint64),
        ("speed", ctypes.c_uint64),
        ("direct", ctypes.c_uint32),
        ("copy_depth", ctypes.c_uint32),
        ("busy_depth", ctypes.c_uint32),
        ("delta_path", ctypes.c_char_p),
        ("check_below", ctypes.c_uint64),
        ("dest_fd", ctypes.c_int32),
        ("dest_timeout_ms", ctypes.c_uint32),
    ]


_U64, _U32, _I32 = ctypes.c_uint64, ctypes.c_uint32, ctypes.c_int32
# struct ubm_mig_stats in order (tests/host/test_native_tables.py checks it against ubm.h)
MIG_STAT_TYPES: tuple[tuple[str, Any], ...] = (
    ("size", _U64), ("chunk_size", _U64), ("nr_chunks", _U64),
    ("chunks_copied", _U64), ("cursor", _U64), ("dirty_chunks", _U64), ("hot_chunks", _U64),
    ("bytes_copied", _U64), ("bytes_skipped", _U64), ("bytes_read", _U64), ("passes", _U64),
    ("mirrored_writes", _U64), ("tracked_writes", _U64), ("parked", _U64),
    ("dest_errors", _U64), ("max_latency_ns", _U64), ("cutover_latency_ns", _U64),
    ("last_pause_ns", _U64), ("error", _I32), ("mode", _U32), ("paused", _U32),
    ("cut_over", _U32), ("generation", _U32), ("delta_chunks", _U64), ("cow_chunks", _U64),
    ("delta_failed", _U32), ("dest_down", _U32), ("mirror_waits", _U64),
    ("mirror_wait_ns", _U64), ("bytes_matched", _U64), ("yield_ns", _U64),
    ("cutover_pause_ns", _U64), ("dest_waiting", _U64), ("dest_waiting_ns", _U64),
    ("ahead_writes", _U64), ("chunk_wait_ns", _U64), ("pause_wait_ns", _U64),
)  # fmt: skip
MIG_STAT_FIELDS = tuple(name for name, _ in MIG_STAT_TYPES)


class _MigStats(ctypes.Structure):
    # a spare tail, as device._Stats: a data plane with more counters cannot write past the buffer
    _fields_ = [*MIG_STAT_TYPES, ("_spare", ctypes.c_uint64 * 16)]


PROTOS: Prototypes = {
    "ubm_mig_start": (ctypes.c_int, [_P, ctypes.POINTER(_MigConfig)]),
    "ubm_mig_copy_pass": (
        ctypes.c_int, [_P, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint64)]
    ),
    "ubm_mig_set_mode": (ctypes.c_int, [_P, ctypes.c_uint32]),
    "ubm_mig_set_speed": (ctypes.c_int, [_P, ctypes.c_uint64]),
    "ubm_mig_pause": (ctypes.c_int, [_P]),
    "ubm_mig_resume": (ctypes.c_int, [_P]),
    "ubm_mig_cutover_prepare": (ctypes.c_int, [_P]),
    "ubm_mig_cutover_switch": (ctypes.c_int, [_P, ctypes.c_uint32]),
    "ubm_mig_abort": (ctypes.c_int, [_P]),
    "ubm_mig_reconnect": (ctypes.c_int, [_P]),
    "ubm_mig_finish": (ctypes.c_int, [_P]),
    "ubm_mig_get_stats": (ctypes.c_int, [_P, ctypes.POINTER(_MigStats)]),
    "ubm_mig_new_delta": (ctypes.c_int, [_P]),
    "ubm_mig_verify": (ctypes.c_int, [_P, ctypes.POINTER(ctypes.c_uint64)]),
}  # fmt: skip


@dataclass(frozen=True)
class MigStats:
    """struct ubm_mig_stats (a snapshot; chunk counts in chunks, cursor in chunks)."""

    size: int = 0
    chunk_size: int = 0
    nr_chunks: int = 0
    chunks_copied: int = 0
    cursor: int = 0
    dirty_chunks: int = 0
    hot_chunks: int = 0
    bytes_copied: int = 0
    bytes_skipped: int = 0
    bytes_read: int = 0
    passes: int = 0
    mirrored_writes: int = 0
    tracked_writes: int = 0
    parked: int = 0
    dest_errors: int = 0
    max_latency_ns: int = 0
    cutover_latency_ns: int = 0
    last_pause_ns: int = 0
    error: int = 0  # first destination error, -errno
    mode: int = 0
    paused: int = 0
    cut_over: int = 0
    generation: int = 0
    delta_chunks: int = 0
    cow_chunks: int = 0
    delta_failed: int = 0  # snapshot: the error was a delta's (beside the source)
    dest_down: int = 0  # connections to the destination (NBD) lost: reconnect() may help
    mirror_waits: int = 0  # mirrored writes that waited for the destination after the source
    mirror_wait_ns: int = 0  # ... in all
    bytes_matched: int = 0  # resuming: equal on the destination already, so not written
    yield_ns: int = 0  # the copier held back for guest I/O (busy_depth, resting)
    cutover_pause_ns: int = 0  # guest I/O paused around the switch (0 in mirror, dbt mode)
    dest_waiting: int = 0  # mirrored writes, flushes done on the source, waiting for the dest now
    dest_waiting_ns: int = 0  # ... their mean wait so far
    ahead_writes: int = 0  # writes to chunks not copied yet: the source alone
    chunk_wait_ns: int = 0  # guest requests parked on a chunk being copied, in all
    pause_wait_ns: int = 0  # guest requests parked by a pause, in all

    @classmethod
    def _from_c(cls, s: _MigStats) -> MigStats:
        return cls(**{name: int(getattr(s, name)) for name in MIG_STAT_FIELDS})


@dataclass(frozen=True)
class MigrationConfig:
    """struct ubm_mig_config."""

    dest: str | os.PathLike[str]
    mode: MigMode = MigMode.MIRROR
    dest_zeroed: bool = False  # the destination reads as zeroes (a new sparse file)
    chunk_size: int = 1 << 20
    speed: int = 0  # copier bytes/s, 0 = unlimited
    direct: bool = False
    copy_depth: int = 0  # chunks in flight (0: the data plane's default)
    busy_depth: int = 0  # source reads at a time while the guest is busy (0: no yielding)
    # snapshot: the deltas are DELTA_PATH.1, .2, ..., their layer map DELTA_PATH.map
    # (None: SOURCE.ublkmig-delta)
    delta_path: str | os.PathLike[str] | None = None
    check_below: int = 0  # resuming: chunks below this are compared before being written
    dest_timeout_ms: int = 0  # NBD: the longest wait for the server (0: the data plane's 30 s)
    dest_fd: int = 0  # > 0: a file destination's checked, locked descriptor, opened again

    def _to_c(self) -> _MigConfig:
        return _MigConfig(
            dest_path=os.fsencode(self.dest),
            mode=int(self.mode),
            dest_zeroed=int(self.dest_zeroed),
            chunk_size=self.chunk_size,
            speed=self.speed,
            direct=int(self.direct),
            copy_depth=self.copy_depth,
            busy_depth=self.busy_depth,
            delta_path=os.fsencode(self.delta_path) if self.delta_path is not None else None,
            check_below=self.check_below,
            dest_fd=self.dest_fd,
            dest_timeout_ms=self.dest_timeout_ms,
        )


class Target:
    """The migration calls of a device or a simulator (struct ubm_target).

    Calls must not overlap, except abort(), set_speed() and stats(), which may run while a
    copy pass does.  On a Sim, pause/resume/cutover/finish/new_delta/verify/mig_start must
    be called by the thread that drives the Sim's guest I/O.  Errors are NativeError.
    """

    def __init__(self, handle: int, owner: Device | Sim) -> None:
        self._handle = handle
        self._owner = owner  # keeps the device alive; refuses calls once it is destroyed
        self._c_config: _MigConfig | None = None  # keeps the paths' bytes alive

    def _t(self) -> int:
        self._owner._live()
        return self._handle

    def mig_start(self, config: MigrationConfig) -> None:
        c_config = config._to_c()
        _check(_lib().ubm_mig_start(self._t(), ctypes.byref(c_config)), "mig_start")
        self._c_config = c_config

    def copy_pass(self, kind: Pass) -> int:
        """One copy pass (blocking); returns the chunks it copied."""
        n = ctypes.c_uint64(0)
        _check(_lib().ubm_mig_copy_pass(self._t(), int(kind), ctypes.byref(n)), "copy_pass")
        return int(n.value)

    def set_mode(self, mode: MigMode) -> None:
        _check(_lib().ubm_mig_set_mode(self._t(), int(mode)), "set_mode")

    def set_speed(self, bytes_per_second: int) -> None:
        _check(_lib().ubm_mig_set_speed(self._t(), bytes_per_second), "set_speed")

    def new_delta(self) -> None:
        _check(_lib().ubm_mig_new_delta(self._t()), "new_delta")

    def pause(self) -> None:
        _check(_lib().ubm_mig_pause(self._t()), "pause")

    def resume(self) -> None:
        _check(_lib().ubm_mig_resume(self._t()), "resume")

    def cutover(
        self,
        record: Callable[[], None] | None = None,
        unrecord: Callable[[], None] | None = None,
    ) -> None:
        """Check that the destination holds every byte and open the cutover's window
        (NativeError otherwise: EAGAIN not in sync, EIO it failed, ENOTCONN connections lost),
        call ``record()`` (the caller's durable record that the destination is the disk),
        then switch every request to the destination.  Guest I/O goes on meanwhile
        (ubm_mig_cutover_prepare).  If ``record`` raises, ``unrecord()`` (the record names the
        source again), the window closes and the exception propagates.  If the destination
        failed in the window: ``unrecord()``, the window closes and NativeError (EIO)
        propagates; but if ``unrecord`` raises, the record may name the destination, so the
        switch is made anyway (the writes that failed are tried there again) and this returns
        (``unrecord`` says why)."""
        lib, t = _lib(), self._t()
        _check(lib.ubm_mig_cutover_prepare(t), "cutover")
        try:
            if record is not None:
                record()
        except BaseException:
            try:
                if unrecord is not None:
                    unrecord()
            finally:
                lib.ubm_mig_cutover_switch(t, CUTOVER_CANCEL)
            raise
        rc = lib.ubm_mig_cutover_switch(t, CUTOVER_COMMIT)
        if rc == 0:
            return
        failed = NativeError("cutover", -rc, last_error())
        try:
            if unrecord is not None:
                unrecord()
        except Exception:  # (the caller's to say why: this cutover is made)
            _check(lib.ubm_mig_cutover_switch(t, CUTOVER_FORCE), "cutover")
            return
        except BaseException:
            _check(lib.ubm_mig_cutover_switch(t, CUTOVER_FORCE), "cutover")
            raise
        lib.ubm_mig_cutover_switch(t, CUTOVER_CANCEL)
        raise failed

    def verify(self) -> int:
        """Compare the destination with the disk (guest I/O paused): chunks that differ."""
        n = ctypes.c_uint64(0)
        _check(_lib().ubm_mig_verify(self._t(), ctypes.byref(n)), "verify")
        return int(n.value)

    def reconnect(self) -> None:
        """Dial the destination's lost connections again (blocking); clears the error."""
        _check(_lib().ubm_mig_reconnect(self._t()), "reconnect")

    def abort(self) -> None:
        _check(_lib().ubm_mig_abort(self._t()), "abort")

    def finish(self) -> None:
        _check(_lib().ubm_mig_finish(self._t()), "finish")
        self._c_config = None

    def stats(self) -> MigStats:
        s = _MigStats()
        _check(_lib().ubm_mig_get_stats(self._t(), ctypes.byref(s)), "mig_stats")
        return MigStats._from_c(s)
