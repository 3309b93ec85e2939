"""ctypes binding of the C data plane (native/ubm.h): the only module that knows ctypes.

The data plane is built by ``pip install -e .`` into ``ublkmig/_native<suffix>``
(a plain shared object, no Python entry point).  It is loaded on first use, so
the rest of the control plane (and its error messages) works without it.
``$UBLKMIG_NATIVE_LIB`` names another build of it (e.g. a sanitizer build).

Everything the C side reports as a negative errno becomes a :class:`NativeError`
carrying the errno and ``ubm_last_error()``, read in the thread that made the
call (the C side keeps it per thread).
"""

from __future__ import annotations

import ctypes
import dataclasses
import enum
import errno as errno_mod
import functools
import importlib.machinery
import os
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ublkmig.errors import UblkmigError

API_VERSION = 5  # UBM_API_VERSION this binding was written against
ENV_LIB = "UBLKMIG_NATIVE_LIB"
# struct ubm_config's limits
MAX_QUEUES = 64
MAX_DEPTH = 4096
LOGICAL_BLOCK_SIZES = (512, 4096)
DEFAULT_MAX_IO_BYTES = 512 * 1024
DEFAULT_NBD_TIMEOUT = 30.0  # s: the longest wait for an NBD server (the data plane's default)
DEFAULT_RECONNECT_WAIT = 60.0  # s: a request waits for a lost connection (ubm_config.wait_ms)


class DataPath(enum.IntEnum):
    """enum ubm_data_path."""

    AUTO = 0
    AUTO_ZC = 1  # UBLK_F_AUTO_BUF_REG (Linux 6.16+)
    ZC = 2  # UBLK_F_SUPPORT_ZERO_COPY, explicit register (6.15+)
    COPY = 3  # per-tag buffers, the kernel copies

    @property
    def label(self) -> str:
        """The name ubm_path_name() gives, without needing the library (CLI choices)."""
        return self.name.lower().replace("_", "-")

    @classmethod
    def from_label(cls, label: str) -> DataPath:
        return cls[label.upper().replace("-", "_")]


# UBLK_F_* bit -> name, for `ublkmig features`.
FEATURE_NAMES: dict[int, str] = {
    0: "SUPPORT_ZERO_COPY",
    1: "URING_CMD_COMP_IN_TASK",
    2: "NEED_GET_DATA",
    3: "USER_RECOVERY",
    4: "USER_RECOVERY_REISSUE",
    5: "UNPRIVILEGED_DEV",
    6: "CMD_IOCTL_ENCODE",
    7: "USER_COPY",
    8: "ZONED",
    9: "USER_RECOVERY_FAIL_IO",
    10: "UPDATE_SIZE",
    11: "AUTO_BUF_REG",
    12: "QUIESCE",
    13: "PER_IO_DAEMON",
    14: "BUF_REG_OFF_DAEMON",
    15: "BATCH_IO",
    16: "INTEGRITY",
    17: "SAFE_STOP_DEV",
    18: "NO_AUTO_PART_SCAN",
    19: "SHMEM_ZC",
}
F_SUPPORT_ZERO_COPY = 1 << 0
F_AUTO_BUF_REG = 1 << 11

# What the driver must offer for a forced data path, and since which Linux.
PATH_NEEDS: dict[DataPath, tuple[int, str]] = {
    DataPath.AUTO_ZC: (F_AUTO_BUF_REG, "6.16"),
    DataPath.ZC: (F_SUPPORT_ZERO_COPY, "6.15"),
    DataPath.COPY: (0, "6.0"),
}


def decode_features(mask: int) -> list[str]:
    """Names of the UBLK_F_* bits set in ``mask`` (unknown bits as ``BIT<n>``)."""
    return [FEATURE_NAMES.get(bit, f"BIT{bit}") for bit in range(64) if mask >> bit & 1]


def paths_offered(mask: int) -> list[DataPath]:
    """The data paths a driver with these features can run, best first."""
    return [p for p, (need, _) in PATH_NEEDS.items() if mask & need == need]


class Op(enum.IntEnum):
    """UBLK_IO_OP_* (for Sim)."""

    READ = 0
    WRITE = 1
    FLUSH = 2
    DISCARD = 3
    WRITE_ZEROES = 5


F_FUA = 1 << 13  # UBLK_IO_F_FUA

STAT_FIELDS = (
    "reads",
    "writes",
    "flushes",
    "discards",
    "write_zeroes",
    "read_bytes",
    "write_bytes",
    "errors",
    "inflight",
    "fua_writes",
    "parked",
    "conn_down",
    "conn_waiting",
    "conn_waits",
    "conn_failed",
)  # fmt: skip, struct ubm_stats in order (tests/host/test_native_tables.py checks ubm.h)


class _Config(ctypes.Structure):
    _fields_ = [
        ("source_path", ctypes.c_char_p),
        ("nr_queues", ctypes.c_uint32),
        ("queue_depth", ctypes.c_uint32),
        ("logical_bs", ctypes.c_uint32),
        ("max_io_bytes", ctypes.c_uint32),
        ("read_only", ctypes.c_uint32),
        ("direct", ctypes.c_uint32),
        ("data_path", ctypes.c_uint32),
        ("dev_id", ctypes.c_int32),
        ("recover", ctypes.c_uint32),
        ("source_fd", ctypes.c_int32),
        ("timeout_ms", ctypes.c_uint32),
        ("wait_ms", ctypes.c_uint32),
    ]


class _Stats(ctypes.Structure):
    # The data plane only writes this struct: a spare tail keeps a data plane built with more
    # counters than this binding knows from writing past the buffer.
    _fields_ = [(name, ctypes.c_uint64) for name in STAT_FIELDS] + [
        ("_spare", ctypes.c_uint64 * 16)
    ]


def _stats_dict(s: _Stats) -> dict[str, int]:
    return {name: int(getattr(s, name)) for name in STAT_FIELDS}


# --- migration (the "migration" section of ubm.h) ------------------------------------------


class MigMode(enum.IntEnum):
    """enum ubm_mig_mode."""

    MIRROR = 0  # writes to clean chunks go to both sides
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
)  # fmt: skip
MIG_STAT_FIELDS = tuple(name for name, _ in MIG_STAT_TYPES)


class _MigStats(ctypes.Structure):
    # a spare tail, as _Stats: a data plane with more counters cannot write past the buffer
    _fields_ = [*MIG_STAT_TYPES, ("_spare", ctypes.c_uint64 * 16)]


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
    cutover_pause_ns: int = 0  # the cutover's hold of guest I/O, up to the switch
    dest_waiting: int = 0  # mirrored writes done on the source, waiting for the destination now
    dest_waiting_ns: int = 0  # ... their mean wait so far

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

    def cutover(self, record: Callable[[], None] | None = None) -> None:
        """Hold guest I/O, let what is in flight finish, check that the destination holds
        every byte (NativeError otherwise: EAGAIN not in sync, EIO it failed, ENOTCONN
        connections lost), call ``record()`` (the caller's durable record that the destination
        is the disk), switch to the destination and release.  If ``record`` raises, guest I/O
        is released to the source and the exception propagates."""
        t = self._t()
        _check(_lib().ubm_mig_cutover_hold(t), "cutover")
        try:
            if record is not None:
                record()
        except BaseException:
            _lib().ubm_mig_cutover_switch(t, 0)
            raise
        _check(_lib().ubm_mig_cutover_switch(t, 1), "cutover")

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


class NativeUnavailable(UblkmigError):
    """The shared object is not built (or does not load)."""


class NativeError(UblkmigError):
    """A data-plane call failed with a negative errno."""

    def __init__(self, op: str, err: int, detail: str = "") -> None:
        self.op = op
        self.errno = err
        self.detail = detail or os.strerror(err)
        super().__init__(self.detail)

    @property
    def errno_name(self) -> str:
        return errno_mod.errorcode.get(self.errno, str(self.errno))

    def __str__(self) -> str:
        return f"{self.detail} ({self.op}: {self.errno_name})"


def library_path() -> Path | None:
    """Where the built data plane is, or None."""
    if env := os.environ.get(ENV_LIB):
        return Path(env)
    here = Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = here / f"_native{suffix}"
        if candidate.exists():
            return candidate
    return None


_P = ctypes.c_void_p  # opaque struct ubm_dev * / struct ubm_sim *


@functools.cache
def _lib() -> ctypes.CDLL:
    path = library_path()
    if path is None:
        raise NativeUnavailable(
            "the data plane is not built (no ublkmig/_native*.so): run `pip install -e .`"
        )
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise NativeUnavailable(f"cannot load the data plane {path}: {e}") from None
    protos: dict[str, tuple[Any, list[Any]]] = {
        "ubm_get_features": (ctypes.c_int, [ctypes.POINTER(ctypes.c_uint64)]),
        "ubm_choose_path": (ctypes.c_int, [ctypes.c_uint64]),
        "ubm_path_name": (ctypes.c_char_p, [ctypes.c_int]),
        "ubm_dev_create": (ctypes.c_int, [ctypes.POINTER(_Config), ctypes.POINTER(_P)]),
        "ubm_dev_start": (ctypes.c_int, [_P]),
        "ubm_dev_stop": (ctypes.c_int, [_P]),
        "ubm_dev_destroy": (None, [_P]),
        "ubm_dev_id": (ctypes.c_int, [_P]),
        "ubm_dev_size": (ctypes.c_uint64, [_P]),
        "ubm_dev_path": (ctypes.c_int, [_P]),
        "ubm_dev_flags": (ctypes.c_uint64, [_P]),
        "ubm_dev_stats": (None, [_P, ctypes.POINTER(_Stats)]),
        "ubm_dev_config": (None, [_P, ctypes.POINTER(_Config)]),
        "ubm_dev_remove_orphan": (ctypes.c_int, [ctypes.c_uint32]),
        "ubm_last_error": (ctypes.c_char_p, []),
        "ubm_sim_create": (
            ctypes.c_int,
            [ctypes.c_char_p, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32,
             ctypes.POINTER(_P)],
        ),
        "ubm_sim_submit": (
            ctypes.c_int,
            [_P, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_uint32,
             ctypes.c_void_p],
        ),
        "ubm_sim_wait": (
            ctypes.c_int, [_P, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int)]
        ),
        "ubm_sim_size": (ctypes.c_uint64, [_P]),
        "ubm_sim_stats": (None, [_P, ctypes.POINTER(_Stats)]),
        "ubm_sim_destroy": (None, [_P]),
        "ubm_sim_poll": (ctypes.c_int, [_P]),
        "ubm_sim_set_delay": (ctypes.c_int, [_P, ctypes.c_uint32, ctypes.c_uint64]),
        "ubm_sim_set_wait": (ctypes.c_int, [_P, ctypes.c_uint32]),
        "ubm_reconnect": (ctypes.c_int, [_P]),
        "ubm_sim_target": (_P, [_P]),
        "ubm_dev_target": (_P, [_P]),
        "ubm_mig_start": (ctypes.c_int, [_P, ctypes.POINTER(_MigConfig)]),
        "ubm_mig_copy_pass": (
            ctypes.c_int, [_P, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint64)]
        ),
        "ubm_mig_set_mode": (ctypes.c_int, [_P, ctypes.c_uint32]),
        "ubm_mig_set_speed": (ctypes.c_int, [_P, ctypes.c_uint64]),
        "ubm_mig_pause": (ctypes.c_int, [_P]),
        "ubm_mig_resume": (ctypes.c_int, [_P]),
        "ubm_mig_cutover_hold": (ctypes.c_int, [_P]),
        "ubm_mig_cutover_switch": (ctypes.c_int, [_P, ctypes.c_uint32]),
        "ubm_mig_abort": (ctypes.c_int, [_P]),
        "ubm_mig_reconnect": (ctypes.c_int, [_P]),
        "ubm_mig_finish": (ctypes.c_int, [_P]),
        "ubm_mig_get_stats": (ctypes.c_int, [_P, ctypes.POINTER(_MigStats)]),
        "ubm_mig_new_delta": (ctypes.c_int, [_P]),
        "ubm_mig_verify": (ctypes.c_int, [_P, ctypes.POINTER(ctypes.c_uint64)]),
    }  # fmt: skip
    for name, (restype, argtypes) in protos.items():
        try:
            fn = getattr(lib, name)
        except AttributeError:
            raise NativeUnavailable(f"the data plane {path} lacks {name}: rebuild it") from None
        fn.restype = restype
        fn.argtypes = argtypes
    return lib


def last_error() -> str:
    """ubm_last_error() of the calling thread."""
    raw = _lib().ubm_last_error()
    return raw.decode(errors="replace") if raw else ""


def _check(rc: int, op: str) -> int:
    if rc < 0:
        raise NativeError(op, -rc, last_error())
    return rc


def available() -> bool:
    try:
        _lib()
    except NativeUnavailable:
        return False
    return True


def features() -> int:
    """UBLK_U_CMD_GET_FEATURES of the running driver (NativeError ENOENT: no driver)."""
    value = ctypes.c_uint64(0)
    _check(_lib().ubm_get_features(ctypes.byref(value)), "get_features")
    return int(value.value)


def choose_path(feature_mask: int) -> DataPath:
    """The data path UBM_PATH_AUTO picks for these features."""
    return DataPath(_check(_lib().ubm_choose_path(feature_mask), "choose_path"))


def path_name(path: int) -> str:
    """ubm_path_name(): "auto-zc", "zc", "copy" (or "auto")."""
    raw = _lib().ubm_path_name(int(path))
    return raw.decode() if raw else "?"


@dataclass(frozen=True)
class DeviceConfig:
    """struct ubm_config."""

    source: str | os.PathLike[str]
    queues: int = 1
    depth: int = 128
    logical_block_size: int = 512
    max_io_bytes: int = DEFAULT_MAX_IO_BYTES
    read_only: bool = False
    direct: bool = False
    data_path: DataPath = DataPath.AUTO
    dev_id: int = -1  # let the kernel choose
    recover: bool = False  # take over device dev_id, whose server died (its geometry wins)
    source_fd: int = 0  # > 0: the checked, locked descriptor the data plane opens again
    timeout: float = DEFAULT_NBD_TIMEOUT  # an NBD source: the longest wait for the server, s
    wait: float = DEFAULT_RECONNECT_WAIT  # a request waits this long for a lost connection, s

    def _to_c(self) -> _Config:
        return _Config(
            source_path=os.fsencode(self.source),
            nr_queues=self.queues,
            queue_depth=self.depth,
            logical_bs=self.logical_block_size,
            max_io_bytes=self.max_io_bytes,
            read_only=int(self.read_only),
            direct=int(self.direct),
            data_path=int(self.data_path),
            dev_id=self.dev_id,
            recover=int(self.recover),
            source_fd=self.source_fd,
            timeout_ms=round(self.timeout * 1000),
            wait_ms=round(self.wait * 1000),
        )


class Device:
    """One ublk device served by the data plane (struct ubm_dev).

    ``create`` adds it (ADD_DEV + SET_PARAMS), ``start`` runs the queue threads
    and START_DEV, ``stop`` (blocking) STOP_DEV and waits for the threads,
    ``destroy`` DEL_DEV and frees.  stats() may be called from any thread while
    the device lives; after destroy() it returns the last counters read.
    """

    def __init__(self, handle: int, config: DeviceConfig, c_config: _Config) -> None:
        self._handle: int | None = handle
        self._c_config = c_config  # keeps source_path's bytes alive as long as the device
        self._lock = threading.Lock()
        self._last_stats = dict.fromkeys(STAT_FIELDS, 0)
        lib = _lib()
        eff = _Config()
        lib.ubm_dev_config(handle, ctypes.byref(eff))
        # what is in effect: the queues granted; a recovered device's own geometry
        self.config = dataclasses.replace(
            config, queues=eff.nr_queues, depth=eff.queue_depth,
            logical_block_size=eff.logical_bs, max_io_bytes=eff.max_io_bytes,
            read_only=bool(eff.read_only), data_path=DataPath(eff.data_path), dev_id=eff.dev_id,
        )  # fmt: skip
        self.id: int = lib.ubm_dev_id(handle)
        self.size: int = int(lib.ubm_dev_size(handle))
        self.data_path = DataPath(lib.ubm_dev_path(handle))
        self.flags: int = int(lib.ubm_dev_flags(handle))

    @classmethod
    def create(cls, config: DeviceConfig) -> Device:
        c_config = config._to_c()
        handle = _P()
        _check(_lib().ubm_dev_create(ctypes.byref(c_config), ctypes.byref(handle)), "create")
        assert handle.value is not None
        return cls(handle.value, config, c_config)

    @property
    def block_path(self) -> str:
        return f"/dev/ublkb{self.id}"

    @property
    def path_name(self) -> str:
        return path_name(self.data_path)

    def _live(self) -> int:
        if self._handle is None:
            raise NativeError("device", errno_mod.ENODEV, "the device was destroyed")
        return self._handle

    def start(self) -> None:
        _check(_lib().ubm_dev_start(self._live()), "start")

    @staticmethod
    def remove_orphan(dev_id: int) -> None:
        """STOP_DEV and DEL_DEV of a device whose server died (NativeError: ENOENT, none;
        EBUSY, its server lives; EINVAL, not one that outlives its server)."""
        _check(_lib().ubm_dev_remove_orphan(dev_id), "remove")

    def target(self) -> Target:
        """The device's migration calls."""
        return Target(_lib().ubm_dev_target(self._live()), self)

    def stop(self) -> None:
        _check(_lib().ubm_dev_stop(self._live()), "stop")

    def reconnect(self) -> None:
        """Dial the lost connections of the backend serving the device (an NBD export) again;
        the requests waiting for them go on (blocking; NativeError if the server is not back)."""
        _check(_lib().ubm_reconnect(_lib().ubm_dev_target(self._live())), "reconnect")

    def destroy(self) -> None:
        with self._lock:
            if self._handle is None:
                return
            self._last_stats = self._read_stats(self._handle)
            handle, self._handle = self._handle, None
        _lib().ubm_dev_destroy(handle)

    @staticmethod
    def _read_stats(handle: int) -> dict[str, int]:
        s = _Stats()
        _lib().ubm_dev_stats(handle, ctypes.byref(s))
        return _stats_dict(s)

    def stats(self) -> dict[str, int]:
        with self._lock:
            if self._handle is not None:
                self._last_stats = self._read_stats(self._handle)
            return dict(self._last_stats)

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()


class _Buffer:
    """Request data in memory aligned for O_DIRECT (4096), owned by Python."""

    ALIGN = 4096

    def __init__(self, length: int, data: bytes | None = None) -> None:
        self._raw = ctypes.create_string_buffer(length + self.ALIGN)
        base = ctypes.addressof(self._raw)
        self.address = base + (-base % self.ALIGN)
        if data:
            ctypes.memmove(self.address, data, len(data))

    def read(self, length: int) -> bytes:
        return ctypes.string_at(self.address, length)


@dataclass(frozen=True)
class Completion:
    ticket: int
    result: int  # bytes done, or -errno
    data: bytes | None = None  # what a successful READ read


class Sim:
    """The data plane without ublk (ubm_sim_*): host tests submit requests as a queue would.

    One caller thread at a time.  Buffers of in-flight requests are kept here
    until their completion is collected.
    """

    def __init__(
        self,
        source: str | os.PathLike[str],
        logical_block_size: int = 512,
        direct: bool = False,
        depth: int = 64,
    ) -> None:
        handle = _P()
        _check(
            _lib().ubm_sim_create(
                os.fsencode(source), logical_block_size, int(direct), depth, ctypes.byref(handle)
            ),
            "sim_create",
        )
        assert handle.value is not None
        self._handle: int | None = handle.value
        self._buffers: dict[int, tuple[Op, _Buffer | None]] = {}
        self._done: deque[Completion] = deque()
        self.logical_block_size = logical_block_size

    def _live(self) -> int:
        if self._handle is None:
            raise NativeError("sim", errno_mod.ENODEV, "the sim was destroyed")
        return self._handle

    @property
    def size(self) -> int:
        return int(_lib().ubm_sim_size(self._live()))

    @property
    def inflight(self) -> int:
        return len(self._buffers)

    def submit(
        self, op: Op, offset: int = 0, length: int = 0, data: bytes | None = None, flags: int = 0
    ) -> int:
        """Submit one request; WRITE takes ``data`` (its length is the request's).

        Returns the ticket; the buffer stays here until the completion is collected.
        """
        op = Op(op)
        buf: _Buffer | None = None
        if op == Op.WRITE:
            if data is None:
                raise ValueError("WRITE needs data")
            length = len(data)
            buf = _Buffer(length, data)
        elif op == Op.READ:
            buf = _Buffer(length)
        addr = buf.address if buf is not None else None
        ticket = _check(
            _lib().ubm_sim_submit(self._live(), int(op), flags, offset, length, addr),
            "sim_submit",
        )
        self._buffers[ticket] = (op, buf)
        return ticket

    def _wait_native(self) -> Completion | None:
        ticket, result = ctypes.c_int(), ctypes.c_int()
        rc = _lib().ubm_sim_wait(self._live(), ctypes.byref(ticket), ctypes.byref(result))
        if rc == -errno_mod.EAGAIN:
            return None
        _check(rc, "sim_wait")
        op, buf = self._buffers.pop(ticket.value, (None, None))
        data = None
        if op == Op.READ and buf is not None and result.value >= 0:
            data = buf.read(result.value)
        return Completion(ticket.value, result.value, data)

    def wait(self) -> Completion | None:
        """The next completion, or None when nothing is in flight."""
        if self._done:
            return self._done.popleft()
        return self._wait_native()

    def run(
        self, op: Op, offset: int = 0, length: int = 0, data: bytes | None = None, flags: int = 0
    ) -> Completion:
        """Submit one request and wait for it (other completions are kept for wait())."""
        ticket = self.submit(op, offset, length, data, flags)
        while True:
            c = self._wait_native()
            if c is None:
                raise NativeError("sim_wait", errno_mod.EAGAIN, f"ticket {ticket} was lost")
            if c.ticket == ticket:
                return c
            self._done.append(c)

    def _ok(self, c: Completion, op: str) -> int:
        if c.result < 0:
            raise NativeError(op, -c.result, "")
        return c.result

    def read(self, offset: int, length: int) -> bytes:
        c = self.run(Op.READ, offset, length)
        self._ok(c, "read")
        assert c.data is not None
        return c.data

    def write(self, offset: int, data: bytes, fua: bool = False) -> int:
        return self._ok(self.run(Op.WRITE, offset, data=data, flags=F_FUA if fua else 0), "write")

    def flush(self) -> int:
        return self._ok(self.run(Op.FLUSH), "flush")

    def discard(self, offset: int, length: int) -> int:
        return self._ok(self.run(Op.DISCARD, offset, length), "discard")

    def write_zeroes(self, offset: int, length: int) -> int:
        return self._ok(self.run(Op.WRITE_ZEROES, offset, length), "write_zeroes")

    def stats(self) -> dict[str, int]:
        s = _Stats()
        _lib().ubm_sim_stats(self._live(), ctypes.byref(s))
        return _stats_dict(s)

    def target(self) -> Target:
        """The simulator's migration calls (see Target for which thread may make them)."""
        return Target(_lib().ubm_sim_target(self._live()), self)

    def poll(self) -> None:
        """Run the ring without waiting (completions are collected by wait())."""
        _check(_lib().ubm_sim_poll(self._live()), "sim_poll")

    def set_delay(self, slot: int, ns: int) -> None:
        """Delay every write/discard/write-zeroes/flush to the source (0) or destination (1)."""
        _check(_lib().ubm_sim_set_delay(self._live(), slot, ns), "sim_set_delay")

    def set_wait(self, seconds: float) -> None:
        """How long a request waits for a lost connection of an NBD source (0: 60 s)."""
        _check(_lib().ubm_sim_set_wait(self._live(), round(seconds * 1000)), "sim_set_wait")

    def reconnect(self) -> None:
        """Dial an NBD source's lost connections again; the requests waiting go on."""
        _check(_lib().ubm_reconnect(_lib().ubm_sim_target(self._live())), "reconnect")

    def close(self) -> None:
        if self._handle is not None:
            handle, self._handle = self._handle, None
            _lib().ubm_sim_destroy(handle)
            self._buffers.clear()

    def __enter__(self) -> Sim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
